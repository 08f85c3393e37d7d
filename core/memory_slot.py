"""One memslot: ``struct kvm_memory_slot`` and the memslot UAPI constants.

The flags and limits of ``include/uapi/linux/kvm.h`` and
``include/linux/kvm_host.h`` (spec/kvm-mmu.md §1.1, §1.2), ``enum
kvm_mr_change``, the slot itself with its x86 ``arch`` metadata (dirty
bitmap, write-track counts, ``lpage_info``), and :class:`PreparedChange`, a
validated ``KVM_SET_USER_MEMORY_REGION`` request.  The set of slots is
:class:`kvmmu.memslot.Memslots`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from kvmmu.lpage import (
    gfn_to_index,
    update_disallow_count,
)

__all__ = [
    "KVM_ADDRESS_SPACE_NUM",
    "KVM_INTERNAL_MEM_SLOTS",
    "KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS",
    "KVM_MEMSLOT_INVALID",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_MAX_NR_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MEM_SLOTS_NUM",
    "KVM_USER_MEM_SLOTS",
    "LAM_TAG_MASK",
    "TASK_SIZE_MAX",
    "Memslot",
    "MemslotChange",
    "PreparedChange",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# include/uapi/linux/kvm.h (spec/kvm-mmu.md §1.1)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
# include/linux/kvm_host.h (spec/kvm-mmu.md §1.2)
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEM_SLOTS_NUM = 32767  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS = 3
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS  # 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_ADDRESS_SPACE_NUM = 2
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63

#: virt/kvm/kvm_main.c: KVM_SET_USER_MEMORY_REGION_V1_FLAGS
_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
#: Bits ``untagged_addr`` clears on x86 with LAM57 (documented choice, check 7).
LAM_TAG_MASK = 0x7F << 57
#: arch/x86/include/asm/page_64_types.h, 4-level paging.
TASK_SIZE_MAX = 0x00007FFFFFFFF000
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_WT_DTYPE = np.uint16


class MemslotChange(enum.Enum):
    """``enum kvm_mr_change`` (KVM_MR_CREATE ...)."""

    CREATE = 0
    DELETE = 1
    MOVE = 2
    FLAGS_ONLY = 3


def _no_write_track(npages: int) -> np.ndarray:
    """A read-only all-zero view: write tracking not enabled, no memory spent."""
    return np.broadcast_to(np.zeros(1, dtype=_WT_DTYPE), (npages,))


@dataclass(eq=False)
class Memslot:
    """``struct kvm_memory_slot`` with its x86 ``arch`` metadata.

    * ``dirty_bitmap``: None unless LOG_DIRTY_PAGES; else a bit-packed uint64
      array (see :mod:`kvmmu.dirty_log`).
    * ``gfn_write_track``: uint16 per page.  Allocated only once write tracking
      is enabled (:meth:`Memslots.enable_write_tracking`, like
      ``kvm_page_track_write_tracking_enabled``); until then it is a read-only
      all-zero view, so reads work and a write raises.
    * ``lpage_info``: level (2, 3) -> int32 ``disallow_lpage`` per huge frame
      overlapping the slot (spec/kvm-mmu-2.md §5.1).
    """

    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    dirty_bitmap: np.ndarray | None = field(default=None, repr=False)
    gfn_write_track: np.ndarray = field(default_factory=lambda: _no_write_track(0), repr=False)
    lpage_info: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    gmem_fd: int = 0
    gmem_offset: int = 0
    end_gfn: int = field(init=False)

    def __post_init__(self) -> None:
        self.end_gfn = self.base_gfn + self.npages

    # -- predicates -----------------------------------------------------------
    @property
    def is_readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def is_invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def logs_dirty(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def write_tracking_allocated(self) -> bool:
        return self.gfn_write_track.flags.writeable

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.end_gfn

    def _check(self, gfn: int) -> None:
        if not self.base_gfn <= gfn < self.end_gfn:
            raise ValueError(
                f"gfn {gfn:#x} is outside slot {self.as_id}:{self.id} "
                f"[{self.base_gfn:#x}, {self.end_gfn:#x})"
            )

    # -- arithmetic -----------------------------------------------------------
    def gfn_to_hva(self, gfn: int) -> int:
        """``__gfn_to_hva_memslot``: ``userspace_addr + (gfn - base_gfn) * 4096``."""
        self._check(gfn)
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        """``hva_to_gfn_memslot``: the gfn this slot maps at ``hva``."""
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    def lpage_idx(self, gfn: int, level: int) -> int:
        """``gfn_to_index(gfn, base_gfn, level)`` (spec/kvm-mmu-2.md §5.1)."""
        return gfn_to_index(gfn, self.base_gfn, level)

    def lpage_disallowed(self, gfn: int, level: int) -> bool:
        """Whether ``disallow_lpage`` is non-zero for ``gfn`` at ``level`` (2 or 3)."""
        return bool(self.lpage_info[level][gfn_to_index(gfn, self.base_gfn, level)])

    def disallow_lpage(self, gfn: int) -> None:
        """``kvm_mmu_gfn_disallow_lpage``: +1 at every huge level (spec/kvm-mmu-2.md §5.1)."""
        self._check(gfn)
        update_disallow_count(self.lpage_info, self.base_gfn, gfn, +1)

    def allow_lpage(self, gfn: int) -> None:
        """``kvm_mmu_gfn_allow_lpage``: -1 at every huge level; underflow is an error."""
        self._check(gfn)
        update_disallow_count(self.lpage_info, self.base_gfn, gfn, -1)

    def update_gfn_write_track(self, gfn: int, count: int) -> int:
        """``update_gfn_write_track`` (spec/kvm-mmu.md §2.3): add ``count``; return the new value.

        Raises if write tracking is not enabled for the VM (the kernel WARNs) or
        the u16 count would leave ``[0, 65535]``.
        """
        self._check(gfn)
        if not self.gfn_write_track.flags.writeable:
            raise ValueError(
                "write tracking is not enabled: call Memslots.enable_write_tracking() first "
                "(kvm_page_track_write_tracking_enabled)"
            )
        i = gfn - self.base_gfn
        new = int(self.gfn_write_track[i]) + count
        if not 0 <= new <= 0xFFFF:
            raise ValueError(f"gfn {gfn:#x}: write-track count would become {new} (u16)")
        self.gfn_write_track[i] = new
        return new


@dataclass(eq=False)
class PreparedChange:
    """A validated change: ``old`` and ``new`` slots and the ``change`` kind.

    ``change`` is None for a no-op modify (the ioctl returns 0).  ``new`` holds
    the final geometry and flags; its metadata is allocated by :meth:`Memslots.commit`.
    """

    old: Memslot | None
    new: Memslot | None
    change: MemslotChange | None
    as_id: int
    id: int
    max_gfn: int = (1 << 40) - 1
    external_page_track_user: bool = False
    arch_checked: bool = False
    invalid: Memslot | None = None
    done: bool = False
    serial: int = 0
