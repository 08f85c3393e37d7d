"""KVM memslots: ``KVM_SET_USER_MEMORY_REGION`` semantics and per-slot metadata.

The update is split the way ``kvm_set_memory_region`` / ``kvm_set_memslot``
run it (``virt/kvm/kvm_main.c``; spec/kvm-mmu.md §1), so the VM can interleave
plugin hooks and the MMU zap:

1. :meth:`Memslots.prepare` - checks 2-16 of spec/kvm-mmu.md §1.3 in order,
   then the x86 ``kvm_arch_prepare_memory_region`` checks (§1.5).  Changes
   nothing; returns a :class:`PreparedChange`.
2. :meth:`Memslots.install_invalid` (DELETE / MOVE only) - an INVALID copy of
   the old slot is swapped in (``kvm_invalidate_memslot``); the generation
   bumps, so the old generation's MMIO SPTEs go stale.
3. the caller zaps the slot's SPTEs (``kvm_arch_flush_shadow_memslot``) and,
   for DELETE, runs ``track_remove_region``.
4. :meth:`Memslots.commit` - the new slot is installed with fresh (CREATE,
   MOVE) or carried-over (FLAGS_ONLY) metadata; counters and generation move.

guest_memfd is not modelled by default (``supports_gmem=False``): the
``KVM_MEM_GUEST_MEMFD`` flag is refused by check 2 on the v1 ioctl and by
check 4 on ``region2``, as on a VM type without private memory.  With
``supports_gmem=True`` the flag passes check 4 so checks 8 and 14 can be
exercised; the fd itself is recorded, not bound (check 18 is not modelled).

Choices the kernel leaves to the platform, fixed here:

* a tagged ``userspace_addr`` (check 7) is one with any of bits 57-63 set,
  i.e. ``untagged_addr`` under x86 LAM57 clears them;
* ``access_ok(hva, size)`` is ``hva + size <= TASK_SIZE_MAX`` (4-level paging).
"""

from __future__ import annotations

import bisect
import enum
import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from kvmmu import dirty_log as _dl
from kvmmu.dirty_log import DirtyLogMixin
from kvmmu.errors import KvmError
from kvmmu.lpage import (
    alloc_lpage_info,
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
    "Memslots",
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


class Memslots(DirtyLogMixin):
    """All memslots of one VM, every address space (``kvm->__memslots``).

    ``nr_as_ids`` is ``kvm_arch_nr_memslot_as_ids``: 2 on x86 (SMM), 1 for a VM
    with private memory.  ``manual_dirty_log_protect`` / ``dirty_log_initially_set``
    model ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` and its INITIALLY_SET flag.
    """

    def __init__(
        self,
        *,
        nr_as_ids: int = KVM_ADDRESS_SPACE_NUM,
        supports_gmem: bool = False,
        manual_dirty_log_protect: bool = False,
        dirty_log_initially_set: bool = False,
    ) -> None:
        if nr_as_ids not in (1, 2):
            raise ValueError(f"nr_as_ids must be 1 or 2 (x86), got {nr_as_ids}")
        self.nr_as_ids = nr_as_ids
        self.supports_gmem = supports_gmem
        self.manual_dirty_log_protect = manual_dirty_log_protect
        self.dirty_log_initially_set = dirty_log_initially_set
        # kvm_create_vm: address space i starts at generation i (kvm_main.c comment)
        self._gen = list(range(nr_as_ids))
        self._by_id: list[dict[int, Memslot]] = [{} for _ in range(nr_as_ids)]
        self._bases: list[list[int]] = [[] for _ in range(nr_as_ids)]
        self._sorted: list[list[Memslot]] = [[] for _ in range(nr_as_ids)]
        self._last: list[Memslot | None] = [None] * nr_as_ids
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.write_tracking_enabled = False
        self.memslots_updated: list[Callable[[int, int], None]] = []
        self._serial = 0
        self._in_flight: PreparedChange | None = None

    # ---------------------------------------------------------------- lookup
    @property
    def generation(self) -> int:
        """Generation of address space 0 (``kvm_memslots(kvm)->generation``)."""
        return self._gen[0]

    def generation_of(self, as_id: int) -> int:
        """Generation of ``as_id``; congruent to ``as_id`` modulo ``nr_as_ids``."""
        return self._gen[as_id]

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """``__gfn_to_memslot``: the slot covering ``gfn`` (INVALID slots included).

        Last-hit cache (``slots->last_used_slot``), then bisect on base gfns.
        """
        last = self._last[as_id]
        if last is not None and last.base_gfn <= gfn < last.end_gfn:
            return last
        i = bisect.bisect_right(self._bases[as_id], gfn) - 1
        if i >= 0:
            slot = self._sorted[as_id][i]
            if gfn < slot.end_gfn:
                self._last[as_id] = slot
                return slot
        return None

    def id_to_memslot(self, as_id: int, id: int) -> Memslot | None:
        """``id_to_memslot``: the slot with ``id`` in ``as_id``, or None."""
        return self._by_id[as_id].get(id)

    def slots(self, as_id: int = 0) -> Iterator[Memslot]:
        """Slots of ``as_id`` in base-gfn order (``kvm_for_each_memslot``)."""
        return iter(list(self._sorted[as_id]))

    def __iter__(self) -> Iterator[Memslot]:
        for as_id in range(self.nr_as_ids):
            yield from self.slots(as_id)

    def all_slots(self) -> list[Memslot]:
        """Every slot of every address space (INVALID ones included)."""
        return list(self)

    def slots_in_gfn_range(self, start: int, end: int, as_id: int = 0) -> list[Memslot]:
        """``kvm_for_each_memslot_in_gfn_range``: slots overlapping ``[start, end)``."""
        bases, srt = self._bases[as_id], self._sorted[as_id]
        i = max(bisect.bisect_right(bases, start) - 1, 0)
        out = []
        while i < len(srt) and srt[i].base_gfn < end:
            if srt[i].end_gfn > start:
                out.append(srt[i])
            i += 1
        return out

    def hva_range_to_gfn_ranges(
        self, hva_start: int, hva_end: int
    ) -> list[tuple[Memslot, int, int]]:
        """(slot, gfn_start, gfn_end) for every slot, every address space, mapping
        part of ``[hva_start, hva_end)``: what ``kvm_handle_hva_range`` iterates
        for an MMU-notifier invalidation (INVALID slots included)."""
        out = []
        for slot in self:
            s_hva = slot.userspace_addr
            e_hva = s_hva + (slot.npages << PAGE_SHIFT)
            lo, hi = max(hva_start, s_hva), min(hva_end, e_hva)
            if lo < hi:
                g0 = slot.base_gfn + ((lo - s_hva) >> PAGE_SHIFT)
                g1 = slot.base_gfn + ((hi - s_hva + PAGE_SIZE - 1) >> PAGE_SHIFT)
                out.append((slot, g0, g1))
        return out

    def gfn_to_hva(self, gfn: int, as_id: int = 0, *, write: bool = False) -> int:
        """``gfn_to_hva``: the hva of ``gfn``; ``KvmError(EFAULT)`` if it has none.

        EFAULT when no slot covers the gfn or the slot is INVALID
        (``KVM_HVA_ERR_BAD``), and for ``write`` to a READONLY slot
        (``KVM_HVA_ERR_RO_BAD``) - ``__gfn_to_hva_many`` in kvm_main.c.
        """
        slot = self.gfn_to_memslot(gfn, as_id)
        if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
            what = "no memslot covers" if slot is None else "the memslot is being changed for"
            raise KvmError(errno.EFAULT, f"{what} gfn {gfn:#x} (address space {as_id})")
        if write and slot.flags & KVM_MEM_READONLY:
            raise KvmError(errno.EFAULT, f"gfn {gfn:#x} is in read-only slot {slot.id}")
        return slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)

    def translate_range(
        self, gpa: int, size: int, *, as_id: int = 0, write: bool = False
    ) -> list[tuple[Memslot, int, int, int]]:
        """Split ``[gpa, gpa+size)`` into per-page ``(slot, gfn, offset, length)``.

        Pages are walked like ``kvm_read_guest``/``kvm_write_guest``
        (``next_segment``); any page without a usable hva raises EFAULT as in
        :meth:`gfn_to_hva`.  ``write`` refuses READONLY slots.
        """
        if size < 0 or gpa < 0:
            raise ValueError(f"translate_range: gpa {gpa:#x} and size {size} must be >= 0")
        out = []
        while size:
            gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            self.gfn_to_hva(gfn, as_id, write=write)
            slot = self.gfn_to_memslot(gfn, as_id)
            assert slot is not None
            out.append((slot, gfn, off, n))
            gpa += n
            size -= n
        return out

    # ------------------------------------------------------------- validation
    def prepare(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        *,
        region2: bool = False,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
        max_gfn: int = (1 << 40) - 1,
        external_page_track_user: bool = False,
        internal: bool = False,
        defer_arch_checks: bool = False,
    ) -> PreparedChange:
        """Validate a ``KVM_SET_USER_MEMORY_REGION(2)`` request; change nothing.

        Runs spec/kvm-mmu.md §1.3 checks 2-16 in order (``KvmError`` with the
        first failing check's errno), then x86 ``kvm_arch_prepare_memory_region``
        (§1.5): MOVE with an external page-track user (KVMGT) -> EINVAL, CREATE
        or MOVE ending above ``max_gfn`` (``kvm_mmu_max_gfn``) -> EINVAL.

        The kernel runs the arch checks *after* invalidating the old slot of a
        MOVE (``kvm_set_memslot``), so a refused MOVE still zaps the slot and
        bumps the generation twice.  ``defer_arch_checks=True`` models that: call
        :meth:`arch_prepare` after :meth:`install_invalid`, and
        :meth:`revert_invalid` if it raises.  ``internal=True`` is
        ``kvm_set_internal_memslot`` (slot >= KVM_USER_MEM_SLOTS, flags 0).
        """
        if self._in_flight is not None:
            raise RuntimeError(
                "a memslot update is in flight (install_invalid without commit); "
                "KVM serialises updates with slots_lock"
            )
        for name, val, top in (
            ("slot", slot, _U32),
            ("flags", flags, _U32),
            ("guest_phys_addr", guest_phys_addr, _U64),
            ("memory_size", memory_size, _U64),
            ("userspace_addr", userspace_addr, _U64),
            ("guest_memfd_offset", guest_memfd_offset, _U64),
            ("guest_memfd", guest_memfd, _U32),
        ):
            if not 0 <= val <= top:
                raise ValueError(f"{name}={val!r} does not fit the UAPI field (0..{top:#x})")

        def fail(check: str, msg: str, err: int = errno.EINVAL) -> KvmError:
            return KvmError(err, f"{msg} (spec/kvm-mmu.md §1.3 check {check})")

        if internal:  # kvm_set_internal_memslot
            if slot < KVM_USER_MEM_SLOTS or flags:
                raise fail(
                    "internal", f"internal slot {slot} needs id >= {KVM_USER_MEM_SLOTS}, flags 0"
                )
        else:
            if not region2 and flags & ~_V1_FLAGS:
                raise fail("2", f"flags {flags:#x} not allowed by KVM_SET_USER_MEMORY_REGION (v1)")
            if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
                raise fail(
                    "3", f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})"
                )
        # check 4: check_memory_region_flags
        valid = KVM_MEM_LOG_DIRTY_PAGES
        if self.supports_gmem:
            valid |= KVM_MEM_GUEST_MEMFD
        gmem = bool(flags & KVM_MEM_GUEST_MEMFD)
        if gmem:
            valid &= ~KVM_MEM_LOG_DIRTY_PAGES
        else:
            valid |= KVM_MEM_READONLY
        if flags & ~valid:
            raise fail("4", f"flags {flags:#x} not in the valid set {valid:#x} for this VM")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if memory_size & (PAGE_SIZE - 1):
            raise fail("5", f"memory_size {memory_size:#x} is not a multiple of 4 KiB")
        if guest_phys_addr & (PAGE_SIZE - 1):
            raise fail("6", f"guest_phys_addr {guest_phys_addr:#x} is not 4 KiB aligned")
        if (
            userspace_addr & (PAGE_SIZE - 1)
            or userspace_addr & LAM_TAG_MASK
            or userspace_addr + memory_size > TASK_SIZE_MAX
        ):
            raise fail(
                "7",
                f"userspace_addr {userspace_addr:#x} must be 4 KiB aligned, untagged, and "
                f"with memory_size {memory_size:#x} end at or below "
                f"TASK_SIZE_MAX {TASK_SIZE_MAX:#x}",
            )
        if gmem and (
            guest_memfd_offset & (PAGE_SIZE - 1) or guest_memfd_offset + memory_size > _U64
        ):
            raise fail("8", f"guest_memfd_offset {guest_memfd_offset:#x} unaligned or overflows")
        if as_id >= self.nr_as_ids or id_ >= KVM_MEM_SLOTS_NUM:
            raise fail(
                "9",
                f"address space {as_id} (allowed < {self.nr_as_ids}) / slot id {id_} "
                f"(allowed < {KVM_MEM_SLOTS_NUM})",
            )
        if guest_phys_addr + memory_size > _U64:
            raise fail("10", f"guest_phys_addr {guest_phys_addr:#x} + memory_size overflows u64")
        npages = memory_size >> PAGE_SHIFT
        if id_ < KVM_USER_MEM_SLOTS and npages > KVM_MEM_MAX_NR_PAGES:
            raise fail("11", f"{npages} pages > KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES})")
        old = self._by_id[as_id].get(id_)
        base_gfn = guest_phys_addr >> PAGE_SHIFT
        serial = self._serial
        if not memory_size:
            if old is None or not old.npages:
                raise fail("12", f"cannot delete slot {as_id}:{id_}: it does not exist")
            if self.nr_memslot_pages < old.npages:
                raise fail("12b", "nr_memslot_pages < old->npages (WARN)", errno.EIO)
            return PreparedChange(
                old, None, MemslotChange.DELETE, as_id, id_, arch_checked=True, serial=serial
            )
        if old is None:
            change = MemslotChange.CREATE
            if self.nr_memslot_pages + npages > _U64:
                raise fail("13", "total memslot pages would overflow unsigned long")
        else:
            if gmem:
                raise fail("14", f"slot {as_id}:{id_} is a guest_memfd slot: delete only")
            if (
                userspace_addr != old.userspace_addr
                or npages != old.npages
                or (flags ^ old.flags) & KVM_MEM_READONLY
            ):
                raise fail(
                    "15",
                    f"slot {as_id}:{id_} exists: only its gpa or LOG_DIRTY_PAGES may change "
                    "(not userspace_addr, size or READONLY)",
                )
            if base_gfn != old.base_gfn:
                change = MemslotChange.MOVE
            elif flags != old.flags:
                change = MemslotChange.FLAGS_ONLY
            else:
                return PreparedChange(old, None, None, as_id, id_, arch_checked=True, serial=serial)
        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            for other in self.slots_in_gfn_range(base_gfn, base_gfn + npages, as_id):
                if other.id != id_:
                    raise fail(
                        "16",
                        f"gfns [{base_gfn:#x}, {base_gfn + npages:#x}) overlap slot "
                        f"{as_id}:{other.id} [{other.base_gfn:#x}, {other.end_gfn:#x})",
                        errno.EEXIST,
                    )
        new = Memslot(id_, as_id, base_gfn, npages, userspace_addr, flags)
        if gmem:
            new.gmem_fd, new.gmem_offset = guest_memfd, guest_memfd_offset
        prepared = PreparedChange(
            old, new, change, as_id, id_, max_gfn, external_page_track_user, serial=serial
        )
        if not defer_arch_checks:
            self.arch_prepare(prepared)
        return prepared

    def arch_prepare(self, prepared: PreparedChange) -> None:
        """x86 ``kvm_arch_prepare_memory_region`` checks (spec/kvm-mmu.md §1.5)."""
        self._check_live(prepared)
        new, change = prepared.new, prepared.change
        if change is MemslotChange.MOVE and prepared.external_page_track_user:
            raise KvmError(
                errno.EINVAL,
                "memslot MOVE refused while an external page-track user (KVMGT) is attached "
                "(spec/kvm-mmu.md §1.5)",
            )
        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            assert new is not None
            last = new.base_gfn + new.npages - 1
            if last > prepared.max_gfn:
                raise KvmError(
                    errno.EINVAL,
                    f"last gfn {last:#x} > kvm_mmu_max_gfn() {prepared.max_gfn:#x} "
                    "(spec/kvm-mmu.md §1.5)",
                )
        prepared.arch_checked = True

    # ---------------------------------------------------------------- commit
    def _check_live(self, prepared: PreparedChange) -> None:
        if prepared.done or prepared.serial != self._serial:
            raise RuntimeError(
                "stale PreparedChange: the memslots changed since prepare(), or it was "
                "already committed or reverted"
            )

    def _replace(self, as_id: int, old: Memslot | None, new: Memslot | None) -> None:
        """``kvm_replace_memslot``: swap ``old`` for ``new`` in the lookup structures."""
        bases, srt, by_id = self._bases[as_id], self._sorted[as_id], self._by_id[as_id]
        if old is not None:
            i = bisect.bisect_left(bases, old.base_gfn)
            assert srt[i] is old
            del bases[i], srt[i]
            del by_id[old.id]
        if new is not None:
            i = bisect.bisect_left(bases, new.base_gfn)
            bases.insert(i, new.base_gfn)
            srt.insert(i, new)
            by_id[new.id] = new
        if self._last[as_id] is old:
            self._last[as_id] = new

    def _swap(self, as_id: int, old: Memslot | None, new: Memslot | None) -> None:
        """``kvm_swap_active_memslots`` (spec/kvm-mmu.md §1.4).

        The set becomes visible with ``gen | IN_PROGRESS``; then
        ``gen = (gen & ~IN_PROGRESS) + nr_as_ids``; ``memslots_updated``
        callbacks (``kvm_arch_memslots_updated``) run with the new value while
        the stored generation still has IN_PROGRESS; then it is stored.
        """
        gen = self._gen[as_id]
        assert not gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        self._gen[as_id] = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        self._replace(as_id, old, new)
        gen += self.nr_as_ids
        for cb in list(self.memslots_updated):
            cb(as_id, gen)
        self._gen[as_id] = gen

    def install_invalid(self, prepared: PreparedChange) -> Memslot:
        """First half of ``kvm_set_memslot`` for DELETE/MOVE (``kvm_invalidate_memslot``).

        An INVALID copy of ``old`` (sharing its bitmap and metadata) replaces it;
        faults on it now RETRY.  The generation bumps.  Returns the INVALID slot.
        """
        self._check_live(prepared)
        if prepared.change not in (MemslotChange.DELETE, MemslotChange.MOVE):
            raise ValueError(f"install_invalid is for DELETE/MOVE, not {prepared.change}")
        if prepared.invalid is not None:
            raise ValueError("install_invalid already ran for this change")
        old = prepared.old
        assert old is not None
        inv = Memslot(
            old.id, old.as_id, old.base_gfn, old.npages, old.userspace_addr,
            old.flags | KVM_MEMSLOT_INVALID, old.dirty_bitmap, old.gfn_write_track,
            old.lpage_info, old.gmem_fd, old.gmem_offset,
        )  # fmt: skip
        self._swap(prepared.as_id, old, inv)
        prepared.invalid = inv
        self._in_flight = prepared
        return inv

    def revert_invalid(self, prepared: PreparedChange) -> None:
        """Undo :meth:`install_invalid` after a failed :meth:`arch_prepare`.

        ``kvm_set_memslot``'s error path: ``kvm_activate_memslot(invalid, old)``
        swaps the old slot back, bumping the generation once more.
        """
        if prepared.invalid is None or prepared.done:
            raise ValueError("revert_invalid needs a change with install_invalid done")
        self._swap(prepared.as_id, prepared.invalid, prepared.old)
        prepared.done = True
        self._in_flight = None
        self._serial += 1

    def commit(self, prepared: PreparedChange) -> Memslot | None:
        """Install the change (second half of ``kvm_set_memslot``); return the new slot.

        Metadata is fresh on CREATE and MOVE, carried over on FLAGS_ONLY
        (spec/kvm-mmu.md §1.5); the dirty bitmap follows
        ``kvm_prepare_memory_region`` (§1.4): None without LOG_DIRTY_PAGES,
        the old one if the old slot had one, else a new one.  DELETE returns None;
        a no-op returns the unchanged slot.
        """
        change, old, new, as_id = prepared.change, prepared.old, prepared.new, prepared.as_id
        if change is None:
            return old
        if prepared.invalid is None:
            self._check_live(prepared)
        elif prepared.done:
            raise RuntimeError("this PreparedChange was already committed or reverted")
        if not prepared.arch_checked:
            raise ValueError("arch_prepare() must run before commit() (defer_arch_checks=True)")
        if change in (MemslotChange.DELETE, MemslotChange.MOVE) and prepared.invalid is None:
            raise ValueError(
                f"install_invalid() must run before commit() for {change.name} "
                "(kvm_set_memslot invalidates the old slot first)"
            )
        if new is not None:
            if change is MemslotChange.FLAGS_ONLY:
                assert old is not None
                new.lpage_info, new.gfn_write_track = old.lpage_info, old.gfn_write_track
            else:  # kvm_alloc_memslot_metadata
                new.lpage_info = alloc_lpage_info(new.base_gfn, new.npages, new.userspace_addr)
                new.gfn_write_track = (
                    np.zeros(new.npages, dtype=_WT_DTYPE)
                    if self.write_tracking_enabled
                    else _no_write_track(new.npages)
                )
            if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
                new.dirty_bitmap = None
            elif old is not None and old.dirty_bitmap is not None:
                new.dirty_bitmap = old.dirty_bitmap
            else:
                new.dirty_bitmap = _dl.alloc_dirty_bitmap(
                    new.npages,
                    initially_set=self.manual_dirty_log_protect and self.dirty_log_initially_set,
                )
        self._swap(as_id, prepared.invalid if prepared.invalid is not None else old, new)
        # kvm_commit_memory_region
        if change is MemslotChange.DELETE:
            assert old is not None
            self.nr_memslot_pages -= old.npages
        elif change is MemslotChange.CREATE:
            assert new is not None
            self.nr_memslot_pages += new.npages
        old_flags = old.flags if old is not None else 0
        new_flags = new.flags if new is not None else 0
        if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
            self.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
        prepared.done = True
        self._in_flight = None
        self._serial += 1
        return new

    def set_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        **kw: object,
    ) -> Memslot | None:
        """prepare + install_invalid + commit in one step, with no MMU to zap.

        For tests and tools that have no VM; ``kw`` goes to :meth:`prepare`.
        """  # fmt: skip
        prepared = self.prepare(slot, flags, guest_phys_addr, memory_size, userspace_addr, **kw)  # type: ignore[arg-type]
        if prepared.change in (MemslotChange.DELETE, MemslotChange.MOVE):
            self.install_invalid(prepared)
        return self.commit(prepared)

    # -------------------------------------------------------- write tracking
    def enable_write_tracking(self) -> None:
        """Allocate write-track counts for every slot, now and later.

        ``kvm_page_track_write_tracking_alloc``: done once, when shadow paging
        or an external page-track user (KVMGT) needs it.  Idempotent.
        """
        self.write_tracking_enabled = True
        for slot in self:
            if not slot.gfn_write_track.flags.writeable:
                slot.gfn_write_track = np.zeros(slot.npages, dtype=_WT_DTYPE)
        inflight = self._in_flight
        if inflight is not None and inflight.old is not None and inflight.invalid is not None:
            inflight.old.gfn_write_track = inflight.invalid.gfn_write_track
