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

The checks of step 1 are :func:`kvmmu.memslot_checks.check_memory_region`
(with guest_memfd, ``supports_gmem``, and the platform choices they fix);
one slot and the UAPI constants are :mod:`kvmmu.memory_slot`, lookups
:mod:`kvmmu.memslot_lookup`, dirty logging :mod:`kvmmu.dirty_log`.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable

import numpy as np
from kvmmu import dirty_log as _dl
from kvmmu.dirty_log import DirtyLogMixin
from kvmmu.errors import KvmError
from kvmmu.lpage import alloc_lpage_info
from kvmmu.memory_slot import (
    _WT_DTYPE,
    KVM_ADDRESS_SPACE_NUM,
    KVM_INTERNAL_MEM_SLOTS,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_USER_MEM_SLOTS,
    LAM_TAG_MASK,
    TASK_SIZE_MAX,
    Memslot,
    MemslotChange,
    PreparedChange,
    _no_write_track,
)
from kvmmu.memory_slot import PAGE_SHIFT as PAGE_SHIFT  # re-exported, as before the split
from kvmmu.memory_slot import PAGE_SIZE as PAGE_SIZE
from kvmmu.memslot_checks import check_memory_region
from kvmmu.memslot_lookup import MemslotLookupMixin

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


class Memslots(MemslotLookupMixin, DirtyLogMixin):
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
        prepared = check_memory_region(
            self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
            region2=region2, guest_memfd=guest_memfd, guest_memfd_offset=guest_memfd_offset,
            max_gfn=max_gfn, external_page_track_user=external_page_track_user,
            internal=internal,
        )  # fmt: skip
        if not prepared.arch_checked and not defer_arch_checks:
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
                new.lpage_info = alloc_lpage_info(
                    new.base_gfn,
                    new.npages,
                    new.userspace_addr,
                    new.gmem_offset >> PAGE_SHIFT if new.flags & KVM_MEM_GUEST_MEMFD else None,
                )
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
