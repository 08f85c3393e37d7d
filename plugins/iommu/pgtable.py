"""I/O page tables: the IOMMU's own tables (pinned mode) and the walker.

The IOMMU modelled is Intel VT-d in scalable mode, translating through a
*second-level* (stage-2) table: R = bit 0, W = bit 1, PS = bit 7 in
PDEs/PDPTEs, the next-table or page address in bits 51:12. That layout is
the EPT layout, which is why the "Sharing KVM TDP to IOMMU" RFC can point a
VT-d domain straight at KVM's EPT root (spec/consumers.md §2.2 flow step 3).
VT-d reserves bit 11 in these entries (spec/consumers.md T6, [TDP-24]):
an entry with bit 11 set is a reserved-bit fault, never a translation.

One walker serves both modes:

* pinned mode walks :class:`IoPageTable`, the IOMMU driver's own numpy pool
  of ``[N, 512] uint64`` tables (an ``iommu_domain`` filled from the IOAS);
* shared mode walks KVM's SPTE tables from the exported root, through
  ``vm.mmu.pool.table(hpa)`` - the very same numpy arrays the vCPUs use -
  reading them with an :class:`IoPteFormat` derived from the vendor's
  :class:`kvmmu.spte.SpteFormat` (:func:`io_format_for_spte`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IOPTE_ADDR_MASK",
    "IOPTE_PS",
    "IOPTE_READ",
    "IOPTE_WRITE",
    "IOPT_BASE_HPA",
    "VTD_SL_FORMAT",
    "VTD_SL_RSVD_BIT11",
    "IoPageTable",
    "IoPteFormat",
    "IoWalk",
    "io_format_for_spte",
    "io_walk",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: VT-d second-level entry bits (VT-d spec, second-level paging entries).
IOPTE_READ = 1 << 0
IOPTE_WRITE = 1 << 1
IOPTE_PS = 1 << 7
#: Bit 11 is reserved in VT-d second-level entries (spec/consumers.md T6, [TDP-24]).
VTD_SL_RSVD_BIT11 = 1 << 11
#: Address bits 51:12 of an entry.
IOPTE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
#: Host physical base of the IOMMU driver's own tables. A modelling choice:
#: the top quarter of a 52-bit space, away from host RAM (hostmem.RAM_BASE..)
#: and from BARs placed below 4 GiB; the tables are never read via host memory.
IOPT_BASE_HPA = 3 << 50

_IDX_MASK = 511


@dataclass(frozen=True, slots=True)
class IoPteFormat:
    """How the IOMMU reads one table entry.

    An entry is present to VT-d iff R or W is set; ``reserved_mask`` bits
    give a reserved-bit fault; an entry matching ``mmio_mask``/``mmio_value``
    (KVM's MMIO SPTE, shared mode only) is treated as not translatable.
    """

    name: str
    read_mask: int
    write_mask: int
    large_mask: int
    reserved_mask: int
    addr_mask: int = IOPTE_ADDR_MASK
    mmio_mask: int = 0
    mmio_value: int = 0


#: The IOMMU driver's own second-level format (pinned mode).
VTD_SL_FORMAT = IoPteFormat(
    "vtd-sl", IOPTE_READ, IOPTE_WRITE, IOPTE_PS, VTD_SL_RSVD_BIT11, IOPTE_ADDR_MASK
)


def io_format_for_spte(fmt: object, *, bit11_reserved: bool = True) -> IoPteFormat:
    """The IOMMU's view of KVM SPTEs of vendor format ``fmt`` (a ``SpteFormat``).

    EPT: R is ``shadow_user_mask`` (bit 0; spec/kvm-mmu.md §4.3), W is
    ``PT_WRITABLE_MASK`` (bit 1), PS bit 7 - the VT-d second-level layout.
    Only EPT is accepted: the RFC exports EPT to VT-d only
    (``CONFIG_KVM_INTEL_EXPORTED_EPT``, spec/consumers.md T5 [TDP-42]).
    ``bit11_reserved`` is VT-d's bit-11 rule (T6); False models an IOMMU
    that ignores bit 11 (a what-if used to show why T6 is needed).
    """
    name = getattr(fmt, "name", None)
    if name != "ept":
        raise ValueError(
            f"shared TDP needs the EPT SPTE format (VT-d second level reads EPT); got {name!r}"
        )
    return IoPteFormat(
        "ept-as-vtd-sl",
        read_mask=int(fmt.user_mask),  # type: ignore[attr-defined]
        write_mask=int(fmt.writable_mask),  # type: ignore[attr-defined]
        large_mask=int(fmt.large_mask),  # type: ignore[attr-defined]
        reserved_mask=VTD_SL_RSVD_BIT11 if bit11_reserved else 0,
        addr_mask=IOPTE_ADDR_MASK,
        mmio_mask=int(fmt.mmio_mask),  # type: ignore[attr-defined]
        mmio_value=int(fmt.mmio_value),  # type: ignore[attr-defined]
    )


@dataclass(frozen=True, slots=True)
class IoWalk:
    """Result of one IOMMU page walk for a 4K IOVA page.

    ``ok`` with ``pfn`` (the 4K host pfn), ``level`` of the leaf (1 = 4K),
    and the effective ``readable``/``writable`` (AND over every level, as
    VT-d combines second-level permissions); or not ``ok`` with ``reason``
    ``"not-present"``, ``"reserved"`` or ``"mmio"`` at ``level``.
    """

    ok: bool
    pfn: int = 0
    level: int = 0
    readable: bool = False
    writable: bool = False
    reason: str = ""


def io_walk(
    table_of: Callable[[int], np.ndarray],
    root_hpa: int,
    levels: int,
    fmt: IoPteFormat,
    iova: int,
) -> IoWalk:
    """Walk ``levels``-level tables from ``root_hpa`` for ``iova``.

    ``table_of(hpa)`` returns the 512-entry ``uint64`` array of the table
    at ``hpa`` (``vm.mmu.pool.table`` in shared mode).
    """
    hpa = root_hpa
    r = w = True
    present = fmt.read_mask | fmt.write_mask
    for level in range(levels, 0, -1):
        shift = PAGE_SHIFT + 9 * (level - 1)
        e = int(table_of(hpa)[(iova >> shift) & _IDX_MASK])
        if fmt.mmio_value and (e & fmt.mmio_mask) == fmt.mmio_value:
            return IoWalk(False, level=level, reason="mmio")
        if not e & present:
            return IoWalk(False, level=level, reason="not-present")
        if e & fmt.reserved_mask:
            return IoWalk(False, level=level, reason="reserved")
        r = r and bool(e & fmt.read_mask)
        w = w and bool(e & fmt.write_mask)
        if level == 1 or (level <= 3 and e & fmt.large_mask):
            size = 1 << shift
            base = e & fmt.addr_mask & ~(size - 1)
            pfn = (base + (iova & (size - 1))) >> PAGE_SHIFT
            return IoWalk(True, pfn=pfn, level=level, readable=r, writable=w)
        hpa = e & fmt.addr_mask
    raise AssertionError("unreachable: level 1 always ends the walk")


class IoPageTable:
    """The IOMMU driver's own 4-level second-level table (one ``iommu_domain``).

    Tables live in a numpy pool grown by doubling; table ``i`` has host
    address ``base_hpa + i * 4096``. Only 4K leaves are installed (the model
    maps page by page; ``pgsize_bitmap`` = 4K). Empty tables are not freed
    (VT-d's ``intel_iommu`` also keeps them until the domain dies).
    """

    levels = 4

    def __init__(self, base_hpa: int = IOPT_BASE_HPA) -> None:
        self.base_hpa = base_hpa
        self.pool = np.zeros((4, 512), dtype=np.uint64)
        self.used = 1  # table 0 is the root
        self.mapped = 0

    @property
    def root_hpa(self) -> int:
        return self.base_hpa

    def table(self, hpa: int) -> np.ndarray:
        """The table at ``hpa`` (a view into the pool)."""
        idx = (hpa - self.base_hpa) >> PAGE_SHIFT
        if not 0 <= idx < self.used or hpa & (PAGE_SIZE - 1):
            raise ValueError(f"{hpa:#x} is not a table of this I/O page table")
        return self.pool[idx]

    def _alloc(self) -> int:
        if self.used == len(self.pool):
            grown = np.zeros((2 * len(self.pool), 512), dtype=np.uint64)
            grown[: len(self.pool)] = self.pool
            self.pool = grown
        idx = self.used
        self.used += 1
        return self.base_hpa + (idx << PAGE_SHIFT)

    def _leaf_slot(self, iova_pfn: int, create: bool) -> tuple[np.ndarray, int] | None:
        hpa = self.root_hpa
        for level in range(self.levels, 1, -1):
            tbl = self.table(hpa)
            i = (iova_pfn >> (9 * (level - 1))) & _IDX_MASK
            e = int(tbl[i])
            if not e & (IOPTE_READ | IOPTE_WRITE):
                if not create:
                    return None
                child = self._alloc()
                tbl = self.table(hpa)  # the pool may have been reallocated
                tbl[i] = np.uint64(child | IOPTE_READ | IOPTE_WRITE)
                e = int(tbl[i])
            hpa = e & IOPTE_ADDR_MASK
        return self.table(hpa), iova_pfn & _IDX_MASK

    def map_page(self, iova_pfn: int, pfn: int, *, read: bool, write: bool) -> None:
        """Install a 4K leaf ``iova_pfn -> pfn`` (``iommu_map``); it must be free."""
        if not (read or write):
            raise ValueError("map_page: a mapping needs read or write permission")
        slot = self._leaf_slot(iova_pfn, create=True)
        assert slot is not None
        tbl, i = slot
        if int(tbl[i]) & (IOPTE_READ | IOPTE_WRITE):
            raise ValueError(f"map_page: iova page {iova_pfn:#x} is already mapped")
        tbl[i] = np.uint64(
            (pfn << PAGE_SHIFT) | (IOPTE_READ if read else 0) | (IOPTE_WRITE if write else 0)
        )
        self.mapped += 1

    def unmap_page(self, iova_pfn: int) -> int | None:
        """Clear the leaf of ``iova_pfn`` (``iommu_unmap``); return its pfn or None."""
        slot = self._leaf_slot(iova_pfn, create=False)
        if slot is None:
            return None
        tbl, i = slot
        e = int(tbl[i])
        if not e & (IOPTE_READ | IOPTE_WRITE):
            return None
        tbl[i] = np.uint64(0)
        self.mapped -= 1
        return (e & IOPTE_ADDR_MASK) >> PAGE_SHIFT

    def walk(self, iova: int) -> IoWalk:
        """:func:`io_walk` over these tables in the VT-d format."""
        return io_walk(self.table, self.root_hpa, self.levels, VTD_SL_FORMAT, iova)

    def leaves(self) -> dict[int, int]:
        """Every installed leaf as ``{iova_pfn: pfn}`` (for invariant checks)."""
        out: dict[int, int] = {}

        def visit(hpa: int, level: int, prefix: int) -> None:
            tbl = self.table(hpa)
            for i in np.flatnonzero(tbl & np.uint64(IOPTE_READ | IOPTE_WRITE)).tolist():
                e = int(tbl[i])
                vpfn = (prefix << 9) | i
                if level == 1:
                    out[vpfn] = (e & IOPTE_ADDR_MASK) >> PAGE_SHIFT
                else:
                    visit(e & IOPTE_ADDR_MASK, level - 1, vpfn)

        visit(self.root_hpa, self.levels, 0)
        return out
