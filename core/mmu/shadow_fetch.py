"""``FNAME(page_fault)`` and ``FNAME(fetch)`` as a generator of steps.

``arch/x86/kvm/mmu/paging_tmpl.h`` (spec/kvm-mmu.md §3.7–3.9). The guest
walk runs without ``mmu_lock``; the fetch runs under it.
:meth:`ShadowFetch.page_fault_steps` yields a :class:`FaultStep`:

* ``"walk"`` - the guest walk is done, the lock is not held: the window of
  the 2010 race, where another vCPU may rewrite a gPTE (and, if that table is
  shadowed, have the write emulated and the shadow entry zapped at once);
* ``"sp"`` (one per shadow level) - fetch has found or created the shadow
  page for the next guest table (write-protecting it) and has not yet re-read
  the gPTE (``gpte_changed``) nor linked it;
* ``"install"`` - right before ``mmu_set_spte`` of the leaf.

From ``"sp"`` on the fault holds ``mmu_lock``: a guest write by another vCPU
lands in guest memory at once (the emulator writes before it takes the lock)
but its ``kvm_mmu_track_write`` waits until the fault ends; anything else that
needs the lock raises :class:`~kvmmu.mmu.shadow_page.MmuLockContended`.

``vm.config.gpte_recheck``: ``"fixed"`` re-checks the top-level gPTE and,
at each level, the gPTE of the table just write-protected; ``"level1"``
keeps the pre-2010 behaviour, re-checking only the leaf gPTE (seed 004).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmmu import paging
from kvmmu import spte as S
from kvmmu.errors import KvmError
from kvmmu.mmu.fault import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PTE_PREFETCH_NUM,
    RET_PF_EMULATE,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
)
from kvmmu.mmu.shadow_page import MmuLockContended, ShadowPage
from kvmmu.mmu.shadow_sync import NOSLOT_PFN, ShadowSync
from kvmmu.mmu.shadow_walk import GuestWalker, walk_addr

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot
    from kvmmu.vcpu import VCpu

__all__ = ["FaultStep", "ShadowFetch", "StepGen"]


@dataclass(frozen=True, slots=True)
class FaultStep:
    """One point of a shadow page fault where another vCPU may act.

    ``name`` is ``"walk"``, ``"sp"`` or ``"install"``; ``level`` the shadow
    level of the table found/created (``"sp"``) or of the leaf
    (``"install"``); ``gfn`` that table's gfn or the leaf gfn.
    """

    name: str
    level: int = 0
    gfn: int = 0


StepGen = Generator[FaultStep, None, int]


class _Fault:
    """The parts of ``struct kvm_page_fault`` the shadow path uses."""

    __slots__ = (
        "gfn",
        "goal_level",
        "host_writable",
        "max_level",
        "pfn",
        "slot",
        "user",
        "write",
    )

    def __init__(self, error_code: int) -> None:
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.user = bool(error_code & PFERR_USER_MASK)
        self.gfn = 0
        self.slot: Memslot | None = None
        self.pfn = NOSLOT_PFN
        self.host_writable = False
        self.max_level = 1
        self.goal_level = 1


class ShadowFetch(ShadowSync):
    """The fault path of the shadow MMU."""

    def page_fault(self, vcpu: VCpu, gva: int, error_code: int) -> int:
        """``FNAME(page_fault)`` driven to its end; returns ``RET_PF_*``."""
        gen = self.page_fault_steps(vcpu, gva, error_code)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return int(stop.value)

    def page_fault_steps(self, vcpu: VCpu, gva: int, error_code: int) -> StepGen:
        """``FNAME(page_fault)`` (paging_tmpl.h; spec/kvm-mmu.md §3.7) as steps.

        Walk (inject a failed walk's #PF and RETRY); page-track fast path
        (a present write to a write-tracked gfn -> EMULATE); huge-page
        limit (``is_self_change_mapping``); pfn; the CR0.WP=0 trick; then,
        under ``mmu_lock``, staleness and :meth:`fetch`.
        """
        st = self.vstate(vcpu)
        fault = _Fault(error_code)
        cpl = 3 if fault.user else vcpu.cpl if vcpu.cpl < 3 else 0
        kind: paging.Access = (
            "fetch" if error_code & PFERR_FETCH_MASK else "write" if fault.write else "read"
        )
        if vcpu.cr0 & paging.CR0_PG:
            gw = walk_addr(vcpu, gva, kind, cpl, st.pdptrs)
        else:
            gw = self.nonpaging_walker(vcpu, gva)
        if gw.fault is not None:
            self.vm.stats["guest_page_faults"] += 1
            st.fault = gw.fault
            return RET_PF_RETRY
        st.gpa = gw.gpa
        yield FaultStep("walk", gw.level, gw.gfn)
        fault.gfn = gw.gfn
        fault.slot = self.vm.memslots.gfn_to_memslot(gw.gfn)
        present = bool(error_code & PFERR_PRESENT_MASK)
        rsvd = bool(error_code & PFERR_RSVD_MASK)
        if (
            not rsvd
            and present
            and fault.write
            and self.vm.page_track.is_write_tracked(fault.slot, gw.gfn)
        ):
            self.clear_flood(vcpu, gva)
            self.vm.stats["pf_emulate"] += 1
            return RET_PF_EMULATE
        fault.max_level = 1 if self.is_self_change_mapping(vcpu, gw, fault.user) else gw.level
        mmu_seq = self.invalidate.seq
        r = self.faultin_pfn(fault, gw)
        if r is not None:
            return r
        if (
            fault.write
            and not gw.pte_access & S.ACC_WRITE_MASK
            and not vcpu.cr0 & paging.CR0_WP
            and not fault.user
            and fault.slot is not None
        ):
            gw.pte_access |= S.ACC_WRITE_MASK
            gw.pte_access &= ~S.ACC_USER_MASK
            if vcpu.cr4 & paging.CR4_SMEP:
                gw.pte_access &= ~S.ACC_EXEC_MASK
        if self._mmu_lock_owner is not None:
            raise MmuLockContended(f"vCPU {vcpu.index} page fault at {gva:#x}")
        self._mmu_lock_owner = vcpu.index
        try:
            root = st.root
            if (
                root is None
                or self.is_obsolete(root)
                or self.invalidate.retry_gfn(mmu_seq, fault.gfn)
            ):
                return RET_PF_RETRY
            r = yield from self.fetch(vcpu, root, fault, gw)
        finally:
            self.release_lock()
        self.vm.stats[
            {
                RET_PF_EMULATE: "pf_emulate",
                RET_PF_RETRY: "pf_retry",
                RET_PF_SPURIOUS: "pf_spurious",
            }.get(r, "pf_fixed")
        ] += 1
        return r

    def release_lock(self) -> None:
        """``write_unlock(mmu_lock)``: then the track_writes that waited run."""
        self._mmu_lock_owner = None
        while self._deferred:
            gpa, new, pae = self._deferred.pop(0)
            self.track_write(gpa, new, pae)

    def nonpaging_walker(self, vcpu: VCpu, gva: int) -> GuestWalker:
        """Guest paging off: gva is the gpa (``nonpaging_page_fault``), at most 2M."""
        gpa = gva if vcpu.efer & paging.EFER_LMA else gva & 0xFFFFFFFF
        gw = GuestWalker(gva, level=2, max_level=4, gfn=gpa >> 12, gpa=gpa)
        return gw

    def is_self_change_mapping(self, vcpu: VCpu, gw: GuestWalker, user: bool) -> bool:
        """``FNAME(is_self_change_mapping)``: a writable leaf whose large frame
        holds one of this walk's guest tables is mapped at 4K only."""
        if not vcpu.cr0 & paging.CR0_PG:
            return False
        if not (gw.pte_access & S.ACC_WRITE_MASK or (not vcpu.cr0 & paging.CR0_WP and not user)):
            return False
        mask = ~(S.KVM_PAGES_PER_HPAGE(gw.level) - 1)
        return any(
            not ((gw.gfn ^ gw.table_gfn[lvl - 1]) & mask)
            for lvl in range(gw.level, gw.max_level + 1)
        )

    def faultin_pfn(self, fault: _Fault, gw: GuestWalker) -> int | None:
        """``kvm_faultin_pfn`` for shadow paging (spec/kvm-mmu.md §3.5).

        INVALID slot -> RETRY; write to a READONLY slot -> EMULATE (not
        MMIO-cached); no slot -> an MMIO SPTE (or EMULATE when MMIO caching is
        off or the gfn is beyond ``max_gfn``); else GUP.
        """
        slot = fault.slot
        if slot is None:
            if not self.fmt.mmio_caching or fault.gfn > self.max_gfn:
                return RET_PF_EMULATE
            fault.pfn = NOSLOT_PFN
            return None
        if slot.is_invalid:
            return RET_PF_RETRY
        if fault.write and slot.is_readonly:
            return RET_PF_EMULATE
        hva = slot.gfn_to_hva(fault.gfn)
        vma = self.vm.host.find_vma(hva)
        writable = not slot.is_readonly and vma is not None and vma.writable
        try:
            fault.pfn = self.vm.host.hva_to_pfn(hva, write=fault.write)
        except KvmError:
            return RET_PF_EMULATE
        fault.host_writable = writable
        return None

    def clear_flood(self, vcpu: VCpu, gva: int) -> None:
        """``shadow_page_table_clear_flood``: reset the counts along the gva."""
        root = self.vstate(vcpu).root
        sp = None if root is None else self.root_top(root, gva)
        while sp is not None and not sp.invalid:
            sp.write_flooding_count = 0
            i = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
            spte = self.spte(sp, i)
            if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, sp.role.level):
                return
            sp = self.child_sp(spte)

    def hugepage_adjust(self, fault: _Fault) -> None:
        """``kvm_mmu_hugepage_adjust`` (spec/kvm-mmu.md §3.6).

        4K if ``max_level`` is 4K, no slot, or dirty logging; else the largest
        level no larger than the walk, ``max_huge_page_level``, the slot's
        ``disallow_lpage`` and the host mapping allow; the pfn is aligned down.
        """
        fault.goal_level = 1
        slot = fault.slot
        if fault.max_level <= 1 or slot is None or fault.pfn == NOSLOT_PFN or slot.logs_dirty:
            return
        level = self.max_mapping_level(slot, fault.gfn, fault.max_level)
        fault.goal_level = level
        if level > 1:
            fault.pfn &= ~(S.KVM_PAGES_PER_HPAGE(level) - 1)

    def max_mapping_level(self, slot: Any, gfn: int, max_level: int) -> int:
        """``__kvm_mmu_max_mapping_level`` (spec/kvm-mmu.md §3.6): clamp to
        ``max_huge_page_level``, step down while the frame leaves the slot or
        ``disallow_lpage`` is set, then cap at the host mapping level."""
        level = min(max_level, self.max_huge_page_level)
        while level > 1:
            n = S.KVM_PAGES_PER_HPAGE(level)
            base = gfn & ~(n - 1)
            if (
                slot.base_gfn <= base
                and base + n <= slot.end_gfn
                and not slot.lpage_disallowed(gfn, level)
            ):
                break
            level -= 1
        if level > 1:
            level = min(level, self.vm.host.host_mapping_level(slot.gfn_to_hva(gfn)))
        return level

    # ----------------------------------------------------------------- fetch
    def gpte_changed(self, gw: GuestWalker, level: int) -> bool:
        """``FNAME(gpte_changed)`` (paging_tmpl.h; spec/kvm-mmu.md §3.8).

        At 4K re-read the aligned block of ``PTE_PREFETCH_NUM`` gPTEs (of
        ``sizeof(pt_element_t)`` bytes) into ``prefetch_ptes`` and compare the
        faulting one; above, re-read the one gPTE. A read error counts as changed.
        """
        pte_gpa = gw.pte_gpa[level - 1]
        n = gw.pte_size
        if level == 1:
            base = pte_gpa & ~(PTE_PREFETCH_NUM * n - 1)
            try:
                raw = self.vm.read_guest(base, PTE_PREFETCH_NUM * n)
            except KvmError:
                return True
            gw.prefetch_ptes = [
                int.from_bytes(raw[k * n : k * n + n], "little") for k in range(PTE_PREFETCH_NUM)
            ]
            cur: int | None = gw.prefetch_ptes[(pte_gpa - base) // n]
        else:
            cur = self.read_gpte(pte_gpa, n)
        return cur is None or cur != gw.ptes[level - 1]

    def drop_large_spte(self, sp: ShadowPage, i: int) -> None:
        """``drop_large_spte``: a huge leaf where a table must go is dropped."""
        spte = self.spte(sp, i)
        if S.is_shadow_present_pte(spte) and S.is_large_pte(spte):
            gfn, nr = self.spte_flush_range(sp, i)
            self.drop_spte(sp, i)
            self.flush_gfns(gfn, nr)

    def fetch(self, vcpu: VCpu, root: ShadowPage, fault: _Fault, gw: GuestWalker) -> StepGen:
        """``FNAME(fetch)`` (paging_tmpl.h; spec/kvm-mmu.md §3.8).

        Re-check the root gPTE (a PAE guest's PDE: PAE counts as 2); start at
        the root, or for a PAE root at ``pae_root[(gva >> 30) & 3]``
        (``shadow_walk_init_using_root``); then per shadow level above the guest leaf:
        find/create the indirect sp of the next guest table (syncing unsync
        children), yield, re-check that table's gPTE (``gpte_changed``) ->
        RETRY, link. Then direct sps down to ``goal_level``, the leaf
        (``mmu_set_spte``), and ``FNAME(pte_prefetch)``.
        """
        fixed = self.vm.config.gpte_recheck != "level1"
        paging_on = bool(vcpu.cr0 & paging.CR0_PG)
        if paging_on and fixed and self.gpte_changed(gw, gw.max_level):
            return RET_PF_RETRY
        top = self.root_top(root, gw.gva)
        if top is None:
            return RET_PF_RETRY
        sp = top
        level = sp.role.level
        gva = gw.gva
        while paging_on and level > gw.level:
            i = (gva >> (12 + 9 * (level - 1))) & 511
            sp.write_flooding_count = 0
            self.drop_large_spte(sp, i)
            child: ShadowPage | None = None
            spte = self.spte(sp, i)
            if not S.is_shadow_present_pte(spte):
                role = self.child_role(sp, i, False, gw.pt_access[level - 2])
                child = self.get_page(vcpu, gw.table_gfn[level - 2], role)
                if child.unsync_children and self.mmu_sync_children(vcpu, child):
                    return RET_PF_RETRY
            yield FaultStep("sp", level - 1, gw.table_gfn[level - 2])
            if (fixed or level - 1 == gw.level) and self.gpte_changed(gw, level - 1):
                self.vm.stats["mmu_gpte_changed"] += 1
                return RET_PF_RETRY
            if child is not None:
                self.link_shadow_page(sp, i, child)
                sp = child
            else:
                sp = self.child_sp(self.spte(sp, i))
            level -= 1
        self.hugepage_adjust(fault)
        direct_access = gw.pte_access
        while True:
            i = (gva >> (12 + 9 * (level - 1))) & 511
            sp.write_flooding_count = 0
            base_gfn = fault.gfn & ~(S.KVM_PAGES_PER_HPAGE(level) - 1)
            if level == fault.goal_level:
                break
            self.validate_direct_spte(sp, i, direct_access)
            self.drop_large_spte(sp, i)
            spte = self.spte(sp, i)
            if not S.is_shadow_present_pte(spte):
                role = self.child_role(sp, i, True, direct_access)
                child = self.get_page(vcpu, base_gfn, role)
                yield FaultStep("sp", level - 1, base_gfn)
                self.link_shadow_page(sp, i, child)
                sp = child
            else:
                sp = self.child_sp(spte)
            level -= 1
        yield FaultStep("install", level, base_gfn)
        ret = self.mmu_set_spte(
            vcpu,
            fault.slot,
            sp,
            i,
            gw.pte_access,
            base_gfn,
            fault.pfn,
            write_fault=fault.write,
            prefetch=False,
            host_writable=fault.host_writable,
            gpat=gw.gpat,
        )
        if ret == RET_PF_SPURIOUS:
            return ret
        self.pte_prefetch(vcpu, gw, sp, i)
        return ret

    def validate_direct_spte(self, sp: ShadowPage, i: int, direct_access: int) -> None:
        """``validate_direct_spte``: a direct child built with other access is
        unlinked (e.g. the gPTE's D bit changed) and the range flushed."""
        spte = self.spte(sp, i)
        if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, sp.role.level):
            return
        child = self.child_sp(spte)
        if child.role.access == direct_access:
            return
        self.drop_spte(sp, i)
        self.flush_gfns(child.gfn, S.KVM_PAGES_PER_HPAGE(sp.role.level))

    def pte_prefetch(self, vcpu: VCpu, gw: GuestWalker, sp: ShadowPage, index: int) -> None:
        """``FNAME(pte_prefetch)`` (paging_tmpl.h; spec/kvm-mmu.md §3.9).

        4K sps only, not during an invalidation; a direct sp (a guest huge
        page mapped at 4K, or guest paging off: ``direct_map``) is delegated to
        ``__direct_pte_prefetch``. Indirect: each non-present entry of the
        aligned 8-entry window (not the faulting one) from the gPTEs
        ``gpte_changed`` cached; stop at the first failure.
        """
        if sp.role.level > 1 or self.invalidate.in_progress:
            return
        if sp.role.direct:
            self.direct_pte_prefetch(vcpu, sp, index, gw.gpat)
            return
        first = index & ~(PTE_PREFETCH_NUM - 1)
        for k in range(PTE_PREFETCH_NUM):
            i = first + k
            if i == index or S.is_shadow_present_pte(self.spte(sp, i)):
                continue
            if not self.prefetch_gpte(vcpu, sp, i, gw.prefetch_ptes[k], True):
                break

    def direct_pte_prefetch(self, vcpu: VCpu, sp: ShadowPage, index: int, gpat: int) -> None:
        """``__direct_pte_prefetch`` (mmu.c; spec/kvm-mmu.md §3.9) for a direct sp.

        Runs of non-present entries of the aligned 8-entry window, split at
        present ones and at the faulting one, each mapped by
        :meth:`direct_pte_prefetch_many`; a failed run ends the scan.
        """
        first = index & ~(PTE_PREFETCH_NUM - 1)
        start: int | None = None
        for i in range(first, first + PTE_PREFETCH_NUM):
            if i == index or S.is_shadow_present_pte(self.spte(sp, i)):
                if start is None:
                    continue
                if not self.direct_pte_prefetch_many(vcpu, sp, start, i, gpat):
                    return
                start = None
            elif start is None:
                start = i
        if start is not None:
            self.direct_pte_prefetch_many(vcpu, sp, start, first + PTE_PREFETCH_NUM, gpat)

    def direct_pte_prefetch_many(
        self, vcpu: VCpu, sp: ShadowPage, start: int, end: int, gpat: int
    ) -> bool:
        """``direct_pte_prefetch_many``: False is its -1 (stop the scan).

        ``gfn_to_memslot_dirty_bitmap(no_dirty_log = role.access & W)``, then
        ``gfn_to_page_many_atomic``: a read-only slot or a run leaving the
        slot pins nothing; otherwise the prefix of present, writable host
        pages, each mapped with ``mmu_set_spte(role.access, fault=NULL)``.
        """
        access = sp.role.access
        gfn = self.leaf_gfn(sp, start)
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        if slot is None or slot.is_invalid:
            return False
        if access & S.ACC_WRITE_MASK and slot.logs_dirty:
            return False
        if slot.end_gfn - gfn < end - start:
            return False
        pfns: list[int] = []
        for n in range(end - start):
            pfn = self.atomic_pfn(slot, gfn + n)
            if pfn is None:
                break
            pfns.append(pfn)
        if not pfns:
            return False
        for n, pfn in enumerate(pfns):
            self.mmu_set_spte(
                vcpu,
                slot,
                sp,
                start + n,
                access,
                gfn + n,
                pfn,
                write_fault=False,
                prefetch=True,
                host_writable=True,
                gpat=gpat,
            )
            self.vm.stats["mmu_prefetched"] += 1
        return True
