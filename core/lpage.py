"""``lpage_info``: per-slot huge-page disallow counts (spec/kvm-mmu-2.md §5.1).

For each huge level L (2 = 2M, 3 = 1G) a slot has one int32 ``disallow_lpage``
per huge frame overlapping it.  A huge mapping at L is allowed for a gfn only
while its entry is 0.  ``arch/x86/kvm/x86.c: kvm_alloc_memslot_metadata``
seeds the counts; ``update_gfn_disallow_lpage_count`` moves them at runtime.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "KVM_MAX_HUGEPAGE_LEVEL",
    "alloc_lpage_info",
    "gfn_to_index",
    "slot_lpages",
    "update_disallow_count",
]

#: PG_LEVEL_1G (arch/x86/include/asm/kvm_host.h)
KVM_MAX_HUGEPAGE_LEVEL = 3
_HUGE_LEVELS = (2, 3)


def _shift(level: int) -> int:
    if level not in (1, 2, 3):
        raise ValueError(f"page level must be 1, 2 or 3, got {level!r}")
    return 9 * (level - 1)


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """``gfn_to_index``: ``(gfn >> 9*(L-1)) - (base_gfn >> 9*(L-1))``."""
    s = _shift(level)
    return (gfn >> s) - (base_gfn >> s)


def slot_lpages(base_gfn: int, npages: int, level: int) -> int:
    """``__kvm_mmu_slot_lpages``: huge frames at ``level`` overlapping the slot."""
    return gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1


def alloc_lpage_info(
    base_gfn: int, npages: int, userspace_addr: int, gmem_pgoff: int | None = None
) -> dict[int, np.ndarray]:
    """Fresh disallow counts, seeded as ``kvm_alloc_memslot_metadata`` does.

    At each huge level: a misaligned head frame (``base_gfn % P``) and tail
    frame (``(base_gfn + npages) % P``) get 1; if gpa and hva are not
    congruent modulo the huge page size, every frame gets 1; likewise for a
    guest_memfd slot whose ``gmem.pgoff`` is not congruent with ``base_gfn``
    (spec/kvm-mmu-2.md §5.1 table, last rows).
    """
    info: dict[int, np.ndarray] = {}
    ugfn = userspace_addr >> 12
    for level in _HUGE_LEVELS:
        p = 1 << _shift(level)
        linfo = np.zeros(slot_lpages(base_gfn, npages, level), dtype=np.int32)
        if base_gfn & (p - 1):
            linfo[0] = 1
        if (base_gfn + npages) & (p - 1):
            linfo[-1] = 1
        if (base_gfn ^ ugfn) & (p - 1):
            linfo[:] = 1
        if gmem_pgoff is not None and (base_gfn ^ gmem_pgoff) & (p - 1):
            linfo[:] = 1
        info[level] = linfo
    return info


def update_disallow_count(info: dict[int, np.ndarray], base_gfn: int, gfn: int, delta: int) -> None:
    """``update_gfn_disallow_lpage_count``: add ``delta`` at every huge level.

    A count going negative is a model bug (the kernel would corrupt
    ``KVM_LPAGE_MIXED_FLAG``): ValueError, nothing changed.
    """
    idx = [(level, gfn_to_index(gfn, base_gfn, level)) for level in _HUGE_LEVELS]
    for level, i in idx:
        if int(info[level][i]) + delta < 0:
            raise ValueError(
                f"gfn {gfn:#x}: lpage disallow count at level {level} would go negative "
                "(allow_lpage without a matching disallow_lpage)"
            )
    for level, i in idx:
        info[level][i] += delta
