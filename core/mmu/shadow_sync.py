"""Shadow-page find/create, leaf SPTEs, prefetch and sync.

``kvm_mmu_get_shadow_page``, ``mmu_try_to_unsync_pages``, ``mmu_set_spte``
(``arch/x86/kvm/mmu/mmu.c``), ``FNAME(prefetch_gpte)``,
``FNAME(prefetch_invalid_gpte)``, ``FNAME(sync_spte)``
(``arch/x86/kvm/mmu/paging_tmpl.h``), ``__kvm_sync_page`` and
``mmu_sync_children`` (spec/kvm-mmu.md §3.9, §3.12, §3.15). Leaf SPTEs are
built by the MMU core's :func:`kvmmu.spte.make_spte`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmu import paging
from kvmmu import spte as S
from kvmmu.errors import KvmError
from kvmmu.mmu.fault import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS
from kvmmu.mmu.shadow_page import Role, ShadowBase, ShadowPage
from kvmmu.mmu.shadow_walk import gpte_access, gpte_to_gfn, protect_clean_gpte

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot
    from kvmmu.vcpu import VCpu

__all__ = ["NOSLOT_PFN", "ShadowSync"]

#: ``KVM_PFN_NOSLOT``: the gfn has no memslot (MMIO).
NOSLOT_PFN = -1


class ShadowSync(ShadowBase):
    """Find/create sps, install leaves (``mmu_set_spte``), prefetch, sync."""

    # ------------------------------------------------------- find / create sp
    def get_page(self, vcpu: VCpu | None, gfn: int, role: Role) -> ShadowPage:
        """``kvm_mmu_get_shadow_page`` -> ``kvm_mmu_find_shadow_page`` / alloc (mmu.c).

        An existing sp with the same role is reused. Looking up an upper-level
        table zaps unsync sps of the same gfn ("unsync pages must not be left
        as is, because the new upper-level page will be write-protected"). A
        found unsync 4K sp is synced transiently (``kvm_sync_page``): it is not
        write-protected and stays unsync; a failed sync zaps it and a new one
        is built.
        """
        # kvm_mmu_find_shadow_page: any lookup above 4K (direct ones too)
        # zaps the unsync sps of the gfn it passes.
        if role.level > 1:
            for other in list(self.gfn_sps.get(gfn, ())):
                if other.role != role and other.unsync:
                    self.zap_page(other)
        sp = self.page_hash.get((gfn, role))
        if sp is not None and sp.unsync and vcpu is not None:
            r = self.sync_page(vcpu, sp)
            if r < 0:
                self.zap_page(sp)
                sp = None
            elif r > 0:
                self.flush_all()
        if sp is not None:
            sp.write_flooding_count = 0
            return sp
        idx = self.pool.alloc(role.level, gfn)
        self._data = self.pool.data
        sp = ShadowPage(idx, self.pool.hpa(idx), gfn, role, self.mmu_valid_gen)
        self.by_idx[idx] = sp
        self.page_hash[(gfn, role)] = sp
        self.active[idx] = sp
        self.vm.stats["mmu_shadow_pages_created"] += 1
        if not role.direct:
            self.gfn_sps.setdefault(gfn, []).append(sp)
            self.account_shadowed(sp)
        return sp

    # -------------------------------------------------------------- unsync
    def try_to_unsync_pages(
        self, slot: Memslot | None, gfn: int, can_unsync: bool, prefetch: bool
    ) -> int:
        """``mmu_try_to_unsync_pages`` (mmu.c; spec/kvm-mmu.md §3.12).

        Write-tracked -> -EPERM. For each valid indirect sp of the gfn (only
        4K tables get here: upper ones are write-tracked): no unsync allowed ->
        -EPERM; already unsync -> next; prefetch -> -EEXIST; else
        ``kvm_unsync_page``. 0 lets the SPTE be writable.
        """
        if self.vm.page_track.is_write_tracked(slot, gfn):
            return -1
        for sp in self.gfn_sps.get(gfn, ()):
            if not can_unsync:
                return -1
            if sp.unsync:
                continue
            if prefetch:
                return -17
            self.unsync_page(sp)
        return 0

    # ---------------------------------------------------------- leaf SPTEs
    def mmu_set_spte(
        self,
        vcpu: VCpu | None,
        slot: Memslot | None,
        sp: ShadowPage,
        i: int,
        pte_access: int,
        gfn: int,
        pfn: int,
        *,
        write_fault: bool,
        prefetch: bool,
        host_writable: bool,
        gpat: int,
    ) -> int:
        """``mmu_set_spte`` (mmu.c; spec/kvm-mmu.md §3.12).

        No slot -> MMIO SPTE, EMULATE. A present non-leaf replaced by a leaf
        drops the child; a different pfn drops the old leaf; then
        ``make_spte(can_unsync=true)``; identical -> SPURIOUS; write-protected
        on a write fault -> EMULATE; a new mapping joins the rmap.
        """
        level = sp.role.level
        old = self.spte(sp, i)
        if pfn == NOSLOT_PFN:
            if old and not S.is_mmio_spte(self.fmt, old):
                self.drop_spte(sp, i)
            self.set_spte(
                sp, i, S.make_mmio_spte(self.fmt, gfn, pte_access, self.vm.memslots.generation)
            )
            self.vm.stats["pf_mmio_spte_created"] += 1
            return RET_PF_EMULATE
        flush = False
        was_rmapped = False
        if S.is_shadow_present_pte(old) and not S.is_mmio_spte(self.fmt, old):
            if not S.is_last_spte(old, level) or S.spte_to_pfn(old) != pfn or sp.gfns.get(i) != gfn:
                self.drop_spte(sp, i)
                flush = True
            else:
                was_rmapped = True
        elif old:
            self.set_spte(sp, i, 0)
        old = self.spte(sp, i)
        new, wrprot = S.make_spte(
            self.fmt,
            level=level,
            pfn=pfn,
            old_spte=old,
            pte_access=pte_access,
            prefetch=prefetch,
            synchronizing=False,
            host_writable=host_writable,
            mt_mask=self.vm.hooks.get_mt_mask(vcpu, gfn, self.vm.host.is_mmio_pfn(pfn)),
            nx_huge_pages=False,
            ad_disabled=False,
            try_unsync=lambda: self.try_to_unsync_pages(slot, gfn, True, prefetch),
        )
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            if old & S.PT_WRITABLE_MASK and not new & S.PT_WRITABLE_MASK:
                flush = True
            self.set_spte(sp, i, new)
        if wrprot and write_fault:
            ret = RET_PF_EMULATE
        if new & S.PT_WRITABLE_MASK and slot is not None and slot.logs_dirty:
            self.vm.memslots.mark_page_dirty(slot, gfn)
        sp.gfns[i] = gfn
        sp.access[i] = pte_access
        sp.gpat[i] = gpat
        if not was_rmapped:
            self.rmap_add(sp, i, gfn)
        if flush:
            self.flush_gfns(gfn, S.KVM_PAGES_PER_HPAGE(level))
        return ret

    # ------------------------------------------------------------ prefetch
    def gpte_rsvd(self, vcpu: VCpu, gpte: int, level: int) -> bool:
        """``is_rsvd_bits_set`` for a gPTE at ``level`` in the vCPU's paging mode."""
        if not vcpu.cr0 & paging.CR0_PG:
            return False
        smep_or_nxe = bool(vcpu.cr4 & paging.CR4_SMEP or vcpu.efer & paging.EFER_NXE)
        mode = paging.paging_mode(
            vcpu.cr4 & (paging.CR4_PAE | paging.CR4_LA57 | paging.CR4_PSE),
            vcpu.efer & (paging.EFER_NXE | paging.EFER_LMA | paging.EFER_LME),
            int(self.vm.config.host_maxphyaddr),
            smep_or_nxe,
        )
        info = mode.levels[len(mode.levels) - level]
        huge = info.rsvd_huge >= 0 and gpte & paging.PTE_PS
        return bool(gpte & (info.rsvd_huge if huge else info.rsvd))

    def prefetch_invalid_gpte(self, vcpu: VCpu, sp: ShadowPage, i: int, gpte: int) -> bool:
        """``FNAME(prefetch_invalid_gpte)``: drop and refuse a gPTE that cannot be
        shadowed: reserved bits, not present, or Accessed clear (spec §3.9)."""
        bad = (
            self.gpte_rsvd(vcpu, gpte, sp.role.level)
            or not gpte & paging.PTE_P
            or not gpte & paging.PTE_A
        )
        if bad:
            self.drop_spte(sp, i)
        return bad

    def atomic_pfn(self, slot: Memslot, gfn: int) -> int | None:
        """``gfn_to_pfn_memslot_atomic``: never faults anything in (spec §3.9).

        It asks for a *writable* pfn: ``__gfn_to_hva_many(write)`` fails on a
        read-only slot (``KVM_HVA_ERR_RO_BAD``) and ``get_user_page_fast_only
        (FOLL_WRITE)`` needs a present page in a writable, non-PFNMAP VMA
        ("Prefetching always gets a writable pfn", ``mmu_set_spte``).
        """
        if slot.is_readonly:
            return None
        hva = slot.gfn_to_hva(gfn)
        host = self.vm.host
        vma = host.find_vma(hva)
        if vma is None or vma.mmio or not vma.writable or not host.is_populated(hva):
            return None
        try:
            return host.hva_to_pfn(hva, write=True)
        except KvmError:
            return None

    def prefetch_gpte(
        self, vcpu: VCpu, sp: ShadowPage, i: int, gpte: int, no_dirty_log: bool
    ) -> bool:
        """``FNAME(prefetch_gpte)`` (paging_tmpl.h; spec/kvm-mmu.md §3.9).

        Access is ``sp->role.access & gpte_access`` after
        ``protect_clean_gpte``; a dirty-logged slot is skipped when mapping
        writable with ``no_dirty_log``; the pfn is taken without faulting it
        in; ``mmu_set_spte(fault=NULL)`` (prefetch: never unsyncs).
        """
        if self.prefetch_invalid_gpte(vcpu, sp, i, gpte):
            return False
        gfn = gpte_to_gfn(gpte)
        access = sp.role.access & gpte_access(gpte, bool(vcpu.efer & paging.EFER_NXE))
        access = protect_clean_gpte(access, gpte)
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        if slot is None or slot.is_invalid:
            return False
        if no_dirty_log and access & S.ACC_WRITE_MASK and slot.logs_dirty:
            return False
        pfn = self.atomic_pfn(slot, gfn)
        if pfn is None:
            return False
        gpat = (((gpte >> 7) & 1) << 2) | (((gpte >> 4) & 1) << 1) | ((gpte >> 3) & 1)
        self.mmu_set_spte(
            vcpu,
            slot,
            sp,
            i,
            access,
            gfn,
            pfn,
            write_fault=False,
            prefetch=True,
            host_writable=True,
            gpat=gpat,
        )
        self.vm.stats["mmu_prefetched"] += 1
        return True

    # ---------------------------------------------------------------- sync
    def read_gpte(self, gpa: int, size: int = 8) -> int | None:
        """``kvm_vcpu_read_guest_atomic`` of one gPTE (4 or 8 bytes); None on failure."""
        try:
            return int.from_bytes(self.vm.read_guest(gpa, size), "little")
        except KvmError:
            return None

    def sync_spte(self, vcpu: VCpu, sp: ShadowPage, i: int) -> int:
        """``FNAME(sync_spte)`` (paging_tmpl.h; spec/kvm-mmu.md §3.15).

        Re-read the gPTE: invalid -> dropped (1); a changed gfn -> dropped (1);
        unchanged access -> nothing (0); else rebuild with
        ``make_spte(prefetch, synchronizing)`` keeping the pfn. -1: unreadable.
        """
        spte = self.spte(sp, i)
        if not spte:
            return 0
        gpte = self.read_gpte(self.gpte_gpa(sp, i), self.gpte_size(sp))
        if gpte is None:
            return -1
        if self.prefetch_invalid_gpte(vcpu, sp, i, gpte):
            return 1
        gfn = gpte_to_gfn(gpte)
        access = sp.role.access & gpte_access(gpte, bool(vcpu.efer & paging.EFER_NXE))
        access = protect_clean_gpte(access, gpte)
        if S.is_mmio_spte(self.fmt, spte):
            # sync_mmio_spte (mmu.c): another gfn -> cleared; the same gfn ->
            # re-marked with the new access and the current generation. No
            # flush either way (an MMIO SPTE is not present).
            if S.get_mmio_spte_gfn(spte) != gfn:
                self.set_spte(sp, i, 0)
            else:
                self.set_spte(
                    sp, i, S.make_mmio_spte(self.fmt, gfn, access, self.vm.memslots.generation)
                )
            return 0
        if gfn != sp.gfns.get(i):
            self.drop_spte(sp, i)
            return 1
        gpat = (((gpte >> 7) & 1) << 2) | (((gpte >> 4) & 1) << 1) | ((gpte >> 3) & 1)
        sp.gpat[i] = gpat
        if sp.access.get(i) == access:
            return 0
        sp.access[i] = access
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        new, _ = S.make_spte(
            self.fmt,
            level=sp.role.level,
            pfn=S.spte_to_pfn(spte),
            old_spte=spte,
            pte_access=access,
            prefetch=True,
            synchronizing=True,
            host_writable=bool(spte & self.fmt.host_writable_mask),
            mt_mask=self.vm.hooks.get_mt_mask(vcpu, gfn, False),
            nx_huge_pages=False,
            ad_disabled=False,
            try_unsync=lambda: self.try_to_unsync_pages(slot, gfn, False, True),
        )
        self.set_spte(sp, i, new)
        if new & S.PT_WRITABLE_MASK and slot is not None and slot.logs_dirty:
            self.vm.memslots.mark_page_dirty(slot, gfn)
        return int(bool(spte & S.PT_WRITABLE_MASK) and not new & S.PT_WRITABLE_MASK)

    def sync_page(self, vcpu: VCpu, sp: ShadowPage) -> int:
        """``__kvm_sync_page``: sync every present entry; <0 asks for a zap."""
        flush = 0
        for i in [int(x) for x in self._data[sp.idx].nonzero()[0]]:
            r = self.sync_spte(vcpu, sp, i)
            if r < 0:
                return -1
            flush |= r
        self.vm.stats["mmu_sync_page"] += 1
        return flush

    def collect_unsync(self, sp: ShadowPage, out: list[ShadowPage]) -> None:
        """``mmu_unsync_walk``: the unsync 4K sps below ``sp``; stale bits cleared."""
        for i in sorted(sp.unsync_child):
            spte = self.spte(sp, i)
            if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, sp.role.level):
                sp.unsync_child.discard(i)
                continue
            child = self.child_sp(spte)
            if child.unsync:
                out.append(child)
            elif child.unsync_child:
                self.collect_unsync(child, out)
            if not child.unsync and not child.unsync_child:
                sp.unsync_child.discard(i)

    def mmu_sync_children(self, vcpu: VCpu, parent: ShadowPage) -> bool:
        """``mmu_sync_children`` (mmu.c; spec/kvm-mmu.md §3.15).

        Write-protect every unsync 4K table below ``parent`` again, flush,
        then ``kvm_unlink_unsync_page`` and sync each; a failed sync zaps.
        The model never yields the lock, so it never asks for RETRY (False).
        """
        pages: list[ShadowPage] = []
        self.collect_unsync(parent, pages)
        for sp in pages:
            slot = self.vm.memslots.gfn_to_memslot(sp.gfn)
            if slot is not None:
                self.write_protect_gfn(slot, sp.gfn)
        for sp in pages:
            if sp.invalid:
                continue
            self.clear_unsync(sp)
            r = self.sync_page(vcpu, sp)
            if r < 0:
                self.zap_page(sp)
            elif r > 0:
                self.flush_all()
        return False

    # ------------------------------------------------- writes to guest tables
    def track_write(self, gpa: int, new: bytes, pae: bool | None = None) -> None:
        """``kvm_mmu_track_write`` (mmu.c; spec/kvm-mmu.md §3.13).

        Runs after the emulated write landed and the external notifiers ran.
        Nothing to do without indirect shadow pages. While a suspended fault
        holds ``mmu_lock`` the work waits for the lock (the bytes have already
        landed). ``mmu_pte_write_fetch_gpte``: if the writing vCPU ``is_pae``
        (CR4.PAE; ``pae`` None: the vCPU whose access is being emulated, else
        assumed) every 4-byte write is widened to the aligned 8 bytes around
        it, as KVM does ("a 32-bit guest writing two halves of a 64-bit
        gpte"; even one that straddles two gPTEs then zaps only the first).
        For each
        valid indirect sp of the gfn: a misaligned write (``pte_size`` from
        ``role.has_4_byte_gpte``) or write-flooding (3+ writes to an
        upper-level table since the last fault through it) zaps the whole sp;
        otherwise ``get_written_sptes`` picks the SPTE(s) to zap (two for a
        32-bit PDE, none if the quadrant differs) and the next fault rebuilds.
        """
        if not self.indirect_shadow_pages:
            return
        if pae is None:
            writer = self._writer
            pae = writer is None or bool(writer.cr4 & paging.CR4_PAE)
        if self._mmu_lock_owner is not None:
            self._deferred.append((gpa, bytes(new), pae))
            return
        nbytes = len(new)
        if pae and nbytes == 4:
            gpa &= ~7
            nbytes = 8
        # mmu_pte_write_fetch_gpte: the new gPTE, read for 4/8-byte writes only.
        gentry = (self.read_gpte(gpa, nbytes) or 0) if nbytes in (4, 8) else 0
        gfn = gpa >> 12
        offset = gpa & 0xFFF
        flush = False
        for sp in list(self.gfn_sps.get(gfn, ())):
            if sp.invalid:
                continue
            misaligned = self.detect_write_misaligned(offset, nbytes, self.gpte_size(sp))
            if misaligned or self.detect_write_flooding(sp):
                self.vm.stats["mmu_flooded"] += 1
                self.zap_page(sp)
                continue
            written = self.get_written_sptes(sp, offset)
            if written is None:
                continue
            first, npte = written
            for i in range(first, first + npte):
                # ++mmu_pde_zapped for every written entry of an upper-level sp
                # when the new gPTE is non-zero, present SPTE or not.
                if gentry and sp.role.level > 1:
                    self.vm.stats["mmu_pde_zapped"] += 1
                if not self.spte(sp, i):
                    continue
                gfn0, nr = self.spte_flush_range(sp, i)
                if self.drop_spte(sp, i):
                    flush = True
                    self.flush_gfns(gfn0, nr)
        self.vm.stats["mmu_pte_write"] += 1
        if flush:
            self.vm.stats["mmu_pte_write_flush"] += 1

    @staticmethod
    def get_written_sptes(sp: ShadowPage, offset: int) -> tuple[int, int] | None:
        """``get_written_sptes`` (mmu.c): (first SPTE index, count) a write at
        page ``offset`` hits, or None when a 32-bit sp's quadrant is another.

        4-byte gPTEs: the offset doubles (32->64); a 32-bit PDE maps 4 MiB, so
        it doubles again and two 2 MiB shadow PDEs are zapped.
        """
        if not sp.role.has_4_byte_gpte:
            return offset >> 3, 1
        npte = 1
        page_offset = offset << 1
        if sp.role.level == 2:
            page_offset = (page_offset & ~7) << 1
            npte = 2
        if page_offset >> 12 != sp.role.quadrant:
            return None
        return (page_offset & 0xFFF) >> 3, npte

    @staticmethod
    def detect_write_misaligned(offset: int, nbytes: int, pte_size: int = 8) -> bool:
        """``detect_write_misaligned``: crosses a gPTE, or shorter than 4 bytes
        (a 1-byte write at a gPTE-aligned offset is allowed: ``clear_bit``)."""
        if not offset & (pte_size - 1) and nbytes == 1:
            return False
        return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4

    @staticmethod
    def detect_write_flooding(sp: ShadowPage) -> bool:
        """``detect_write_flooding``: upper-level tables only, 3 writes since a fault."""
        if sp.role.level == 1:
            return False
        sp.write_flooding_count += 1
        return sp.write_flooding_count >= 3
