"""The mmu_invalidate protocol: sequence count, in-progress count and gfn range.

``kvm->mmu_invalidate_seq``, ``mmu_invalidate_in_progress`` and
``mmu_invalidate_range_start/end`` (``virt/kvm/kvm_main.c``,
``include/linux/kvm_host.h``; spec/kvm-mmu.md §3.5). The range is gfn-based
(6.8+, guest_memfd).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["INVALID_GPA", "InvalidateState", "MmuNotifierMixin", "hull_union"]

#: ``INVALID_GPA``: the range is unset.
INVALID_GPA = (1 << 64) - 1


class InvalidateState:
    """One VM's invalidation state."""

    __slots__ = ("in_progress", "range_end", "range_start", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.in_progress = 0
        self.range_start = INVALID_GPA
        self.range_end = INVALID_GPA

    def begin(self) -> None:
        """``kvm_mmu_invalidate_begin``: the first of a nest resets the range."""
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = INVALID_GPA
            self.range_end = INVALID_GPA

    def range_add(self, start: int, end: int) -> None:
        """``kvm_mmu_invalidate_range_add``: set the range, or widen it (min/max)."""
        if self.in_progress <= 0:
            raise AssertionError("mmu_invalidate_range_add outside begin/end (KVM WARN)")
        if self.range_start == INVALID_GPA:
            self.range_start = start
            self.range_end = end
        else:
            self.range_start = min(self.range_start, start)
            self.range_end = max(self.range_end, end)

    def end(self) -> None:
        """``kvm_mmu_invalidate_end``: bump ``seq`` first, then drop ``in_progress``."""
        self.seq += 1
        self.in_progress -= 1
        if self.in_progress < 0:
            raise AssertionError("mmu_invalidate_in_progress went negative (KVM_BUG_ON)")

    def retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn`` (under ``mmu_lock``).

        True if an invalidation is in progress and covers ``gfn`` (or has no
        range yet: KVM WARNs and retries), or the sequence moved on.
        """
        if self.in_progress:
            if self.range_start == INVALID_GPA:
                return True
            if self.range_start <= gfn < self.range_end:
                return True
        return self.seq != mmu_seq

    def retry_gfn_unsafe(self, mmu_seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn_unsafe``: the lockless pre-check (no WARN)."""
        if self.in_progress and self.range_start <= gfn < self.range_end:
            return True
        return self.seq != mmu_seq


def hull_union(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    """The smallest ``[lo, hi)`` covering both hulls (None = empty)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a[0], b[0]), max(a[1], b[1])


class MmuNotifierMixin(ABC):
    """The generic half of KVM's MMU notifier, shared by the TDP and shadow MMUs.

    ``kvm_mmu_notifier_invalidate_range_start`` -> ``kvm_handle_hva_range``
    (``virt/kvm/kvm_main.c``): for every memslot (both address spaces) the
    hva range hits, ``kvm_mmu_invalidate_begin`` on the first hit, then
    ``kvm_mmu_invalidate_range_add`` of that slot's gfns and the arch
    ``kvm_unmap_gfn_range``; one flush of what changed. ``..._range_end``
    runs ``kvm_mmu_invalidate_end`` (seq++, then in_progress--) only if the
    start found a slot (spec/kvm-mmu.md §3.5).
    """

    vm: Any
    invalidate: InvalidateState
    _mn_found: list[tuple[int, int, bool]]

    @abstractmethod
    def mn_unmap_gfn_range(self, slot: Any, start: int, end: int) -> tuple[int, int] | None:
        """``kvm_unmap_gfn_range``: zap ``[start, end)`` in ``slot``'s address
        space; return the hull of the gfns whose SPTEs changed, or None."""

    @abstractmethod
    def mn_flush(self, hull: tuple[int, int] | None) -> None:
        """``kvm_flush_remote_tlbs_range`` over ``hull`` (nothing for None)."""

    @abstractmethod
    def mn_lock(self) -> None:
        """Take ``mmu_lock`` for the unmap (the shadow MMU checks contention)."""

    def invalidate_range_start(self, hva_start: int, hva_end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_start``."""
        ranges = self.vm.memslots.hva_range_to_gfn_ranges(hva_start, hva_end)
        self._mn_found.append((hva_start, hva_end, bool(ranges)))
        if not ranges:
            return
        self.mn_lock()
        inv = self.invalidate
        inv.begin()
        hull: tuple[int, int] | None = None
        for slot, g0, g1 in ranges:
            inv.range_add(g0, g1)
            hull = hull_union(hull, self.mn_unmap_gfn_range(slot, g0, g1))
        self.mn_flush(hull)

    def invalidate_range_end(self, hva_start: int, hva_end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_end``: end only if start found a slot."""
        for n, (s, e, found) in enumerate(self._mn_found):
            if s == hva_start and e == hva_end:
                del self._mn_found[n]
                if found:
                    self.invalidate.end()
                return
        raise ValueError(f"invalidate_range_end [{hva_start:#x}, {hva_end:#x}) without a start")
