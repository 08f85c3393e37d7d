"""MMU notifiers and reclaim: invalidating host mappings under KVM.

``include/linux/mmu_notifier.h``: every invalidation calls
``invalidate_range_start`` on each registered notifier, changes the primary
mapping, then calls ``invalidate_range_end``.  Reclaim gives a page a *new*
pfn on its next touch (migration / swap), so a stale SPTE still pointing at
the old pfn is detectable (:meth:`kvmmu.hostmem.HostMemory.pfn_is_live`).
Dropping pages here also serves ``munmap``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from kvmmu.host_state import (
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_LEVEL_1G,
    HostState,
    _keys_in,
)
from kvmmu.host_vma import Vma

__all__ = ["InvalidateMixin", "MmuNotifier"]


class MmuNotifier(Protocol):
    """What :meth:`HostMemory.register_notifier` accepts (``struct mmu_notifier_ops``)."""

    def invalidate_range_start(self, hva_start: int, hva_end: int) -> None: ...

    def invalidate_range_end(self, hva_start: int, hva_end: int) -> None: ...


class InvalidateMixin(HostState):
    """MMU notifiers of :class:`kvmmu.hostmem.HostMemory`, reclaim and page dropping."""

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
