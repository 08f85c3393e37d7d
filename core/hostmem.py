"""Host physical memory and the host virtual address space behind guest RAM.

This is the host side KVM sits on: userspace (the VMM) ``mmap``s anonymous
memory or a device BAR, hands the host virtual address (hva) to
``KVM_SET_USER_MEMORY_REGION``, and KVM turns an hva into a host pfn with GUP
(``virt/kvm/kvm_main.c: hva_to_pfn``).  The model keeps exactly the state the
MMU can observe:

* **VMAs** (:class:`Vma`): anonymous RAM (4K pages, THP-backed 2M, or
  hugetlbfs 1G) and MMIO BAR mappings with a host memory type.
* **Populated pages**: an hva page gets a host pfn on first touch
  (:meth:`HostMemory.hva_to_pfn`).  A huge-page VMA allocates a whole naturally
  aligned, physically contiguous block, so :meth:`HostMemory.host_mapping_level`
  is real (spec/kvm-mmu.md §3.6 ``host_pfn_mapping_level``).  Such a VMA
  keeps its block base pfns in one numpy array (``Vma.blocks``, -1 = not
  populated as a block), so a range of blocks is faulted in with one pfn
  run and one array assignment (:meth:`HostMemory.fault_in_blocks`).
* **Bytes**: page contents are materialised (a 4 KiB ``bytearray`` per pfn)
  only when written; an untouched page reads as zeros without allocating.
* **MMU notifiers** (``include/linux/mmu_notifier.h``): every invalidation calls
  ``invalidate_range_start`` on each registered notifier, changes the primary
  mapping, then calls ``invalidate_range_end``.  Reclaim gives a page a *new*
  pfn on its next touch (migration / swap), so a stale SPTE still pointing at
  the old pfn is detectable (:meth:`HostMemory.pfn_is_live`).
* **Pins** (``vfio_pin_pages`` / ``pin_user_pages``): a pinned pfn is never
  reclaimed; an invalidation of its hva only fires the notifiers.

Physical address map (a modelling choice, documented here):

* host RAM pfns come from a bump allocator in ``[RAM_BASE, 2**(maxphyaddr-1))``
  (4 GiB up to half the physical address space); pfns are never reused, so a
  freed pfn never aliases a live page;
* everything outside that window is *not* e820 RAM, so
  :meth:`HostMemory.is_mmio_pfn` is true for it, as ``kvm_is_mmio_pfn``
  (spec/kvm-mmu.md §4.6) says for a pfn that is not RAM.  Device BARs
  (:meth:`HostMemory.map_mmio`) must live there.
* MMIO register accesses are device accesses; the model backs each written
  MMIO page with a small byte store, so reads return what was last written
  (like a BAR of GPU memory).  Unwritten MMIO reads as zeros.
"""

from __future__ import annotations

import bisect
import errno
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.memtype import MemType

__all__ = [
    "KVM_HPAGE_SIZE",
    "KVM_PAGES_PER_HPAGE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "RAM_BASE",
    "TASK_SIZE_MAX",
    "HostMemory",
    "HostStats",
    "MmuNotifier",
    "Vma",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3

#: Highest user address + 1 on x86-64 with 4-level paging
#: (``arch/x86/include/asm/page_64_types.h: TASK_SIZE_MAX``).
TASK_SIZE_MAX = 0x00007FFFFFFFF000

#: First host physical address handed out for RAM (see the module docstring).
RAM_BASE = 1 << 32

_U64_MAX = (1 << 64) - 1
_Q = struct.Struct("<Q")


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    """4K pages per page of ``level`` (``arch/x86/include/asm/kvm_host.h``): 1, 512, 262144."""
    if level not in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
        raise ValueError(f"page level must be 1 (4K), 2 (2M) or 3 (1G), got {level!r}")
    return 1 << (9 * (level - 1))


def KVM_HPAGE_SIZE(level: int) -> int:
    """Bytes per page of ``level``: 4 KiB, 2 MiB or 1 GiB."""
    return KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT


def _as_memtype(value: int) -> MemType:
    """``MemType(value)``, with a clear error for a value that is no memory type."""
    try:
        return MemType(value)
    except ValueError:
        allowed = ", ".join(f"{m.name}={m.value}" for m in MemType)
        raise ValueError(f"memtype {value!r} is not a memory type ({allowed})") from None


class MmuNotifier(Protocol):
    """What :meth:`HostMemory.register_notifier` accepts (``struct mmu_notifier_ops``)."""

    def invalidate_range_start(self, hva_start: int, hva_end: int) -> None: ...

    def invalidate_range_end(self, hva_start: int, hva_end: int) -> None: ...


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


@dataclass
class HostStats:
    """Counters: 4K hva pages given a pfn, pages given byte storage, pfns allocated."""

    pages_populated: int = 0
    pages_materialised: int = 0
    pfn_allocations: int = 0
    pages_reclaimed: int = 0
    stale_writes: int = 0


class HostMemory:
    """The host: VMAs, GUP (hva -> pfn), page bytes, MMU notifiers and pins.

    ``maxphyaddr`` bounds host physical addresses (36..52); RAM pfns are
    allocated from ``[RAM_BASE, 2**(maxphyaddr-1))``.
    """

    def __init__(self, maxphyaddr: int = 46) -> None:
        if not 36 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be between 36 and 52, got {maxphyaddr}")
        self.maxphyaddr = maxphyaddr
        self._ram_base_pfn = RAM_BASE >> PAGE_SHIFT
        self._ram_limit_pfn = 1 << (maxphyaddr - 1 - PAGE_SHIFT)
        self._next_pfn = self._ram_base_pfn
        self._vma_starts: list[int] = []
        self._vmas: list[Vma] = []
        # populated mappings: 4K pages here, huge blocks in their VMA's ``blocks``
        self._small: dict[int, int] = {}  # hva page -> pfn
        self._live: dict[int, int] = {}  # live 4K RAM pfn -> hva page
        # Block pfn runs ever handed out, by first pfn: (hva page, blocks, level).
        # pfns are never reused, so a run maps a block pfn back to its hva.
        self._run_pfns: list[int] = []
        self._runs: list[tuple[int, int, int]] = []
        self._pages: dict[int, bytearray] = {}  # pfn -> bytes (RAM and MMIO)
        self._swapped: dict[int, bytearray] = {}  # hva page -> contents while unbacked
        self._pin_count: dict[int, int] = {}  # pfn -> pins
        self._pins_by_hva: dict[int, list[int]] = {}  # hva page -> pinned pfns (stack)
        self._mmio_ranges: list[tuple[int, int, MemType]] = []  # (first pfn, end pfn, memtype)
        self._notifiers: list[MmuNotifier] = []
        self._open_invalidations: list[tuple[int, int]] = []
        self.stats = HostStats()

    # ------------------------------------------------------------------ VMAs
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

    # ------------------------------------------------------------------- GUP
    def _alloc_pfns(self, level: int) -> int:
        n = KVM_PAGES_PER_HPAGE(level)
        pfn = (self._next_pfn + n - 1) & ~(n - 1)
        if pfn + n > self._ram_limit_pfn:
            raise KvmError(
                errno.ENOMEM, f"host RAM window exhausted (MAXPHYADDR {self.maxphyaddr})"
            )
        self._next_pfn = pfn + n
        self.stats.pfn_allocations += n
        self.stats.pages_populated += n
        return pfn

    def _restore(self, hva_page: int, pfn: int) -> None:
        data = self._swapped.pop(hva_page, None)
        if data is not None:
            self._pages[pfn] = data

    def _lookup(self, hva_page: int, vma: Vma | None) -> int | None:
        pfn = self._small.get(hva_page)
        if pfn is not None:
            return pfn
        if vma is not None and vma.blocks is not None:
            base = int(vma.blocks[vma.block_index(hva_page)])
            if base >= 0:
                return base + (hva_page & (KVM_PAGES_PER_HPAGE(vma.page_level) - 1))
        return None

    def _add_run(self, pfn: int, hva_page: int, nblocks: int, level: int) -> None:
        """Record blocks ``pfn..`` given to ``hva_page..`` (merged with the last run)."""
        n = KVM_PAGES_PER_HPAGE(level)
        if self._runs:
            hp, nb, lv = self._runs[-1]
            last = self._run_pfns[-1]
            if lv == level and last + nb * n == pfn and hp + nb * n == hva_page:
                self._runs[-1] = (hp, nb + nblocks, lv)
                return
        self._run_pfns.append(pfn)
        self._runs.append((hva_page, nblocks, level))

    def _block_is_live(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in a block some VMA still maps (by its run)."""
        i = bisect.bisect_right(self._run_pfns, pfn) - 1
        if i < 0:
            return False
        first = self._run_pfns[i]
        hva_page, nblocks, level = self._runs[i]
        n = KVM_PAGES_PER_HPAGE(level)
        if pfn >= first + nblocks * n:
            return False
        base = pfn & ~(n - 1)
        page = hva_page + (base - first)
        vma = self.find_vma(page << PAGE_SHIFT)
        if vma is None or vma.blocks is None or vma.page_level != level:
            return False
        return int(vma.blocks[vma.block_index(page)]) == base

    def hva_to_pfn(self, hva: int, *, write: bool) -> int:
        """GUP: the host pfn backing ``hva``, faulting it in on first touch.

        No VMA -> ``KvmError(EFAULT)``.  A write to a read-only VMA ->
        ``KvmError(EFAULT)``: KVM's ``hva_to_pfn`` fails and the fault path
        turns that into ``KVM_PFN_ERR_RO_FAULT`` / an error pfn (spec/kvm-mmu.md
        §3.5).  A THP VMA allocates the whole aligned 2M block when the block
        lies inside the VMA; hugetlbfs allocates the 1G block.  A page whose
        block was split by a partial invalidation is refaulted at 4K.
        """
        page = hva >> PAGE_SHIFT
        vma = self.find_vma(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, f"hva {hva:#x} is not mapped in the host (no VMA)")
        if write and not vma.writable:
            raise KvmError(
                errno.EFAULT, f"write to hva {hva:#x} in a read-only VMA (KVM_PFN_ERR_RO_FAULT)"
            )
        if vma.mmio:
            return (vma.hpa + (hva - vma.start)) >> PAGE_SHIFT
        pfn = self._lookup(page, vma)
        if pfn is not None:
            return pfn
        return self._fault_in(vma, page)

    def hva_to_pfn_range(self, hva: int, npages: int, *, write: bool) -> np.ndarray:
        """:meth:`hva_to_pfn` of ``npages`` consecutive pages from ``hva``, in bulk.

        Returns the pfns as ``uint64``. Each host leaf is looked up (or
        faulted in) once: a 2M/1G block gives a run of consecutive pfns
        (``get_user_pages`` of a range; the result equals calling
        :meth:`hva_to_pfn` page by page). Errors are those of
        :meth:`hva_to_pfn` for the first page that fails; pages before it
        stay faulted in.
        """
        if hva % PAGE_SIZE or npages < 0:
            raise ValueError(f"hva_to_pfn_range: hva {hva:#x} must be page aligned, npages >= 0")
        out = np.empty(npages, dtype=np.uint64)
        page = hva >> PAGE_SHIFT
        end = page + npages
        off = 0
        while page < end:
            vma = self.find_vma(page << PAGE_SHIFT)
            blocks_ok = vma is not None and vma.blocks is not None and (vma.writable or not write)
            if blocks_ok and page not in self._small:
                assert vma is not None
                n = self._range_from_blocks(vma, page, end, out[off:])
                if n:
                    off += n
                    page += n
                    continue
            pfn = self.hva_to_pfn(page << PAGE_SHIFT, write=write)
            n = 1
            if vma is not None and vma.mmio:
                n = min(end, vma.end >> PAGE_SHIFT) - page
            if n == 1:
                out[off] = pfn
            else:
                out[off : off + n] = np.arange(pfn, pfn + n, dtype=np.uint64)
            off += n
            page += n
        return out

    def _range_from_blocks(self, vma: Vma, page: int, end: int, out: np.ndarray) -> int:
        """The pfns of the leading pages of ``[page, end)`` that whole blocks of
        ``vma`` back, faulting the blocks in (:meth:`fault_in_blocks`); how many."""
        s = 9 * (vma.page_level - 1)
        n = 1 << s
        lo = vma.block_index(page)
        hi = vma.block_index(min(end, vma.end >> PAGE_SHIFT) - 1) + 1
        got = self._fault_in_blocks(vma, lo, hi)
        if got == 0:
            return 0
        stop = min(end, (vma.first_block + lo + got) << s)
        pages = np.arange(page, stop, dtype=np.int64)
        base = vma.blocks[(pages >> s) - vma.first_block] if vma.blocks is not None else pages
        out[: stop - page] = base + (pages & (n - 1))
        return stop - page

    def fault_in_blocks(self, hva: int, npages: int, *, write: bool) -> np.ndarray:
        """GUP of whole huge blocks: the base pfns of the blocks holding ``npages`` from ``hva``.

        ``hva`` lies in a huge-page VMA. The result equals :meth:`hva_to_pfn`
        of the range page by page (same pfns, same stats): unpopulated blocks
        get one contiguous, naturally aligned pfn run (``_alloc_pfns`` of each
        in turn) and one array assignment. It covers only the leading blocks
        that can be mapped whole (inside the VMA, no 4K pages left from a
        split, RAM left); the caller takes the rest page by page, which
        reports any error. Returns ``int64``, one base pfn per block, as a
        read-only view that is valid until the host mappings next change.
        """
        vma = self.find_vma(hva)
        if vma is None or vma.blocks is None or (write and not vma.writable) or npages <= 0:
            return np.empty(0, dtype=np.int64)
        page = hva >> PAGE_SHIFT
        lo = vma.block_index(page)
        hi = vma.block_index(page + npages - 1) + 1
        got = self._fault_in_blocks(vma, lo, hi)
        view = vma.blocks[lo : lo + got].view()
        view.flags.writeable = False
        return view

    def _fault_in_blocks(self, vma: Vma, lo: int, hi: int) -> int:
        """``_fault_in`` of blocks ``[lo, hi)`` of ``vma`` at once; leading blocks done."""
        blocks = vma.blocks
        if blocks is None:
            return 0
        level = vma.page_level
        s = 9 * (level - 1)
        n = 1 << s
        first = vma.first_block
        # only blocks wholly inside the VMA are mapped whole (``_fault_in`` fits)
        if lo < (0 if (vma.start >> PAGE_SHIFT) & (n - 1) == 0 else 1):
            return 0
        hi = min(hi, ((vma.end >> PAGE_SHIFT) >> s) - first)
        if hi <= lo:
            return 0
        seg = blocks[lo:hi]
        if seg.max() < 0 and not self._small and not self._swapped:
            return self._fault_in_fresh(vma, lo, hi)
        if seg.min() >= 0:
            return hi - lo  # all present
        missing = np.flatnonzero(seg < 0)
        if self._small:
            # a block with 4K pages left from a split refaults at 4K: stop there
            for page in sorted(self._small_in((first + lo) << s, (first + hi) << s)):
                b = (page >> s) - first - lo
                if seg[b] < 0:
                    hi = lo + b
                    seg = blocks[lo:hi]
                    missing = missing[missing < b]
                    break
        k = int(missing.size)
        pfn = (self._next_pfn + n - 1) & ~(n - 1)
        if k:
            fit = max(0, (self._ram_limit_pfn - pfn) // n)
            if fit < k:  # RAM runs out: the page path raises ENOMEM at the next one
                hi = lo + int(missing[fit])
                missing = missing[:fit]
                k = fit
        if k:
            bases = np.arange(pfn, pfn + k * n, n, dtype=np.int64)
            seg[missing] = bases
            self._next_pfn = pfn + k * n
            self.stats.pfn_allocations += k * n
            self.stats.pages_populated += k * n
            cuts = np.flatnonzero(np.diff(missing) != 1) + 1
            starts = [0, *cuts.tolist()]
            ends = [*cuts.tolist(), k]
            for a, b in zip(starts, ends, strict=True):
                self._add_run(pfn + a * n, (first + lo + int(missing[a])) << s, b - a, level)
            if self._swapped:
                for hp in _keys_in(self._swapped, (first + lo) << s, (first + hi) << s):
                    base = int(blocks[(hp >> s) - first])
                    if base >= 0 and base >= pfn:
                        self._restore(hp, base + (hp & (n - 1)))
        return hi - lo

    def _fault_in_fresh(self, vma: Vma, lo: int, hi: int) -> int:
        """:meth:`_fault_in_blocks` when no block of ``[lo, hi)`` is populated and
        nothing is split or swapped: one pfn run written in place."""
        assert vma.blocks is not None
        level = vma.page_level
        s = 9 * (level - 1)
        n = 1 << s
        pfn = (self._next_pfn + n - 1) & ~(n - 1)
        k = min(hi - lo, max(0, (self._ram_limit_pfn - pfn) // n))
        if k:
            np.add(_steps(k, n), pfn, out=vma.blocks[lo : lo + k])
            self._next_pfn = pfn + k * n
            self.stats.pfn_allocations += k * n
            self.stats.pages_populated += k * n
            self._add_run(pfn, (vma.first_block + lo) << s, k, level)
        return k

    def _fault_in(self, vma: Vma, page: int) -> int:
        level = vma.page_level
        if level > PG_LEVEL_4K and vma.blocks is not None:
            n = KVM_PAGES_PER_HPAGE(level)
            first = page & ~(n - 1)
            fits = vma.start <= first << PAGE_SHIFT and (first + n) << PAGE_SHIFT <= vma.end
            if fits and not self._small_in(first, first + n):
                base = self._alloc_pfns(level)
                vma.blocks[vma.block_index(first)] = base
                self._add_run(base, first, 1, level)
                for hp in _keys_in(self._swapped, first, first + n):
                    self._restore(hp, base + (hp - first))
                return base + (page - first)
        pfn = self._alloc_pfns(PG_LEVEL_4K)
        self._small[page] = pfn
        self._live[pfn] = page
        self._restore(page, pfn)
        return pfn

    def _small_in(self, first: int, end: int) -> list[int]:
        return _keys_in(self._small, first, end)

    def host_mapping_level(self, hva: int) -> int:
        """Level of the host leaf mapping ``hva``: 3 (1G), 2 (2M) or 1.

        Like ``host_pfn_mapping_level`` (spec/kvm-mmu.md §3.6): a PUD leaf is 1G,
        a PMD leaf 2M, anything else (4K, or not present) is 4K.
        """
        page = hva >> PAGE_SHIFT
        if page in self._small:
            return PG_LEVEL_4K
        vma = self.find_vma(hva)
        if vma is not None and vma.blocks is not None and vma.blocks[vma.block_index(page)] >= 0:
            return vma.page_level
        return PG_LEVEL_4K

    def is_populated(self, hva: int) -> bool:
        """Whether ``hva`` currently has a host pfn (without faulting it in)."""
        return self._lookup(hva >> PAGE_SHIFT, self.find_vma(hva)) is not None

    # ------------------------------------------------------------- physical
    def is_ram_pfn(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in the host RAM window."""
        return self._ram_base_pfn <= pfn < self._ram_limit_pfn

    def is_mmio_pfn(self, pfn: int) -> bool:
        """``kvm_is_mmio_pfn`` (spec/kvm-mmu.md §4.6): a pfn that is not host RAM."""
        return not self._ram_base_pfn <= pfn < self._ram_limit_pfn

    def memtype_of(self, hpa: int) -> MemType:
        """Host memory type of ``hpa``: WB for RAM, the BAR's mapping type for MMIO.

        MMIO with no mapping reads UC_MINUS, as x86 PAT ``lookup_memtype`` does
        for untracked non-RAM.  Returns a ``MemType``.
        """
        pfn = hpa >> PAGE_SHIFT
        if self.is_ram_pfn(pfn):
            return MemType.WB
        for first, end, mt in self._mmio_ranges:
            if first <= pfn < end:
                return mt
        return MemType.UC_MINUS

    def pfn_is_live(self, pfn: int) -> bool:
        """True for MMIO pfns and RAM pfns currently backing an hva or pinned.

        False for a RAM pfn that was reclaimed, unmapped or never allocated: an
        SPTE pointing there is stale.
        """
        if not self.is_ram_pfn(pfn):
            return True
        if pfn in self._live or self._pin_count.get(pfn, 0) > 0:
            return True
        return self._block_is_live(pfn)

    def _page_for_write(self, pfn: int) -> bytearray:
        data = self._pages.get(pfn)
        if data is None:
            if self.is_ram_pfn(pfn) and not self.pfn_is_live(pfn):
                self.stats.stale_writes += 1
            data = bytearray(PAGE_SIZE)
            self._pages[pfn] = data
            self.stats.pages_materialised += 1
        return data

    def read_phys(self, hpa: int, size: int) -> bytes:
        """Read ``size`` bytes at host physical ``hpa``; untouched memory reads as zeros."""
        if size < 0 or hpa < 0:
            raise ValueError(f"read_phys: hpa {hpa:#x} and size {size} must be non-negative")
        out = bytearray()
        while size:
            off = hpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            data = self._pages.get(hpa >> PAGE_SHIFT)
            out += data[off : off + n] if data is not None else bytes(n)
            hpa += n
            size -= n
        return bytes(out)

    def write_phys(self, hpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at host physical ``hpa``, materialising pages as needed."""
        if hpa < 0:
            raise ValueError(f"write_phys: hpa {hpa:#x} must be non-negative")
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            off = hpa & (PAGE_SIZE - 1)
            n = min(len(mv) - pos, PAGE_SIZE - off)
            self._page_for_write(hpa >> PAGE_SHIFT)[off : off + n] = mv[pos : pos + n]
            hpa += n
            pos += n

    def read_u64(self, hpa: int) -> int:
        """Read one little-endian u64 (a page-table entry) at ``hpa``."""
        off = hpa & (PAGE_SIZE - 1)
        if off <= PAGE_SIZE - 8:
            data = self._pages.get(hpa >> PAGE_SHIFT)
            return 0 if data is None else _Q.unpack_from(data, off)[0]
        return int.from_bytes(self.read_phys(hpa, 8), "little")

    def write_u64(self, hpa: int, value: int) -> None:
        """Write one little-endian u64 at ``hpa``."""
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"write_u64: value {value:#x} is not a u64")
        self.write_phys(hpa, value.to_bytes(8, "little"))

    def read_u64_many(self, hpas: np.ndarray) -> np.ndarray:
        """Batch :meth:`read_u64` for 8-byte aligned ``hpas``; returns uint64 values."""
        addrs = np.asarray(hpas, dtype=np.uint64)
        out = np.zeros(addrs.shape, dtype=np.uint64)
        if addrs.size == 0:
            return out
        flat = addrs.reshape(-1)
        if np.any(flat & np.uint64(7)):
            raise ValueError("read_u64_many: every address must be 8-byte aligned")
        res = out.reshape(-1)
        pfns = flat >> np.uint64(PAGE_SHIFT)
        idx = ((flat & np.uint64(PAGE_SIZE - 1)) >> np.uint64(3)).astype(np.intp)
        order = np.argsort(pfns, kind="stable")
        spfns = pfns[order]
        cuts = np.flatnonzero(np.diff(spfns)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [spfns.size]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            data = self._pages.get(int(spfns[s]))
            if data is not None:
                sel = order[s:e]
                res[sel] = np.frombuffer(data, dtype="<u8")[idx[sel]]
        return out

    def resident_bytes(self) -> int:
        """Bytes of page contents held (materialised pages, swapped-out contents)."""
        return (len(self._pages) + len(self._swapped)) * PAGE_SIZE

    # --------------------------------------------------------------- pinning
    def pin(self, hva: int, npages: int, *, write: bool = True) -> np.ndarray:
        """Pin ``npages`` pages at ``hva`` (``vfio_pin_pages``): fault in, +1 ref each.

        Returns the pfns (int64).  A pinned pfn is never reclaimed.
        """
        if hva % PAGE_SIZE or npages <= 0:
            raise ValueError(f"pin: hva {hva:#x} must be page aligned and npages > 0")
        pfns = np.empty(npages, dtype=np.int64)
        for i in range(npages):
            pfns[i] = self.hva_to_pfn(hva + (i << PAGE_SHIFT), write=write)
        for i in range(npages):
            pfn = int(pfns[i])
            self._pin_count[pfn] = self._pin_count.get(pfn, 0) + 1
            self._pins_by_hva.setdefault((hva >> PAGE_SHIFT) + i, []).append(pfn)
        return pfns

    def unpin(self, hva: int, npages: int) -> None:
        """Drop the pins :meth:`pin` took on ``npages`` pages at ``hva``."""
        pages = [(hva >> PAGE_SHIFT) + i for i in range(npages)]
        missing = [p for p in pages if not self._pins_by_hva.get(p)]
        if hva % PAGE_SIZE or missing:
            raise ValueError(
                f"unpin: hva {hva:#x} + {npages} pages: page(s) "
                f"{[hex(p << PAGE_SHIFT) for p in missing[:4]]} are not pinned"
            )
        for p in pages:
            stack = self._pins_by_hva[p]
            pfn = stack.pop()
            if not stack:
                del self._pins_by_hva[p]
            left = self._pin_count[pfn] - 1
            if left:
                self._pin_count[pfn] = left
            else:
                del self._pin_count[pfn]
                if not self.pfn_is_live(pfn):
                    self._pages.pop(pfn, b"")  # orphaned by munmap: now freed

    def pin_count(self, pfn: int) -> int:
        """Number of pins held on ``pfn``."""
        return self._pin_count.get(pfn, 0)

    # ------------------------------------------------------------- notifiers
    def register_notifier(self, n: MmuNotifier) -> None:
        """Register an MMU notifier (``mmu_notifier_register``); newest is called first."""
        if any(x is n for x in self._notifiers):
            raise ValueError("register_notifier: this notifier is already registered")
        self._notifiers.insert(0, n)

    def unregister_notifier(self, n: MmuNotifier) -> None:
        """Unregister a notifier registered with :meth:`register_notifier`."""
        for i, x in enumerate(self._notifiers):
            if x is n:
                del self._notifiers[i]
                return
        raise ValueError("unregister_notifier: this notifier is not registered")

    def invalidate_range_start(self, hva_start: int, hva_end: int) -> None:
        """Step 1 of an invalidation: every notifier's ``invalidate_range_start``."""
        if hva_start >= hva_end:
            raise ValueError(f"invalidate: empty range [{hva_start:#x}, {hva_end:#x})")
        self._open_invalidations.append((hva_start, hva_end))
        for n in list(self._notifiers):
            n.invalidate_range_start(hva_start, hva_end)

    def reclaim_range(self, hva_start: int, hva_end: int) -> int:
        """Step 2: drop the pfns of unpinned populated pages in the range.

        Contents are kept and come back under a *new* pfn on the next touch
        (migration / swap).  A split THP block keeps its untouched pages at 4K;
        a hugetlbfs block is reclaimed whole or not at all.  Returns the number
        of 4K pages reclaimed.  Call between start and end.
        """
        first = hva_start >> PAGE_SHIFT
        end = (hva_end + PAGE_SIZE - 1) >> PAGE_SHIFT
        return self._drop_range(first, end, unmap=False)

    def invalidate_range_end(self, hva_start: int, hva_end: int) -> None:
        """Step 3: every notifier's ``invalidate_range_end``."""
        try:
            self._open_invalidations.remove((hva_start, hva_end))
        except ValueError:
            raise ValueError(
                f"invalidate_range_end [{hva_start:#x}, {hva_end:#x}) without a matching start"
            ) from None
        for n in list(self._notifiers):
            n.invalidate_range_end(hva_start, hva_end)

    def invalidate_range(self, hva_start: int, hva_end: int, *, reclaim: bool = True) -> int:
        """start on every notifier, reclaim (if asked), end on every notifier."""
        self.invalidate_range_start(hva_start, hva_end)
        try:
            return self.reclaim_range(hva_start, hva_end) if reclaim else 0
        finally:
            self.invalidate_range_end(hva_start, hva_end)

    @property
    def invalidations_in_progress(self) -> int:
        """Number of started, not yet ended invalidations."""
        return len(self._open_invalidations)

    def _drop_small(self, page: int, unmap: bool) -> int:
        pfn = self._small[page]
        pinned = self._pin_count.get(pfn, 0) > 0
        if pinned and not unmap:
            return 0  # a pinned page is never reclaimed
        del self._small[page]
        del self._live[pfn]
        if not pinned:  # a pinned, unmapped pfn keeps its bytes until unpin
            data = self._pages.pop(pfn, None)
            if data is not None and not unmap:
                self._swapped[page] = data
        return 1

    def _drop_block(self, vma: Vma, bi: int, lo: int, hi: int, unmap: bool) -> int:
        assert vma.blocks is not None
        level = vma.page_level
        n = KVM_PAGES_PER_HPAGE(level)
        hva_page = (vma.first_block + bi) * n
        base = int(vma.blocks[bi])
        whole = lo == hva_page and hi == hva_page + n
        pinned: set[int] = set()
        if self._pin_count:
            pinned = {i for i in range(n) if self._pin_count.get(base + i, 0) > 0}
        if level == PG_LEVEL_1G and not unmap and (pinned or not whole):
            return 0  # hugetlbfs pages are reclaimed whole, and never while pinned
        vma.blocks[bi] = -1
        if whole and not pinned:
            for pfn in _keys_in(self._pages, base, base + n):
                data = self._pages.pop(pfn)
                if not unmap:
                    self._swapped[hva_page + (pfn - base)] = data
            return n
        dropped = 0
        for i in range(n):
            page, pfn = hva_page + i, base + i
            if not lo <= page < hi or (i in pinned and not unmap):
                # THP split: the page stays mapped at 4K with the same pfn
                self._small[page] = pfn
                self._live[pfn] = page
                continue
            if i not in pinned:
                contents = self._pages.pop(pfn, None)
                if contents is not None and not unmap:
                    self._swapped[page] = contents
            dropped += 1
        return dropped

    def _drop_range(self, first: int, end: int, *, unmap: bool) -> int:
        dropped = 0
        for page in self._small_in(first, end):
            dropped += self._drop_small(page, unmap)
        for vma in list(self._vmas):
            blocks = vma.blocks
            if blocks is None or not (
                vma.start >> PAGE_SHIFT < end and first < vma.end >> PAGE_SHIFT
            ):
                continue
            s = 9 * (vma.page_level - 1)
            n = 1 << s
            b_lo = max(0, (first >> s) - vma.first_block)
            b_hi = min(blocks.shape[0], ((end - 1) >> s) + 1 - vma.first_block)
            for bi in (np.flatnonzero(blocks[b_lo:b_hi] >= 0) + b_lo).tolist():
                hp = (vma.first_block + bi) << s
                dropped += self._drop_block(vma, bi, max(first, hp), min(end, hp + n), unmap)
        if unmap:
            for page in _keys_in(self._swapped, first, end):
                del self._swapped[page]
        self.stats.pages_reclaimed += dropped
        return dropped


_STEPS: dict[int, np.ndarray] = {}


def _steps(k: int, n: int) -> np.ndarray:
    """``np.arange(k) * n`` (block pfn offsets) as a read-only view of a cached array."""
    arr = _STEPS.get(n)
    if arr is None or arr.size < k:
        arr = np.arange(max(k, 2 * (0 if arr is None else arr.size)), dtype=np.int64) * n
        arr.flags.writeable = False
        _STEPS[n] = arr
    return arr[:k]


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


def _keys_in(d: Mapping[int, object], first: int, end: int) -> list[int]:
    """Keys of ``d`` in ``[first, end)``, scanning whichever side is smaller."""
    if end - first <= len(d):
        return [k for k in range(first, end) if k in d]
    return [k for k in d if first <= k < end]
