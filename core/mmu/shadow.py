"""The shadow MMU (``tdp = false``): KVM's shadow paging of the guest's tables.

``ShadowMmu(vm)`` is what the VM builds when TDP is off. It keeps one shadow
root per (guest CR3, role), built level by level by ``FNAME(fetch)`` from
the guest's own tables (``arch/x86/kvm/mmu/paging_tmpl.h``, ``mmu.c``;
spec/kvm-mmu.md §2.3–2.4, §3.7–3.9, §3.12–3.15). The pieces:

* :mod:`kvmmu.mmu.shadow_walk` - ``walk_addr_generic`` on :func:`kvmmu.paging.walk`;
* :mod:`kvmmu.mmu.shadow_page` - sps, ``account_shadowed``, rmap, zap;
* :mod:`kvmmu.mmu.shadow_sync` - leaves, unsync, prefetch, sync, ``kvm_mmu_track_write``;
* :mod:`kvmmu.mmu.shadow_fetch` - ``FNAME(page_fault)`` / ``FNAME(fetch)`` as steps;
* this module - the hardware walk of a shadow root (``access``), CR3 switches
  (``load_pgd``), INVLPG, VM-wide zaps, MMU notifiers and the invariants.

The shadow tables are rows of the MMU core's ``SptePool`` in the shadow
(x86 PTE) ``SpteFormat`` the vendor returns; leaves come from
:func:`kvmmu.spte.make_spte`. Decisions where the spec is silent are in
docs/shadow.md.
"""

from __future__ import annotations

import errno
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
    RET_PF_EMULATE,
    RET_PF_INVALID,
    RET_PF_RETRY,
)
from kvmmu.mmu.invalidate import MmuNotifierMixin
from kvmmu.mmu.shadow_fetch import FaultStep, ShadowFetch
from kvmmu.mmu.shadow_page import KVM_MMU_NUM_PREV_ROOTS, MmuLockContended, ShadowPage
from kvmmu.mmu.shadow_walk import gpte_access, gpte_to_gfn
from kvmmu.quirks import KVM_X86_QUIRK_SLOT_ZAP_ALL

if TYPE_CHECKING:
    import numpy as np
    from kvmmu.memslot import Memslot
    from kvmmu.vcpu import AccessResult, Resolved, VCpu

__all__ = ["MAX_EXITS", "FaultStep", "MmuLockContended", "ShadowMmu", "drive"]

#: A fault loop that has not converged after this many exits is a model bug.
MAX_EXITS = 32
_P = S.PT_PRESENT_MASK
_W = S.PT_WRITABLE_MASK
_PS = S.PT_PAGE_SIZE_MASK


class ShadowMmu(ShadowFetch, MmuNotifierMixin):
    """KVM's shadow MMU for one VM (``vm.config.tdp`` False)."""

    # ------------------------------------------------------------- roots
    def root_pgd(self, vcpu: VCpu) -> int:
        """The guest root table gfn (CR3 bits 51:12), 0 with paging off.

        Legacy PAE: the whole CR3 (only compared: any new CR3 frees the root).
        """
        if not vcpu.cr0 & paging.CR0_PG:
            return 0
        if self.is_legacy_pae(vcpu):
            return vcpu.cr3 & 0xFFFFFFFF
        return (vcpu.cr3 & S.SPTE_BASE_ADDR_MASK) >> 12

    @staticmethod
    def is_legacy_pae(vcpu: VCpu) -> bool:
        """``is_pae_paging``: CR0.PG, CR4.PAE, not long mode."""
        return bool(
            vcpu.cr0 & paging.CR0_PG
            and vcpu.cr4 & paging.CR4_PAE
            and not vcpu.efer & paging.EFER_LMA
        )

    def load_pdptrs(self, vcpu: VCpu) -> bool:
        """``load_pdptrs`` (x86.c): cache the 4 guest PDPTEs at CR3 load.

        The walker then uses the cached copies (``get_pdptr``). Returns True
        if they changed (KVM then frees the current root). A failed load (an
        unreadable PDPT or a reserved PDPTE, :func:`kvmmu.paging.load_pdptrs`)
        keeps the cached copies, so the walker goes on using them.
        """
        st = self.vstate(vcpu)
        new = paging.load_pdptrs(self.read_gpte, vcpu.cr3, self.vm.config.host_maxphyaddr)
        if new is None:
            return False
        changed = new != st.pdptrs
        st.pdptrs = new
        return changed

    def put_root(self, root: ShadowPage) -> None:
        """``mmu_free_root_page``: drop a reference; an invalid root is freed.

        A PAE root drops its four roots and returns its page.
        """
        if root.pae is not None:
            for r in root.pae:
                if r is not None:
                    self.put_root(r)
            root.pae = [None] * 4
            self.pool.free(root.idx)
            return
        root.root_count -= 1
        if root.root_count == 0 and root.invalid:
            self.free_page(root)

    def free_roots(self, vcpu: VCpu, *, prev: bool = True) -> None:
        """``kvm_mmu_free_roots`` (current and, with ``prev``, the cached ones)."""
        st = self.vstate(vcpu)
        if st.root is not None:
            self.put_root(st.root)
            st.root = None
        if prev:
            for _pgd, r in st.prev_roots:
                self.put_root(r)
            st.prev_roots = []

    def alloc_root(self, vcpu: VCpu) -> ShadowPage:
        """``mmu_alloc_shadow_roots`` / ``mmu_alloc_direct_roots``.

        4-/5-level: one root sp for the guest root. PAE or 32-bit guest: the
        vCPU's ``pae_root``, four PDPTE-like entries (present bit only), each
        pointing to a level-2 root sp: for PAE the guest PDPTE's page
        directory (an entry whose cached PDPTE is not present stays
        ``INVALID_PAE_ROOT``); for 32-bit the guest PD at CR3, quadrant ``i``.
        """
        role = self.base_role(vcpu)
        if role.level != 3 or role.direct:
            root = self.get_page(vcpu, self.root_pgd(vcpu), role)
            root.root_count += 1
            return root
        idx = self.pool.alloc(3, 0)
        self._data = self.pool.data
        pae_root = ShadowPage(idx, self.pool.hpa(idx), 0, role, self.mmu_valid_gen)
        pae_root.pae = [None, None, None, None]
        st = self.vstate(vcpu)
        for q in range(4):
            if role.has_4_byte_gpte:
                gfn = (vcpu.cr3 & 0xFFFFF000) >> 12
                quadrant = q
            else:
                pdptr = st.pdptrs[q]
                if not pdptr & paging.PTE_P:
                    continue
                gfn = (pdptr & S.SPTE_BASE_ADDR_MASK) >> 12
                quadrant = 0
            sp = self.get_page(vcpu, gfn, role._replace(level=2, quadrant=quadrant))
            sp.root_count += 1
            pae_root.pae[q] = sp
            self.set_spte(pae_root, q, sp.hpa | _P)
        return pae_root

    def reload(self, vcpu: VCpu) -> ShadowPage:
        """``kvm_mmu_free_obsolete_roots`` + ``kvm_mmu_load`` (+ ``kvm_mmu_sync_roots``)."""
        st = self.vstate(vcpu)
        keep = []
        for pgd, r in st.prev_roots:
            if self.is_obsolete(r):
                self.put_root(r)
            else:
                keep.append((pgd, r))
        st.prev_roots = keep
        if st.root is not None and self.is_obsolete(st.root):
            self.put_root(st.root)
            st.root = None
        if st.root is None:
            st.root = self.alloc_root(vcpu)
            st.pgd = self.root_pgd(vcpu)
            self.sync_roots(vcpu)
        return st.root

    def sync_roots(self, vcpu: VCpu) -> None:
        """``kvm_mmu_sync_roots``: sync the unsync tables below the root (§3.15)."""
        root = self.vstate(vcpu).root
        if root is None or root.role.direct:
            return
        tops = [r for r in root.pae if r is not None] if root.pae is not None else [root]
        for top in tops:
            if top.unsync_children and not top.invalid:
                self._need_lock("kvm_mmu_sync_roots")
                self.mmu_sync_children(vcpu, top)

    def load_pgd(self, vcpu: VCpu) -> None:
        """``kvm_mmu_reset_context`` / ``kvm_mmu_new_pgd`` after CR0/CR3/CR4/EFER writes.

        A new paging mode (role) frees every root. In PAE mode the PDPTEs are
        loaded (``load_pdptrs``); a PAE root is never cached (``fast_pgd_switch``
        wants a 4-level root): a CR3 switch or new PDPTEs free it. Otherwise a
        CR3 switch keeps the old root in ``prev_roots``
        (``KVM_MMU_NUM_PREV_ROOTS`` = 3, LRU) and reuses a cached root for the
        new CR3 (``fast_pgd_switch``); then the roots are synced
        (``KVM_REQ_MMU_SYNC``) and the root's flooding count cleared
        (spec/kvm-mmu.md §3.15).
        """
        st = self.vstate(vcpu)
        role = self.base_role(vcpu)
        pgd = self.root_pgd(vcpu)
        pdptrs_changed = self.is_legacy_pae(vcpu) and self.load_pdptrs(vcpu)
        cur = st.root
        if cur is not None and (cur.role != role or self.is_obsolete(cur)):
            self.free_roots(vcpu)
            cur = None
        if cur is not None and cur.pae is not None and (st.pgd != pgd or pdptrs_changed):
            # fast_pgd_switch needs a 4-/5-level root: free the current one.
            self.free_roots(vcpu, prev=False)
            cur = None
        if cur is not None and st.pgd == pgd:
            self.sync_roots(vcpu)
            return
        found = None
        for n, (p, r) in enumerate(st.prev_roots):
            if p == pgd and r.role == role and not self.is_obsolete(r):
                found = r
                del st.prev_roots[n]
                break
        if cur is not None:
            st.prev_roots.insert(0, (st.pgd, cur))
            while len(st.prev_roots) > KVM_MMU_NUM_PREV_ROOTS:
                _p, old = st.prev_roots.pop()
                self.put_root(old)
        st.root = found if found is not None else self.alloc_root(vcpu)
        st.pgd = pgd
        st.root.write_flooding_count = 0
        self.vm.stats["mmu_new_pgd"] += 1
        self.sync_roots(vcpu)

    # ------------------------------------------------------- hardware view
    def hw_walk(
        self, vcpu: VCpu, root: ShadowPage, gva: int, write: bool, fetch: bool
    ) -> tuple[int | None, ShadowPage, int, int]:
        """The CPU walking the shadow root for ``gva``.

        Returns ``(error_code, sp, index, spte)``: error ``None`` on a hit. Shadow
        paging runs the hardware with CR0.WP=1 (the guest's WP=0 is emulated
        by the fault path) and the guest's SMEP/SMAP; a PAE root is a PDPT
        (its entries carry no rights); an MMIO SPTE faults with
        RSVD|P. Protection keys are not exposed to a guest without TDP.
        """
        user = vcpu.cpl == 3
        base = (PFERR_WRITE_MASK if write else 0) | (PFERR_USER_MASK if user else 0)
        # The hardware runs the shadow tables with EFER.NX=1 whatever the
        # guest's EFER ("Shadow paging assumes NX to be available":
        # vmx.c update_transition_efer, svm.c svm_set_efer) and in PAE/long
        # format, so a fetch always reports PFERR_FETCH; the guest walk then
        # checks it as a fetch (no SMAP) and builds the guest's error code
        # with the guest's NXE/SMEP (spec/kvm-mmu.md §3.7).
        if fetch:
            base |= PFERR_FETCH_MASK
        data = self._data
        nx_mask = self.fmt.nx_mask
        sp = root
        w = u = True
        nx = False
        while True:
            level = sp.role.level
            i = (gva >> (12 + 9 * (level - 1))) & 511
            spte = int(data[sp.idx, i])
            if not spte & _P:
                return base, sp, i, spte
            if sp.pae is not None:  # a PDPTE: no rights bits
                sp = self.child_sp(spte)
                continue
            if S.is_mmio_spte(self.fmt, spte):
                return base | PFERR_RSVD_MASK | PFERR_PRESENT_MASK, sp, i, spte
            w = w and bool(spte & _W)
            u = u and bool(spte & self.fmt.user_mask)
            nx = nx or bool(spte & nx_mask)
            if level == 1 or spte & _PS:
                err = paging.permission_error(
                    writable=w,
                    user=u,
                    nx=nx,
                    cpl=vcpu.cpl,
                    write=write,
                    fetch=fetch,
                    cr0=vcpu.cr0 | paging.CR0_WP,
                    cr4=vcpu.cr4,
                    rflags_ac=vcpu.rflags_ac,
                    pk_bits=0,
                )
                return (base | err) if err else None, sp, i, spte
            sp = self.child_sp(spte)

    def kvm_mmu_page_fault(self, vcpu: VCpu, gva: int, error_code: int) -> int:
        """``kvm_mmu_page_fault`` (spec/kvm-mmu.md §3.2): RSVD -> the MMIO path.

        ``handle_mmio_page_fault``: a current-generation MMIO SPTE -> EMULATE
        with its gpa; a stale one -> INVALID, i.e. the normal fault rebuilds it;
        no longer MMIO -> RETRY.
        """
        if error_code & PFERR_RSVD_MASK:
            root = self.vstate(vcpu).root
            assert root is not None
            _e, _sp, _i, spte = self.hw_walk(vcpu, root, gva, False, False)
            r = RET_PF_RETRY
            if S.is_mmio_spte(self.fmt, spte):
                if S.check_mmio_spte(spte, self.vm.memslots.generation):
                    self.vstate(vcpu).gpa = (S.get_mmio_spte_gfn(spte) << 12) | (gva & 0xFFF)
                    self.vm.stats["pf_mmio_emulate"] += 1
                    return RET_PF_EMULATE
                r = RET_PF_INVALID
            if r != RET_PF_INVALID:
                return r
        self.vm.stats["pf_taken"] += 1
        return self.page_fault(vcpu, gva, error_code)

    def access(
        self, vcpu: VCpu, gva: int, kind: str, size: int, data: bytes | None
    ) -> AccessResult:
        """One guest access within a page through the vCPU's shadow root.

        Hit -> the bytes, A (and D on a write) set in the leaf, the vendor's
        memory type. Miss or violation -> ``kvm_mmu_page_fault``; a failed
        guest walk is injected (``AccessResult.fault``); EMULATE goes to the
        vCPU's emulator (``x86_emulate_instruction``), unless the retry rule
        unprotects the gfn and the access runs again (:mod:`kvmmu.emulate`).
        """
        res = self.resolve(vcpu, gva, kind)
        if res.result is not None:
            return res.result
        if res.emulate:
            assert res.gpa is not None
            return self.emulate(vcpu, gva, res.gpa, kind, size, data, res.exits)
        return self.complete(vcpu, gva, kind, size, data, res)

    def resolve(self, vcpu: VCpu, gva: int, kind: str) -> Resolved:
        """The hardware walk of the shadow root and the fault loop for ``gva``,
        until the shadow SPTE allows the access, the fault path says EMULATE,
        or the guest takes an exception; nothing is read or written."""
        from kvmmu.emulate import retry_instead_of_emulate
        from kvmmu.errors import GuestFault
        from kvmmu.vcpu import AccessResult, Resolved

        write = kind == "write"
        fetch = kind == "fetch"
        st = self.vstate(vcpu)
        exits = 0
        paging_on = bool(vcpu.cr0 & paging.CR0_PG)
        if paging_on and not vcpu.efer & paging.EFER_LMA:
            gva &= 0xFFFFFFFF
        if paging_on and not paging.canonical(gva, bool(vcpu.cr4 & paging.CR4_LA57)):
            fault = GuestFault(paging.GP_VECTOR, 0, gva)
            return Resolved(None, 0, result=AccessResult(None, fault, None, None, None))
        while True:
            root = self.reload(vcpu)
            err, sp, i, spte = self.hw_walk(vcpu, root, gva, write, fetch)
            if err is None:
                level = sp.role.level
                size_mask = (S.KVM_PAGES_PER_HPAGE(level) << 12) - 1
                gfn = self.leaf_gfn(sp, i) + ((gva & size_mask) >> 12)
                gpa = (gfn << 12) | (gva & 0xFFF)
                return Resolved(gpa, exits, spte=spte, level=level, sp=(sp, i))
            exits += 1
            if exits > MAX_EXITS:
                raise KvmError(errno.EFAULT, f"shadow fault on gva {gva:#x} did not converge")
            r = self.kvm_mmu_page_fault(vcpu, gva, err)
            if st.fault is not None:
                fault, st.fault = st.fault, None
                vcpu._trace(kind, gva, None, None, None, None, "guest_fault")
                return Resolved(
                    None, exits, result=AccessResult(None, fault, None, None, None, exits=exits)
                )
            if r == RET_PF_EMULATE:
                # x86_emulate_instruction may unprotect the gfn and re-enter
                # the guest instead (kvmmu.emulate; cr2_or_gpa is the gva).
                assert st.gpa is not None
                if retry_instead_of_emulate(vcpu, gva, st.gpa, write):
                    continue
                return Resolved(st.gpa, exits, emulate=True)

    def complete(
        self, vcpu: VCpu, gva: int, kind: str, size: int, data: bytes | None, res: Resolved
    ) -> AccessResult:
        """The CPU completes the access through the shadow SPTE ``res`` found:
        A (and D on a write) in the leaf, the bytes, the memory type."""
        from kvmmu.memtype import pat_index, pat_type
        from kvmmu.vcpu import AccessResult

        assert res.sp is not None and res.gpa is not None
        sp, i = res.sp
        spte, level, gpa = res.spte, res.level, res.gpa
        size_mask = (S.KVM_PAGES_PER_HPAGE(level) << 12) - 1
        hpa = (spte & S.SPTE_BASE_ADDR_MASK & ~size_mask) + (gva & size_mask)
        new = spte | self.fmt.accessed_mask
        if kind == "write":
            new |= self.fmt.dirty_mask
        if new != spte:
            self._data[sp.idx, i] = new
        out = vcpu._touch(hpa, size, data)
        gpat = None
        if vcpu.cr0 & paging.CR0_PG:
            g = sp.gpat.get(i, 0)
            gpat = pat_type(vcpu.pat, pat_index(g >> 2, (g >> 1) & 1, g & 1))
        memtype = self.vm.hooks.effective_memtype(vcpu, new, gpat, hpa)
        vcpu._trace(kind, gva, gpa, hpa, new, memtype.name, "ok")
        self.vm.stats["accesses"] += 1
        return AccessResult(out, None, gpa, hpa, memtype, new, level, exits=res.exits)

    def emulate(
        self,
        vcpu: VCpu,
        gva: int,
        gpa: int,
        kind: str,
        size: int,
        data: bytes | None,
        exits: int,
    ) -> AccessResult:
        """``x86_emulate_instruction`` on this vCPU (its writes are the ones
        ``kvm_mmu_track_write`` attributes to it)."""
        self._writer = vcpu
        try:
            return vcpu._emulate(gva, gpa, kind, size, data, exits)  # type: ignore[arg-type]
        finally:
            self._writer = None

    # ------------------------------------------------------------- INVLPG
    def invlpg(self, vcpu: VCpu, gva: int) -> None:
        """``kvm_mmu_invlpg`` -> ``kvm_mmu_invalidate_addr`` (all roots; §3.15).

        In each root walk to the leaf for ``gva``: an unsync leaf table's
        entry is synced (``sync_spte``), zapped if that fails; walking stops
        where no unsync child is below.
        """
        if not paging.canonical(gva, bool(vcpu.cr4 & paging.CR4_LA57)):
            # kvm_mmu_invalidate_addr: INVLPG of a non-canonical address is a NOP (SDM).
            self.vm.stats["mmu_invlpg"] += 1
            return
        self._need_lock("INVLPG")
        st = self.vstate(vcpu)
        roots = ([st.root] if st.root is not None else []) + [r for _p, r in st.prev_roots]
        for root in roots:
            top = self.root_top(root, gva & 0xFFFFFFFF if root.pae is not None else gva)
            if top is None or top.invalid or top.role.direct:
                continue
            sp = top
            while True:
                level = sp.role.level
                i = (gva >> (12 + 9 * (level - 1))) & 511
                spte = self.spte(sp, i)
                if S.is_last_spte(spte, level):
                    # kvm_sync_spte syncs any non-zero entry: an MMIO SPTE too.
                    if sp.unsync and spte:
                        gfn, nr = self.spte_flush_range(sp, i)
                        r = self.sync_spte(vcpu, sp, i)
                        if r < 0:
                            self.drop_spte(sp, i)
                        if r:
                            self.flush_gfns(gfn, nr)
                    break
                if not sp.unsync_children or not S.is_shadow_present_pte(spte):
                    break
                sp = self.child_sp(spte)
        self.vm.stats["mmu_invlpg"] += 1

    # --------------------------------------------------------------- zaps
    def unprotect_page(self, gfn: int) -> bool:
        """``kvm_mmu_unprotect_page`` (mmu.c; spec/kvm-mmu.md §3.13).

        Zap every valid indirect sp shadowing ``gfn`` (the retry-emulation and
        nested-NPF helper) and commit: one flush if any sp went. Returns
        whether one did.
        """
        self._need_lock("kvm_mmu_unprotect_page")
        sps = list(self.gfn_sps.get(gfn, ()))
        for sp in sps:
            self.zap_page(sp, flush_now=False)
        if sps:
            self.flush_all()
        return bool(sps)

    def _zap_leafs(self, start: int, end: int, *, wrprot_only: bool = False) -> tuple[int, int]:
        """Zap (or write-protect for dirty logging) every leaf mapping [start, end).

        Returns the hull of the gfns changed (``lo >= hi``: nothing changed).
        """
        lo, hi = self.max_gfn + 1, 0
        for key in list(self.rmap):
            for sp, i in list(self.rmap.get(key, ())):
                nr = S.KVM_PAGES_PER_HPAGE(sp.role.level)
                if key >= end or key + nr <= start:
                    continue
                if wrprot_only:
                    spte = self.spte(sp, i)
                    if not spte & _W:
                        continue
                    self.set_spte(sp, i, spte & ~_W)
                elif not self.drop_spte(sp, i):
                    continue
                lo, hi = min(lo, key), max(hi, key + nr)
        return lo, hi

    def _flush_hull(self, hull: tuple[int, int]) -> None:
        lo, hi = hull
        if lo < hi:
            self.flush_gfns(lo, hi - lo)

    def zap_gfn_range(self, start: int, end: int) -> None:
        """``kvm_zap_gfn_range``: begin, zap the rmaps of [start, end), flush, end (§3.14)."""
        if start >= end:
            return
        self._need_lock("kvm_zap_gfn_range")
        self.invalidate.begin()
        self.invalidate.range_add(start, end)
        try:
            self._flush_hull(self._zap_leafs(start, end))
        finally:
            self.invalidate.end()

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast`` (spec/kvm-mmu.md §3.14).

        Toggle ``mmu_valid_gen``, tell plugins, zap every obsolete sp (roots in
        use become invalid; vCPUs reload before their next access), one flush.
        """
        self._need_lock("kvm_mmu_zap_all_fast")
        self.mmu_valid_gen ^= 1
        self.vm.stats["mmu_zap_all_fast"] += 1
        self.vm.hooks.zap_all_fast(self.mmu_valid_gen)
        flush = False
        for sp in list(self.active.values()):
            if sp.mmu_valid_gen != self.mmu_valid_gen:
                flush |= self.zap_page(sp, flush_now=False)
        if flush:
            self.flush_all()

    def flush_shadow_memslot(self, slot: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot`` (DELETE/MOVE; spec/kvm-mmu.md §3.14).

        Before 6.12, or with ``KVM_X86_QUIRK_SLOT_ZAP_ALL``: ``zap_all_fast``;
        otherwise ``kvm_mmu_zap_memslot``: the slot's leaves and the shadow
        pages of guest tables inside it.
        """
        era = getattr(self.vm, "era", None)
        if (era is not None and era < (6, 12)) or self.vm.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL):
            self.zap_all_fast()
            return
        self._need_lock("kvm_mmu_zap_memslot")
        hull = self._zap_leafs(slot.base_gfn, slot.end_gfn)
        flush = False
        for sp in list(self.active.values()):
            if not sp.role.direct and slot.base_gfn <= sp.gfn < slot.end_gfn:
                flush |= self.zap_page(sp, flush_now=False)
        if flush:
            self.flush_all()
        else:
            self._flush_hull(hull)

    def slot_apply_flags(self, old: Memslot | None, new: Memslot | None, change: Any) -> None:
        """``kvm_mmu_slot_apply_flags`` (spec/kvm-mmu-2.md §7.1), FLAGS_ONLY only.

        Enabling dirty logging write-protects every leaf of the slot (W only:
        MMU-writable stays, as for dirty logging), unless the bitmap starts
        all-set (manual protect + INITIALLY_SET), then flushes the whole slot.
        Disabling recovers huge pages (:meth:`recover_huge_pages`).
        """
        from kvmmu.memslot import MemslotChange

        if change is not MemslotChange.FLAGS_ONLY or old is None or new is None:
            return
        if new.is_readonly or new.logs_dirty == old.logs_dirty:
            return
        if not new.logs_dirty:
            self.recover_huge_pages(new)
            return
        ms = self.vm.memslots
        if ms.manual_dirty_log_protect and ms.dirty_log_initially_set:
            return
        self._need_lock("kvm_mmu_slot_remove_write_access")
        self._zap_leafs(new.base_gfn, new.end_gfn, wrprot_only=True)
        # kvm_flush_remote_tlbs_memslot: always, over the whole slot (§7.1).
        self.flush_gfns(new.base_gfn, new.npages)

    def recover_huge_pages(self, slot: Memslot) -> None:
        """``kvm_mmu_zap_collapsible_sptes`` -> ``kvm_rmap_zap_collapsible_sptes``.

        After dirty logging is disabled (spec/kvm-mmu-2.md §7.1 step 3, §5.3):
        zap the 4K SPTEs of *direct* shadow pages whose gfn can now be mapped
        huge, so the next fault rebuilds the huge mapping. Indirect shadow
        pages mirror the guest's own 4K tables and are not collapsible.
        """
        self._need_lock("kvm_mmu_zap_collapsible_sptes")
        lo, hi = self.max_gfn + 1, 0
        for key in list(self.rmap):
            if not slot.base_gfn <= key < slot.end_gfn:
                continue
            for sp, i in list(self.rmap.get(key, ())):
                if not sp.role.direct or sp.role.level != 1:
                    continue
                if self.max_mapping_level(slot, key, self.max_huge_page_level) <= 1:
                    continue
                if self.drop_spte(sp, i):
                    lo, hi = min(lo, key), max(hi, key + 1)
        self._flush_hull((lo, hi))

    def write_protect_gfns(self, gfns: np.ndarray, as_id: int = 0) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked``: clear W on the harvested gfns
        (the shadow MMU models address space 0 only)."""
        self._need_lock("kvm_mmu_write_protect_pt_masked")
        lo, hi = self.max_gfn + 1, 0
        for g in (int(x) for x in gfns):
            a, b = self._zap_leafs(g, g + 1, wrprot_only=True)
            lo, hi = min(lo, a), max(hi, b)
        self._flush_hull((lo, hi))

    # ------------------------------------------------------- MMU notifiers
    def mn_lock(self) -> None:
        self._need_lock("kvm_mmu_notifier_invalidate_range_start")

    def mn_unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> tuple[int, int] | None:
        """``kvm_unmap_gfn_range`` -> ``kvm_zap_rmap``: zap the leaves mapping the gfns."""
        lo, hi = self._zap_leafs(start, end)
        return (lo, hi) if lo < hi else None

    def mn_flush(self, hull: tuple[int, int] | None) -> None:
        if hull is not None:
            self.flush_gfns(hull[0], hull[1] - hull[0])

    def pre_fault_memory(self, gpa: int, size: int) -> int:
        """``kvm_arch_vcpu_pre_fault_memory``: refused without TDP (spec/kvm-mmu-2.md §6)."""
        raise KvmError(
            errno.EOPNOTSUPP, "KVM_PRE_FAULT_MEMORY: the vCPU's MMU is not TDP (shadow paging)"
        )

    # --------------------------------------------------------- invariants
    def check_invariants(self) -> list[str]:
        """The shadow MMU's invariants (issue 7 item 4), as messages.

        1. Every present shadow SPTE corresponds to the guest's current
           translation - the gPTE at the sp's guest table is present, points
           where the SPTE points and grants at least the SPTE's permissions -
           unless its table is unsync (write-protection dropped, pending sync).
        2. No writable SPTE maps a gfn holding a shadowed guest page table
           (except when all of that gfn's sps are unsync), nor a write-tracked gfn.
        3. Structure: parent links, rmap and hash agree with the tables.
        """
        out: list[str] = []
        valid = list(self.active.values())
        wp_gfns: set[int] = set()
        for sp in valid:
            if not sp.role.direct and not sp.unsync:
                wp_gfns.add(sp.gfn)
        for sp in valid:
            out.extend(self._check_sp(sp))
        for index, st in self.vcpus.items():
            if st.root is not None and st.root.pae is not None:
                out.extend(self._check_pae_root(index, st.root, st.pdptrs))
        for key, entries in self.rmap.items():
            for sp, i in entries:
                spte = self.spte(sp, i)
                if not S.is_shadow_present_pte(spte) or sp.gfns.get(i, -1) != key:
                    out.append(f"shadow: rmap of gfn {key:#x} lists a stale entry {sp!r}[{i}]")
                    continue
                if not spte & _W:
                    continue
                nr = S.KVM_PAGES_PER_HPAGE(sp.role.level)
                hits = [g for g in wp_gfns if key <= g < key + nr]
                if hits:
                    out.append(
                        f"shadow: writable SPTE {sp!r}[{i}] maps shadowed guest table "
                        f"gfn {hits[0]:#x}"
                    )
                slot = self.vm.memslots.gfn_to_memslot(key)
                if self.vm.page_track.is_write_tracked(slot, key):
                    out.append(f"shadow: writable SPTE maps write-tracked gfn {key:#x}")
        return out

    def _check_pae_root(self, index: int, root: ShadowPage, pdptrs: list[int]) -> list[str]:
        """A vCPU's PAE root: entry ``q`` is present iff it has a level-2 root
        sp, which shadows the cached PDPTE's PD (PAE) or quarter ``q`` of the
        guest PD (32-bit), and holds a root reference."""
        out: list[str] = []
        assert root.pae is not None
        for q, sp in enumerate(root.pae):
            spte = self.spte(root, q)
            where = f"vCPU {index} pae_root[{q}]"
            if sp is None:
                if spte:
                    out.append(f"shadow: {where} is set without a root sp")
                continue
            if spte != sp.hpa | _P or sp.root_count < 1 or sp.role.level != 2:
                out.append(f"shadow: {where} does not hold {sp!r}")
            if root.invalid or self.is_obsolete(root):
                continue
            if sp.role.has_4_byte_gpte:
                if sp.role.quadrant != q:
                    out.append(f"shadow: {where} holds quadrant {sp.role.quadrant}")
            elif not pdptrs[q] & paging.PTE_P or sp.gfn != gpte_to_gfn(pdptrs[q]):
                out.append(f"shadow: {where} holds {sp!r}, the PDPTE is {pdptrs[q]:#x}")
        return out

    def _check_sp(self, sp: ShadowPage) -> list[str]:
        out: list[str] = []
        nx_on = sp.role.efer_nx
        for i in (int(x) for x in self._data[sp.idx].nonzero()[0]):
            spte = self.spte(sp, i)
            if S.is_mmio_spte(self.fmt, spte) or not S.is_shadow_present_pte(spte):
                continue
            leaf = S.is_last_spte(spte, sp.role.level)
            if not leaf:
                child = self.child_sp(spte)
                if (sp, i) not in child.parent_ptes or child.invalid:
                    out.append(f"shadow: {sp!r}[{i}] links {child!r} without a parent link")
            if sp.role.direct:
                continue
            if sp.unsync and leaf:
                continue
            four = sp.role.has_4_byte_gpte
            gpte = self.read_gpte(self.gpte_gpa(sp, i), self.gpte_size(sp))
            where = f"{sp!r}[{i}]"
            if gpte is None or not gpte & paging.PTE_P:
                out.append(f"shadow: {where} is present but the guest entry is not")
                continue
            # A 32-bit 4 MiB guest page is shadowed by two 2 MiB halves (bit 21).
            half = (i & 1) << 9 if four and sp.role.level == 2 else 0
            if not leaf:
                child = self.child_sp(spte)
                huge = child.role.direct if four else bool(gpte & paging.PTE_PS)
                if huge:
                    target = gpte_to_gfn(gpte, sp.role.level, four) + half
                else:
                    target = gpte_to_gfn(gpte)
                bad_q = four and not huge and child.role.quadrant != i & 1
                if (
                    child.gfn != target
                    or huge != child.role.direct
                    or (huge and not gpte & paging.PTE_PS)
                    or bad_q
                ):
                    out.append(
                        f"shadow: {where} links {child!r} but the guest entry points to "
                        f"gfn {target:#x}"
                    )
                continue
            target = gpte_to_gfn(gpte, sp.role.level, four) + half
            if sp.gfns.get(i) != target:
                out.append(
                    f"shadow: {where} maps gfn {sp.gfns.get(i, -1):#x}, the guest entry "
                    f"gfn {target:#x}"
                )
            allowed = sp.role.access & gpte_access(gpte, nx_on)
            wp_ok = allowed & S.ACC_WRITE_MASK and gpte & paging.PTE_D
            # CR0.WP=0 trick (spec/kvm-mmu.md §3.7 step 7): a supervisor write
            # to a read-only gPTE maps it W and not U; the SPTE's own U bit
            # (not the guest's) tells whether the trick applies.
            if spte & _W and not wp_ok and (sp.role.cr0_wp or spte & self.fmt.user_mask):
                out.append(f"shadow: {where} is writable but the guest entry is not")
            if spte & self.fmt.user_mask and not allowed & S.ACC_USER_MASK:
                out.append(f"shadow: {where} is user-accessible but the guest entry is not")
        return out


def drive(gen: Any, on_step: Any = None) -> int:
    """Run a :meth:`ShadowMmu.page_fault_steps` generator to its end.

    ``on_step(step)`` is called at every :class:`FaultStep`; returns ``RET_PF_*``.
    """
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return int(stop.value)
        if on_step is not None:
            on_step(step)
