"""Host VMAs: the mappings behind guest RAM (``struct vm_area_struct``).

Userspace (the VMM) ``mmap``s anonymous memory - 4K pages, THP-backed 2M or
hugetlbfs 1G - or a device BAR, and hands the hva to
``KVM_SET_USER_MEMORY_REGION``.  A huge-page VMA keeps the base pfn of each
naturally aligned block it overlaps in one numpy array (``Vma.blocks``, -1 =
not populated as a block).  :class:`VmaMixin` is the ``mmap`` / ``munmap``
side of :class:`kvmmu.hostmem.HostMemory`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from kvmmu.host_state import (
    KVM_HPAGE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_LEVEL_1G,
    PG_LEVEL_4K,
    RAM_BASE,
    TASK_SIZE_MAX,
    HostState,
)
from kvmmu.memtype import MemType

__all__ = ["Vma", "VmaMixin"]


def _as_memtype(value: int) -> MemType:
    """``MemType(value)``, with a clear error for a value that is no memory type."""
    try:
        return MemType(value)
    except ValueError:
        allowed = ", ".join(f"{m.name}={m.value}" for m in MemType)
        raise ValueError(f"memtype {value!r} is not a memory type ({allowed})") from None


@dataclass(eq=False)
class Vma:
    """One host mapping ``[start, end)`` (``struct vm_area_struct``).

    ``page_level`` is the backing page size for anonymous memory (1 = 4K,
    2 = THP 2M, 3 = hugetlbfs 1G); ``mmio`` mappings have a fixed ``hpa`` and a
    host ``memtype`` (``MemType``; WB for RAM).
    """

    start: int
    end: int
    page_level: int = PG_LEVEL_4K
    writable: bool = True
    mmio: bool = False
    memtype: MemType = MemType.WB
    hpa: int = 0
    #: Huge-page anonymous VMAs: base pfn of each naturally aligned block the
    #: VMA overlaps (index 0 = the block holding ``start``), -1 = not mapped
    #: by a block leaf. ``None`` for 4K and MMIO VMAs.
    blocks: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def first_block(self) -> int:
        """Absolute number (hva page >> 9*(level-1)) of the block holding ``start``."""
        return (self.start >> PAGE_SHIFT) >> (9 * (self.page_level - 1))

    def block_index(self, hva_page: int) -> int:
        """Index into :attr:`blocks` of the block holding ``hva_page``."""
        return (hva_page >> (9 * (self.page_level - 1))) - self.first_block

    def contains(self, hva: int) -> bool:
        return self.start <= hva < self.end


class VmaMixin(HostState):
    """VMAs of :class:`kvmmu.hostmem.HostMemory`: ``mmap``, ``munmap``, ``find_vma``."""

    def _check_range(self, what: str, hva: int, size: int, align: int) -> None:
        if size <= 0:
            raise ValueError(f"{what}: size must be positive, got {size:#x}")
        if hva % align or size % align:
            raise ValueError(
                f"{what}: hva {hva:#x} and size {size:#x} must be multiples of {align:#x}"
            )
        if hva < 0 or hva + size > TASK_SIZE_MAX:
            raise ValueError(
                f"{what}: [{hva:#x}, {hva + size:#x}) is outside the user address space "
                f"[0, TASK_SIZE_MAX={TASK_SIZE_MAX:#x})"
            )

    def _insert_vma(self, vma: Vma) -> Vma:
        i = bisect.bisect_left(self._vma_starts, vma.start)
        prev = self._vmas[i - 1] if i > 0 else None
        nxt = self._vmas[i] if i < len(self._vmas) else None
        for other in (prev, nxt):
            if other is not None and other.start < vma.end and vma.start < other.end:
                raise ValueError(
                    f"mapping [{vma.start:#x}, {vma.end:#x}) overlaps the existing VMA "
                    f"[{other.start:#x}, {other.end:#x}); munmap it first"
                )
        self._vma_starts.insert(i, vma.start)
        self._vmas.insert(i, vma)
        return vma

    def mmap_anon(
        self, hva: int, size: int, *, page_level: int = PG_LEVEL_4K, writable: bool = True
    ) -> Vma:
        """Map anonymous memory at ``[hva, hva+size)`` (``mmap(MAP_FIXED_NOREPLACE)``).

        ``page_level`` 2 is a THP-backed VMA, 3 a hugetlbfs 1G VMA; hva and size
        must then be 2M / 1G aligned.  Nothing is allocated until first touch.
        """
        align = KVM_HPAGE_SIZE(page_level)
        self._check_range("mmap_anon", hva, size, align)
        vma = Vma(hva, hva + size, page_level, writable, False, MemType.WB)
        return self._insert_vma(_with_blocks(vma, None))

    def map_mmio(
        self, hva: int, size: int, *, hpa: int, memtype: int | MemType, writable: bool = True
    ) -> Vma:
        """Map a device BAR at host physical ``hpa`` into ``[hva, hva+size)``.

        There is no RAM behind it: the host pfns are fixed (``hpa >> 12`` ...),
        the host mapping has memory type ``memtype`` (a ``MemType``), and the
        range must lie outside the RAM window (see the module docstring).
        """
        self._check_range("map_mmio", hva, size, PAGE_SIZE)
        if hpa % PAGE_SIZE:
            raise ValueError(f"map_mmio: hpa {hpa:#x} must be 4 KiB aligned")
        first, end = hpa >> PAGE_SHIFT, (hpa + size) >> PAGE_SHIFT
        if end > 1 << (self.maxphyaddr - PAGE_SHIFT):
            raise ValueError(
                f"map_mmio: [{hpa:#x}, {hpa + size:#x}) exceeds MAXPHYADDR {self.maxphyaddr}"
            )
        if first < self._ram_limit_pfn and end > self._ram_base_pfn:
            raise ValueError(
                f"map_mmio: [{hpa:#x}, {hpa + size:#x}) overlaps host RAM "
                f"[{RAM_BASE:#x}, {self._ram_limit_pfn << PAGE_SHIFT:#x}); put BARs below "
                f"4 GiB or in the top half of the physical address space"
            )
        mt = _as_memtype(memtype)
        for f, e, other in self._mmio_ranges:
            if f < end and first < e and other != mt:
                raise ValueError(
                    f"map_mmio: hpa range [{hpa:#x}, {hpa + size:#x}) is already mapped with "
                    f"memory type {other!r}; a conflicting type {mt!r} is refused (x86 PAT "
                    f"memtype reservation)"
                )
        vma = self._insert_vma(Vma(hva, hva + size, PG_LEVEL_4K, writable, True, mt, hpa))
        self._mmio_ranges.append((first, end, mt))
        return vma

    def find_vma(self, hva: int) -> Vma | None:
        """The VMA containing ``hva``, or None."""
        i = bisect.bisect_right(self._vma_starts, hva) - 1
        if i >= 0:
            vma = self._vmas[i]
            if hva < vma.end:
                return vma
        return None

    def vmas(self) -> Iterator[Vma]:
        """All VMAs in address order."""
        return iter(list(self._vmas))

    def munmap(self, hva: int, size: int) -> None:
        """Unmap ``[hva, hva+size)``: notifiers fire, then mappings are removed.

        Holes are ignored (as ``munmap(2)``).  A hugetlbfs VMA can only be cut at
        1G boundaries (EINVAL in Linux; ValueError here).  Unpinned pages are
        freed with their contents; a pinned pfn stays allocated (the pin holds a
        reference) until :meth:`unpin`.
        """
        self._check_range("munmap", hva, size, PAGE_SIZE)
        end = hva + size
        hit = [v for v in self._vmas if v.start < end and hva < v.end]
        for v in hit:
            if v.page_level == PG_LEVEL_1G and (
                max(hva, v.start) % KVM_HPAGE_SIZE(3) or min(end, v.end) % KVM_HPAGE_SIZE(3)
            ):
                raise ValueError(
                    f"munmap: [{hva:#x}, {end:#x}) cuts the hugetlbfs 1G VMA "
                    f"[{v.start:#x}, {v.end:#x}) at a non-1G boundary"
                )
        self.invalidate_range_start(hva, end)
        self._drop_range(hva >> PAGE_SHIFT, end >> PAGE_SHIFT, unmap=True)
        for v in hit:
            i = self._vmas.index(v)
            del self._vmas[i]
            del self._vma_starts[i]
            for lo, hi in ((v.start, hva), (end, v.end)):
                if lo < hi:
                    piece = Vma(lo, hi, v.page_level, v.writable, v.mmio, v.memtype, v.hpa)
                    if v.mmio:
                        piece.hpa = v.hpa + (lo - v.start)
                    self._insert_vma(_with_blocks(piece, v))
        self.invalidate_range_end(hva, end)


def _with_blocks(vma: Vma, parent: Vma | None) -> Vma:
    """Give a huge-page anonymous ``vma`` its block array (a piece of ``parent``'s)."""
    if vma.page_level == PG_LEVEL_4K or vma.mmio:
        return vma
    s = 9 * (vma.page_level - 1)
    count = (((vma.end >> PAGE_SHIFT) - 1) >> s) + 1 - vma.first_block
    if parent is None or parent.blocks is None:
        vma.blocks = np.full(count, -1, dtype=np.int64)
    else:
        off = vma.first_block - parent.first_block
        vma.blocks = parent.blocks[off : off + count].copy()
    return vma
