"""Page pins: ``vfio_pin_pages`` / ``pin_user_pages`` on host memory.

A pin takes a reference on the pfn backing an hva page.  A pinned pfn is never
reclaimed (an invalidation of its hva only fires the MMU notifiers), and an
unmapped pinned pfn keeps its bytes until the last pin is dropped.
"""

from __future__ import annotations

import numpy as np
from kvmmu.host_state import PAGE_SHIFT, PAGE_SIZE, HostState

__all__ = ["PinMixin"]


class PinMixin(HostState):
    """Pins of :class:`kvmmu.hostmem.HostMemory`: ``pin``, ``unpin``, ``pin_count``."""

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
