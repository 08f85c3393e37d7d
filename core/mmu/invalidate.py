"""The mmu_invalidate protocol: sequence count, in-progress count and gfn range.

``kvm->mmu_invalidate_seq``, ``mmu_invalidate_in_progress`` and
``mmu_invalidate_range_start/end`` (``virt/kvm/kvm_main.c``,
``include/linux/kvm_host.h``; spec/kvm-mmu.md §3.5). The range is gfn-based
(6.8+, guest_memfd).
"""

from __future__ import annotations

__all__ = ["INVALID_GPA", "InvalidateState"]

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
