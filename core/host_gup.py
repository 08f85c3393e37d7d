"""GUP: host virtual address -> host pfn, faulting pages in on first touch.

A model of ``get_user_pages`` as KVM's ``hva_to_pfn``
(``virt/kvm/kvm_main.c``) uses it.  An hva page gets a host pfn on first
touch; a huge-page VMA allocates a whole naturally aligned, physically
contiguous block, so :meth:`GupMixin.host_mapping_level` is real
(spec/kvm-mmu.md §3.6 ``host_pfn_mapping_level``), and a range of blocks is
faulted in with one pfn run and one array assignment
(:meth:`GupMixin.fault_in_blocks`).  RAM pfns come from a bump allocator and
are never reused; block runs handed out are recorded so a block pfn maps back
to its hva.
"""

from __future__ import annotations

import bisect
import errno

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.host_state import (
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_LEVEL_4K,
    HostState,
    _keys_in,
)
from kvmmu.host_vma import Vma

__all__ = ["GupMixin"]


class GupMixin(HostState):
    """GUP of :class:`kvmmu.hostmem.HostMemory`: pfn allocation, lookup, fault-in."""

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
        gets ``KVM_PFN_ERR_FAULT`` (-EFAULT from ``kvm_handle_error_pfn``;
        spec/kvm-mmu.md §3.5). ``KVM_PFN_ERR_RO_FAULT`` is the READONLY
        *memslot* case, which the fault path emulates without calling here.
        A THP VMA allocates the whole aligned 2M block when the block
        lies inside the VMA; hugetlbfs allocates the 1G block.  A page whose
        block was split by a partial invalidation is refaulted at 4K.
        """
        page = hva >> PAGE_SHIFT
        vma = self.find_vma(hva)
        if vma is None:
            raise KvmError(errno.EFAULT, f"hva {hva:#x} is not mapped in the host (no VMA)")
        if write and not vma.writable:
            raise KvmError(
                errno.EFAULT, f"write to hva {hva:#x} in a read-only VMA (KVM_PFN_ERR_FAULT)"
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


_STEPS: dict[int, np.ndarray] = {}


def _steps(k: int, n: int) -> np.ndarray:
    """``np.arange(k) * n`` (block pfn offsets) as a read-only view of a cached array."""
    arr = _STEPS.get(n)
    if arr is None or arr.size < k:
        arr = np.arange(max(k, 2 * (0 if arr is None else arr.size)), dtype=np.int64) * n
        arr.flags.writeable = False
        _STEPS[n] = arr
    return arr[:k]
