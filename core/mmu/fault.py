"""The TDP page-fault path, written as a generator of lock-boundary steps.

``kvm_mmu_page_fault`` -> ``kvm_mmu_do_page_fault`` -> ``kvm_tdp_page_fault``
-> ``kvm_tdp_mmu_page_fault`` (``arch/x86/kvm/mmu/mmu.c``, ``tdp_mmu.c``;
spec/kvm-mmu.md §3.2–3.6, §3.9–3.12). :meth:`FaultMixin.page_fault_steps`
yields a step name where the kernel snapshots ``mmu_invalidate_seq``
(``"mmu_seq"``), after ``__kvm_faultin_pfn`` got the pfn (``"faultin_pfn"``)
and right before it takes ``mmu_lock`` (``"mmu_lock"``; everything after runs
under the lock, atomically). A race explorer interleaves host invalidations
at those points; :meth:`FaultMixin.page_fault` drives the generator through.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from kvmmu import spte as S
from kvmmu.errors import KvmError
from kvmmu.mmu.tdp import Root, TdpBase

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot

__all__ = [
    "PFERR_FETCH_MASK",
    "PFERR_GUEST_FINAL_MASK",
    "PFERR_GUEST_PAGE_MASK",
    "PFERR_PRESENT_MASK",
    "PFERR_RSVD_MASK",
    "PFERR_USER_MASK",
    "PFERR_WRITE_MASK",
    "PTE_PREFETCH_NUM",
    "RET_PF_CONTINUE",
    "RET_PF_EMULATE",
    "RET_PF_FIXED",
    "RET_PF_INVALID",
    "RET_PF_NAMES",
    "RET_PF_RETRY",
    "RET_PF_SPURIOUS",
    "FaultMixin",
    "PageFault",
]

#: ``RET_PF_*`` (mmu_internal.h; spec/kvm-mmu.md §3.3).
RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_INVALID = 3
RET_PF_FIXED = 4
RET_PF_SPURIOUS = 5
RET_PF_NAMES = {0: "CONTINUE", 1: "RETRY", 2: "EMULATE", 3: "INVALID", 4: "FIXED", 5: "SPURIOUS"}

#: Page-fault error-code bits (kvm_host.h; spec/kvm-mmu.md §3.1).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
#: ``PTE_PREFETCH_NUM``: the prefetch window (spec/kvm-mmu.md §3.9).
PTE_PREFETCH_NUM = 8

_PS = S.PT_PAGE_SIZE_MASK
_W = S.PT_WRITABLE_MASK
_ADDR = S.SPTE_BASE_ADDR_MASK
_NOSLOT = -1
#: Internal: ``__kvm_faultin_pfn`` got a pfn (the "faultin_pfn" point follows).
_PFN_READY = -1
_RET_PF_STAT = {r: "ret_pf." + name for r, name in RET_PF_NAMES.items()}


class PageFault:
    """``struct kvm_page_fault`` (mmu_internal.h; spec/kvm-mmu.md §3.3)."""

    __slots__ = (
        "addr",
        "as_id",
        "error_code",
        "exec",
        "gfn",
        "goal_level",
        "huge_page_disallowed",
        "map_writable",
        "max_level",
        "mmu_seq",
        "pfn",
        "prefetch",
        "present",
        "req_level",
        "rsvd",
        "slot",
        "user",
        "vcpu",
        "write",
    )

    def __init__(self, vcpu: Any, addr: int, error_code: int, prefetch: bool, max_level: int):
        self.vcpu = vcpu
        self.addr = addr
        self.error_code = error_code
        self.prefetch = prefetch
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.present = bool(error_code & PFERR_PRESENT_MASK)
        self.rsvd = bool(error_code & PFERR_RSVD_MASK)
        self.user = bool(error_code & PFERR_USER_MASK)
        self.gfn = addr >> S.PAGE_SHIFT
        self.slot: Memslot | None = None
        self.max_level = max_level
        self.req_level = S.PG_LEVEL_4K
        self.goal_level = S.PG_LEVEL_4K
        self.huge_page_disallowed = False
        self.mmu_seq = 0
        self.pfn = _NOSLOT
        self.map_writable = False
        self.as_id = 0


FaultSteps = Generator[str, None, int]


class FaultMixin(TdpBase):
    """The fault path of :class:`kvmmu.mmu.TdpMmu`."""

    #: ``fault.goal_level`` of the last fault (``kvm_mmu_do_page_fault``'s
    #: ``level`` out-parameter).
    last_goal_level: int = S.PG_LEVEL_4K

    # ----------------------------------------------------------- entry points
    #
    # The fault is four step functions separated by the three points where the
    # kernel can be interleaved: _pf_start | "mmu_seq" | _pf_faultin |
    # "faultin_pfn" | _pf_recheck | "mmu_lock" | _pf_locked, then _pf_finish.
    # page_fault_steps drives them as a generator (yielding at those points);
    # page_fault drives the very same functions without yielding, for callers
    # that never interleave (vCPU faults, IOPFs, pre-fault).

    def page_fault(
        self, vcpu: Any, gpa: int, error_code: int, *, prefetch: bool = False, as_id: int = 0
    ) -> int:
        """``kvm_mmu_page_fault`` for TDP: returns ``RET_PF_*`` or raises KvmError.

        The steps of :meth:`page_fault_steps`, run back to back.
        """
        try:
            f, root, r = self._pf_start(vcpu, gpa, error_code, prefetch, as_id)
            if f is not None and r == RET_PF_CONTINUE:
                r = self._pf_faultin(f)
                if r == _PFN_READY:
                    r = self._pf_recheck(f)
                if r == RET_PF_CONTINUE:
                    r = self._pf_locked(f, root)
            return self._pf_finish(f, r)
        except KvmError as e:
            self._count_error(e)
            raise

    def page_fault_steps(
        self, vcpu: Any, gpa: int, error_code: int, *, prefetch: bool = False, as_id: int = 0
    ) -> FaultSteps:
        """The fault as a generator; its return value is the ``RET_PF_*`` code.

        Yields ``"mmu_seq"`` after ``mmu_invalidate_seq`` is read,
        ``"faultin_pfn"`` after ``__kvm_faultin_pfn`` got a pfn, and
        ``"mmu_lock"`` right before ``mmu_lock`` is taken.
        """
        try:
            f, root, r = self._pf_start(vcpu, gpa, error_code, prefetch, as_id)
            if f is not None and r == RET_PF_CONTINUE:
                yield "mmu_seq"
                r = self._pf_faultin(f)
                if r == _PFN_READY:
                    yield "faultin_pfn"
                    r = self._pf_recheck(f)
                if r == RET_PF_CONTINUE:
                    yield "mmu_lock"
                    r = self._pf_locked(f, root)
            return self._pf_finish(f, r)
        except KvmError as e:
            self._count_error(e)
            raise

    def _count_error(self, e: KvmError) -> None:
        self.vm.stats["ret_pf." + errno.errorcode.get(e.errno, str(e.errno))] += 1

    # ------------------------------------------------------------ the steps
    def _pf_start(
        self, vcpu: Any, gpa: int, error_code: int, prefetch: bool, as_id: int
    ) -> tuple[PageFault | None, Root, int]:
        """Up to the ``mmu_invalidate_seq`` snapshot.

        ``kvm_mmu_reload`` (the fault runs on the vCPU's root), the RSVD ->
        ``handle_mmio_page_fault`` path of ``kvm_mmu_page_fault``, then
        ``kvm_mmu_do_page_fault`` -> ``kvm_tdp_page_fault`` up to
        ``kvm_mmu_faultin_pfn`` reading ``mmu_invalidate_seq`` (spec/kvm-mmu.md
        §3.2-3.5). Returns ``(fault, root, RET_PF_CONTINUE)`` to go on, or a
        final code (``fault`` None when no fault was built).
        """
        root = self.vcpu_root(vcpu, as_id)
        if error_code & PFERR_RSVD_MASK:
            r = self.handle_mmio_page_fault(vcpu, gpa, root)
            if r != RET_PF_INVALID:
                return None, root, r
        # kvm_mmu_do_page_fault: build the fault, count pf_taken.
        f = PageFault(vcpu, gpa, error_code & 0xFFFFFFFF, prefetch, self.max_huge_page_level)
        f.as_id = root.as_id
        vm = self.vm
        f.slot = vm.memslots.gfn_to_memslot(f.gfn, root.as_id)
        if not prefetch:
            vm.stats["pf_taken"] += 1
        # kvm_tdp_page_fault (§3.4 step 1): the vendor lowers max_level for
        # guest-MTRR consistency in the eras that honoured guest MTRRs.
        lvl = vm.hooks.max_mapping_level(vcpu, f.gfn, f.max_level)
        if lvl is not None and lvl < f.max_level:
            f.max_level = lvl
        # page_fault_handle_page_track (spec/kvm-mmu.md §2.3 item 4).
        if f.present and f.write and not f.rsvd and vm.page_track.is_write_tracked(f.slot, f.gfn):
            return f, root, RET_PF_EMULATE
        r = self.fast_page_fault(f, root)
        if r != RET_PF_INVALID:
            return f, root, r
        # kvm_mmu_faultin_pfn: snapshot the invalidation sequence (§3.5).
        f.mmu_seq = self.invalidate.seq
        return f, root, RET_PF_CONTINUE

    def _pf_faultin(self, f: PageFault) -> int:
        """``__kvm_faultin_pfn`` after the sequence snapshot (spec/kvm-mmu.md §3.5).

        Returns ``_PFN_READY`` when a pfn was obtained (the caller then
        rechecks the sequence), ``RET_PF_CONTINUE`` for a no-slot fault that
        goes on to install an MMIO SPTE, or a final code.
        """
        slot = f.slot
        if slot is None:
            return self._handle_noslot_fault(f)
        if slot.is_invalid:
            # A slot being deleted/moved: retry so its SPTEs are zapped first;
            # a prefault punts -EAGAIN (no forward-progress guarantee).
            if f.prefetch:
                raise KvmError(errno.EAGAIN, f"gfn {f.gfn:#x} hit a memslot being changed")
            return RET_PF_RETRY
        if self.retry_check and self.invalidate.retry_gfn_unsafe(f.mmu_seq, f.gfn):
            return RET_PF_RETRY
        # __kvm_faultin_pfn -> __gfn_to_pfn_memslot -> hva_to_pfn
        if f.write and slot.is_readonly:
            # KVM_PFN_ERR_RO_FAULT: emulate, and do not cache it as MMIO.
            return RET_PF_EMULATE
        hva = slot.gfn_to_hva(f.gfn)
        host = self.vm.host
        try:
            f.pfn = host.hva_to_pfn(hva, write=f.write)
        except KvmError as e:
            # KVM_PFN_ERR_FAULT -> kvm_handle_error_pfn -> -EFAULT
            raise KvmError(errno.EFAULT, f"gfn {f.gfn:#x}: {e.message}") from e
        if f.write:
            f.map_writable = True
        elif slot.is_readonly:
            f.map_writable = False
        else:
            # A read fault maps writable when the host page is writable
            # (hva_to_pfn tries FOLL_WRITE first; no CoW in the host model).
            vma = host.find_vma(hva)
            f.map_writable = vma is not None and bool(vma.writable)
        return _PFN_READY

    def _pf_recheck(self, f: PageFault) -> int:
        """``mmu_invalidate_retry_gfn_unsafe`` after the pfn (lockless, §3.5)."""
        if self.retry_check and self.invalidate.retry_gfn_unsafe(f.mmu_seq, f.gfn):
            return RET_PF_RETRY
        return RET_PF_CONTINUE

    def _pf_locked(self, f: PageFault, root: Root) -> int:
        """Under ``mmu_lock``: ``is_page_fault_stale``, then ``kvm_tdp_mmu_map``."""
        if self._is_page_fault_stale(f, root):
            return RET_PF_RETRY
        return self._tdp_mmu_map(f, root)

    def _pf_finish(self, f: PageFault | None, r: int) -> int:
        """Count ``pf_*`` (``kvm_mmu_do_page_fault``) and ``ret_pf.*``; a
        ``RET_PF_INVALID`` from the fault path is a KVM bug (-EIO)."""
        stats = self.vm.stats
        # kvm_mmu_do_page_fault reports fault.goal_level to kvm_tdp_map_page
        # (KVM_PRE_FAULT_MEMORY progress, kvm-mmu-2.md §6 step 5).
        self.last_goal_level = S.PG_LEVEL_4K if f is None else f.goal_level
        if f is not None:
            if r == RET_PF_FIXED:
                stats["pf_fixed"] += 1
            elif f.prefetch:
                pass
            elif r == RET_PF_EMULATE:
                stats["pf_emulate"] += 1
            elif r == RET_PF_SPURIOUS:
                stats["pf_spurious"] += 1
            elif r == RET_PF_RETRY:
                stats["pf_retry"] += 1
            if r == RET_PF_INVALID:
                raise KvmError(errno.EIO, "RET_PF_INVALID from kvm_mmu_do_page_fault (KVM_BUG)")
        stats[_RET_PF_STAT[r]] += 1
        return r

    # ---------------------------------------------------------- kvm_faultin_pfn
    def _handle_noslot_fault(self, f: PageFault) -> int:
        """``kvm_handle_noslot_fault`` (spec/kvm-mmu.md §3.5)."""
        self._cache_mmio_info(f.vcpu, f.gfn, S.ACC_ALL & self.fmt.mmio_access_mask)
        if not self.fmt.mmio_caching:
            return RET_PF_EMULATE
        if f.gfn > self.max_gfn:
            return RET_PF_EMULATE
        f.pfn = _NOSLOT
        return RET_PF_CONTINUE

    def _is_page_fault_stale(self, f: PageFault, root: Root) -> bool:
        """``is_page_fault_stale``: obsolete root, or ``mmu_invalidate_retry_gfn``."""
        if root.invalid:
            return True
        if f.slot is None or not self.retry_check:
            return False
        return self.invalidate.retry_gfn(f.mmu_seq, f.gfn)

    # ------------------------------------------------------------ MMIO faults
    def _cache_mmio_info(self, vcpu: Any, gfn: int, access: int) -> None:
        """``vcpu_cache_mmio_info``: skipped while a memslot update is in progress."""
        if vcpu is None:
            return
        gen = self.vm.memslots.generation
        if gen & S.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return
        self._mmio_cache[id(vcpu)] = (vcpu, gfn, access, gen)

    def mmio_info_in_cache(self, vcpu: Any, gpa: int) -> bool:
        """``mmio_info_in_cache`` for a direct MMU (``vcpu_match_mmio_gpa``)."""
        if vcpu is None:
            return False
        entry = self._mmio_cache.get(id(vcpu))
        if entry is None:
            return False
        _, gfn, _, gen = entry
        return gen == self.vm.memslots.generation and gfn != 0 and gfn == gpa >> S.PAGE_SHIFT

    def _last_spte(self, root: Root, gfn: int) -> tuple[int, int, int, int]:
        """Walk to the last SPTE for ``gfn``: ``(table, index, level, spte)``."""
        data = self.pool.data
        idx = root.idx
        level = self.root_level
        while True:
            i = (gfn >> (9 * (level - 1))) & 511
            spte = int(data[idx, i])
            if not spte & self.mmu_present or level == 1 or spte & _PS:
                return idx, i, level, spte
            idx = ((spte & _ADDR) >> 12) - self._pfn_base
            level -= 1

    def handle_mmio_page_fault(self, vcpu: Any, gpa: int, root: Root) -> int:
        """``handle_mmio_page_fault`` (spec/kvm-mmu.md §3.10)."""
        if self.mmio_info_in_cache(vcpu, gpa):
            return RET_PF_EMULATE
        _, _, _, spte = self._last_spte(root, gpa >> S.PAGE_SHIFT)
        if spte & self.mmu_present and spte & self.fmt.rsvd_mask:
            # get_mmio_spte: reserved bits on an MMU-present (non-MMIO) SPTE
            # are a KVM bug: WARN, -EINVAL (spec/kvm-mmu.md §3.10).
            raise KvmError(errno.EINVAL, f"reserved bits set on MMU-present spte {spte:#x}")
        if S.is_mmio_spte(self.fmt, spte):
            # check_mmio_spte reads kvm_vcpu_memslots(vcpu)->generation: the
            # generation of the vCPU's address space (SMM: as_id 1), while the
            # MMIO cache uses kvm_memslots(kvm), i.e. as_id 0 (§3.10).
            gen = self.vm.memslots.generation_of(root.as_id)
            if not S.check_mmio_spte(spte, gen, self.fmt.mmio_gen_layout):
                return RET_PF_INVALID
            self._cache_mmio_info(
                vcpu,
                S.get_mmio_spte_gfn(spte, self.host_maxphyaddr),
                S.get_mmio_spte_access(self.fmt, spte),
            )
            return RET_PF_EMULATE
        return RET_PF_RETRY

    # -------------------------------------------------------- fast page fault
    def fast_page_fault(self, f: PageFault, root: Root) -> int:
        """``fast_page_fault`` (lockless; spec/kvm-mmu.md §3.11)."""
        fmt = self.fmt
        if f.rsvd:
            return RET_PF_INVALID
        if not f.present:
            if fmt.ad_enabled:
                return RET_PF_INVALID
        elif not f.write:
            return RET_PF_INVALID
        idx, i, level, spte = self._last_spte(root, f.gfn)
        ret = RET_PF_INVALID
        if spte & self.mmu_present and (level == 1 or spte & _PS):
            if S.is_access_allowed(fmt, spte, write=f.write, exec_=f.exec):
                ret = RET_PF_SPURIOUS
            else:
                new = spte
                if self.ad_disabled and S.is_access_track_spte(fmt, spte):
                    new = S.restore_acc_track_spte(new) | fmt.accessed_mask
                blocked = False
                if f.write and spte & fmt.mmu_writable_mask:
                    new |= _W
                    # Only the first 4K would be logged: huge pages go slow.
                    blocked = level > 1 and f.slot is not None and f.slot.logs_dirty
                if (
                    not blocked
                    and new != spte
                    and S.is_access_allowed(fmt, new, write=f.write, exec_=f.exec)
                ):
                    self.pool.data[idx, i] = new
                    if new & _W and not spte & _W and f.slot is not None:
                        self.vm.memslots.mark_page_dirty(f.slot, f.gfn)
                    ret = RET_PF_FIXED
        if ret != RET_PF_INVALID:
            self.vm.stats["pf_fast"] += 1
        return ret

    # ---------------------------------------------------------- level choice
    def hugepage_adjust(self, f: PageFault) -> None:
        """``kvm_mmu_hugepage_adjust`` (spec/kvm-mmu.md §3.6, kvm-mmu-2.md §5)."""
        f.huge_page_disallowed = f.exec and self.nx_huge_pages
        if f.max_level == S.PG_LEVEL_4K or f.slot is None or f.pfn == _NOSLOT:
            return
        if f.slot.logs_dirty:
            return
        f.req_level = self.max_mapping_level(f.slot, f.gfn, f.max_level)
        if f.req_level == S.PG_LEVEL_4K or f.huge_page_disallowed:
            return
        f.goal_level = f.req_level
        f.pfn &= ~(S.KVM_PAGES_PER_HPAGE(f.goal_level) - 1)

    def _disallowed_hugepage_adjust(self, f: PageFault, spte: int, level: int) -> None:
        """``disallowed_hugepage_adjust``: stay below an NX-split child table."""
        if (
            level > 1
            and level == f.goal_level
            and spte & self.mmu_present
            and not spte & _PS
            and self.pool.nx_disallowed[((spte & _ADDR) >> 12) - self._pfn_base]
        ):
            page_mask = S.KVM_PAGES_PER_HPAGE(level) - S.KVM_PAGES_PER_HPAGE(level - 1)
            f.pfn |= f.gfn & page_mask
            f.goal_level -= 1

    # ------------------------------------------------------------------- map
    def _tdp_mmu_map(self, f: PageFault, root: Root) -> int:
        """``kvm_tdp_mmu_map``: walk down, link or split tables, set the leaf."""
        self.hugepage_adjust(f)
        pool = self.pool
        data = pool.data
        present = self.mmu_present
        pfn_base = self._pfn_base
        idx = root.idx
        level = self.root_level
        gfn = f.gfn
        nx = self.nx_huge_pages
        while True:
            i = (gfn >> (9 * (level - 1))) & 511
            spte = data.item(idx, i)
            if nx:
                self._disallowed_hugepage_adjust(f, spte, level)
            if level == f.goal_level:
                r = self._map_handle_target_level(f, idx, i, level, spte)
                if r != RET_PF_SPURIOUS and not self.tdp_mmu_enabled and level == 1:
                    # direct_map: prefetch after anything but SPURIOUS.
                    self.direct_pte_prefetch(f, idx, i)
                return r
            if spte & present and not spte & _PS:
                idx = ((spte & _ADDR) >> 12) - pfn_base
                level -= 1
                continue
            if spte & present:
                child = self.split_huge_page(idx, i, level, spte, f.huge_page_disallowed)
            else:
                child = self.link_sp(idx, i, level - 1, gfn & ~(S.KVM_PAGES_PER_HPAGE(level) - 1))
                pool.nx_disallowed[child] = f.huge_page_disallowed
            data = pool.data  # the pool may have grown
            if f.huge_page_disallowed and f.req_level >= level:
                # track_possible_nx_huge_page
                self.possible_nx_huge_pages.add(child)
                self.vm.stats["nx_lpage_splits"] = len(self.possible_nx_huge_pages)
            idx = child
            level -= 1

    def _map_handle_target_level(self, f: PageFault, idx: int, i: int, level: int, old: int) -> int:
        """``tdp_mmu_map_handle_target_level`` (tdp_mmu.c; spec/kvm-mmu.md §3.14)."""
        fmt = self.fmt
        vm = self.vm
        old_present = bool(old & self.mmu_present)
        old_last = level == 1 or bool(old & _PS)
        if f.prefetch and old_present:
            return RET_PF_SPURIOUS
        if old_present and old_last and S.is_access_allowed(fmt, old, write=f.write, exec_=f.exec):
            return RET_PF_SPURIOUS
        gfn = f.gfn & ~(S.KVM_PAGES_PER_HPAGE(level) - 1)
        slot = f.slot
        wrprot = False
        if slot is None:
            # make_mmio_spte: kvm_vcpu_memslots(vcpu)->generation (§3.10)
            new = S.make_mmio_spte(fmt, gfn, S.ACC_ALL, vm.memslots.generation_of(f.as_id))
        else:
            pfn = f.pfn
            prefetch = f.prefetch
            new, wrprot = S.make_spte(
                fmt,
                level=level,
                pfn=pfn,
                old_spte=old,
                pte_access=S.ACC_ALL,
                prefetch=prefetch,
                synchronizing=False,
                host_writable=f.map_writable,
                mt_mask=vm.hooks.get_mt_mask(f.vcpu, gfn, vm.host.is_mmio_pfn(pfn)),
                nx_huge_pages=self.nx_huge_pages,
                ad_disabled=self.ad_disabled,
                try_unsync=lambda: self.try_unsync(slot, gfn, True, prefetch),
            )
            if new & _W and slot.logs_dirty:
                vm.memslots.mark_page_dirty(slot, gfn)
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            self.pool.data[idx, i] = new
            if old_present and not old_last:
                # A huge leaf replaced a table: free it and flush its range.
                self.free_subtree(((old & _ADDR) >> 12) - self._pfn_base)
                self.flush_range((gfn, gfn + S.KVM_PAGES_PER_HPAGE(level)))
            elif old_present and (
                S.spte_to_pfn(old) != S.spte_to_pfn(new) or (old & _W and not new & _W)
            ):
                # leaf_spte_change_needs_tlb_flush (KVM WARNs; flush anyway)
                self.flush_range((gfn, gfn + S.KVM_PAGES_PER_HPAGE(level)))
        if wrprot and f.write:
            ret = RET_PF_EMULATE
        if slot is None:
            vm.stats["pf_mmio_spte_created"] += 1
            ret = RET_PF_EMULATE
        return ret

    # --------------------------------------------------------------- prefetch
    def direct_pte_prefetch(self, f: PageFault, idx: int, fault_i: int) -> None:
        """``direct_pte_prefetch`` (legacy direct MMU only; spec/kvm-mmu.md §3.9).

        Skipped with A/D disabled, above 4K, or while an invalidation is in
        progress. Runs of non-present SPTEs in the 8-aligned window (the
        faulting one excluded) are mapped from already-present, writable host
        pages (``gfn_to_page_many_atomic``), as prefetched SPTEs.
        """
        if self.ad_disabled or self.invalidate.in_progress:
            return
        data = self.pool.data
        start = fault_i & ~(PTE_PREFETCH_NUM - 1)
        run: list[int] = []
        for i in range(start, start + PTE_PREFETCH_NUM):
            if i == fault_i or int(data[idx, i]) & self.mmu_present:
                if run:
                    if not self._prefetch_many(f, idx, run):
                        return
                    run = []
            else:
                run.append(i)
        if run:
            self._prefetch_many(f, idx, run)

    def _prefetch_many(self, f: PageFault, idx: int, run: list[int]) -> bool:
        """``direct_pte_prefetch_many``: False (-1) stops the window scan.

        ``gfn_to_page_many_atomic`` pins a prefix of the run; when it pins
        nothing (``ret <= 0``) the kernel returns -1 and the scan of the
        window ends (spec/kvm-mmu.md §3.9).
        """
        vm = self.vm
        host = vm.host
        base_gfn = int(self.pool.gfn[idx])
        gfn0 = base_gfn + run[0]
        slot = vm.memslots.gfn_to_memslot(gfn0, f.as_id)
        # gfn_to_memslot_dirty_bitmap(no_dirty_log = access & W): ACC_ALL has W.
        if slot is None or slot.is_invalid or slot.logs_dirty:
            return False
        if slot.is_readonly or gfn0 + len(run) > slot.end_gfn:
            # gfn_to_hva_many(write) fails, or the run leaves the slot: -1.
            return False
        fmt = self.fmt
        for n, i in enumerate(run):
            gfn = gfn0 + n
            hva = slot.gfn_to_hva(gfn)
            vma = host.find_vma(hva)
            # get_user_pages_fast_only(FOLL_WRITE): present, writable, not PFNMAP.
            if vma is None or vma.mmio or not vma.writable or not host.is_populated(hva):
                if n == 0:
                    return False  # ret == 0: -1, stop scanning the window
                break
            pfn = host.hva_to_pfn(hva, write=True)
            tracked = self.try_unsync(slot, gfn, True, True)
            new, _ = S.make_spte(
                fmt,
                level=1,
                pfn=pfn,
                old_spte=0,
                pte_access=S.ACC_ALL,
                prefetch=True,
                synchronizing=False,
                host_writable=True,
                mt_mask=vm.hooks.get_mt_mask(f.vcpu, gfn, host.is_mmio_pfn(pfn)),
                nx_huge_pages=self.nx_huge_pages,
                ad_disabled=self.ad_disabled,
                try_unsync=_const(tracked),
            )
            self.pool.data[idx, i] = new
            vm.stats["pte_prefetch"] += 1
        return True


def _const(value: int) -> Callable[[], int]:
    """A ``try_unsync`` callback whose answer is already known."""
    return lambda: value
