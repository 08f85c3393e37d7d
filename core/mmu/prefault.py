"""``KVM_PRE_FAULT_MEMORY`` (6.10+; spec/kvm-mmu-2.md §6), vectorised.

Semantics (``kvm_vcpu_pre_fault_memory`` in ``virt/kvm/kvm_main.c`` and
``kvm_arch_vcpu_pre_fault_memory`` / ``kvm_tdp_map_page`` in mmu.c): each step
is a *prefetch* read fault (``error_code = PFERR_GUEST_FINAL``, no guest
page-table walk, ``pf_taken`` not counted, SPTEs made without Accessed) that
loops on RETRY; FIXED/SPURIOUS succeed, EMULATE is ``-ENOENT``, anything else
``-EIO``; the step advances to the end of the mapping it hit. The ioctl
returns success if any page was processed, else the first error.

Two bulk paths produce exactly what the per-page faults would, with numpy:

* the huge path (:meth:`PrefaultMixin._prefault_huge`) maps every whole 2M
  frame (and whole 1G region of a 1G host page) of a huge-page VMA up to the
  next 512 GiB boundary in one go: one host populate, one ``alloc_many`` of
  the page directories, one fill of the leaves from the ``make_spte``
  template, one vectorised link;
* the 4K bulk path handles whole 2M frames a 1 GiB region at a time, at 4K
  or 2M per frame: the same level per frame (``__kvm_mmu_max_mapping_level``,
  dirty logging, the vendor's ``max_mapping_level``), the same SPTE bits
  (``make_spte`` with the pfn ORed into a per-frame template), SPURIOUS for
  present SPTEs.

Anything unusual (present huge SPTEs, NX-split tables, host faults,
invalidations in progress, partial frames) goes through the scalar fault path.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
from kvmmu import spte as S
from kvmmu.errors import KvmError
from kvmmu.mmu.fault import (
    PFERR_GUEST_FINAL_MASK,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    FaultMixin,
)

__all__ = ["MAX_PREFAULT_RETRIES", "PrefaultMixin"]

#: The kernel loops on RETRY until a signal arrives; the model gives up with
#: ``-EINTR`` after this many retries (single-threaded: nothing else can end
#: an invalidation that is in progress).
MAX_PREFAULT_RETRIES = 64

_PS = np.uint64(S.PT_PAGE_SIZE_MASK)
_ADDR = np.uint64(S.SPTE_BASE_ADDR_MASK)
_SHIFT = np.uint64(S.PAGE_SHIFT)


class PrefaultMixin(FaultMixin):
    """``pre_fault_memory`` for :class:`kvmmu.mmu.TdpMmu`."""

    _prefault_vcpu: Any = None
    _templates: dict[tuple[int, bool, int | None, bool], int]

    def pre_fault_memory(self, gpa: int, size: int, vcpu: Any = None) -> int:
        """Pre-fault ``[gpa, gpa+size)``; return the bytes processed.

        The caller advances ``gpa``/``size`` by the result (the ioctl's
        in/out struct). Raises :class:`KvmError` when nothing was processed:
        EINVAL (unaligned, size 0, wrap), ENOENT (no memslot: the fault would
        emulate), EFAULT (no host mapping), EAGAIN (memslot being changed),
        EINTR (retry did not end), EIO.
        """
        if size == 0 or gpa % 4096 or size % 4096 or gpa + size > (1 << 64) - 1:
            raise KvmError(errno.EINVAL, f"pre_fault_memory: bad range gpa={gpa:#x} size={size:#x}")
        done = 0
        self._prefault_vcpu = vcpu
        self._templates: dict[tuple[int, bool, int | None, bool], int] = {}
        while done < size:
            try:
                n = 0
                if not self.ad_disabled:
                    # Without A/D every step may first hit fast_page_fault,
                    # which restores access-tracked leaves (FIXED, goal 4K;
                    # spec/kvm-mmu.md §3.11): only the scalar path models it.
                    n = self._prefault_huge(gpa + done, size - done, vcpu)
                    if n == 0:
                        n = self._prefault_bulk(gpa + done, size - done, vcpu)
                if n == 0:
                    n = self._prefault_one(gpa + done, size - done, vcpu)
            except KvmError:
                if done == 0:
                    raise
                break
            done += n
        self.vm.stats["pre_fault_bytes"] += done
        return done

    # ------------------------------------------------------------- scalar
    def _prefault_one(self, gpa: int, size: int, vcpu: Any) -> int:
        """``kvm_arch_vcpu_pre_fault_memory`` for one mapping."""
        for _ in range(MAX_PREFAULT_RETRIES):
            r = self.page_fault(vcpu, gpa, PFERR_GUEST_FINAL_MASK, prefetch=True)
            if r != RET_PF_RETRY:
                break
        else:
            raise KvmError(errno.EINTR, f"pre_fault_memory: gpa {gpa:#x} kept retrying")
        if r == RET_PF_EMULATE:
            raise KvmError(errno.ENOENT, f"pre_fault_memory: gpa {gpa:#x} is not in a memslot")
        if r not in (RET_PF_FIXED, RET_PF_SPURIOUS):
            raise KvmError(errno.EIO, f"pre_fault_memory: unexpected RET_PF {r}")
        # kvm_arch_vcpu_pre_fault_memory: progress to the end of the mapping
        # at fault.goal_level (4K when the fast path answered), not at the
        # level of whatever SPTE is there (kvm-mmu-2.md §6 step 5).
        level = self.last_goal_level
        span = S.KVM_PAGES_PER_HPAGE(level) << S.PAGE_SHIFT
        end = (gpa & ~(span - 1)) + span
        return min(size, end - gpa)

    # --------------------------------------------------------------- bulk
    def _prefault_bulk(self, gpa: int, size: int, vcpu: Any) -> int:
        """Whole 2M frames up to the next 1 GiB boundary; 0 = not applicable."""
        gfn = gpa >> S.PAGE_SHIFT
        if gfn & 511 or self.invalidate.in_progress or self.root_level < 3:
            return 0
        slot = self.vm.memslots.gfn_to_memslot(gfn, 0)
        if slot is None or slot.is_invalid:
            return 0
        region_end = (gfn | ((1 << 18) - 1)) + 1
        end = min(region_end, slot.end_gfn, gfn + (size >> S.PAGE_SHIFT))
        nframes = (end - gfn) >> 9
        if nframes == 0:
            return 0
        vm = self.vm
        max_level = self.max_huge_page_level
        hook_lvl = vm.hooks.max_mapping_level(vcpu, gfn & ~((1 << 18) - 1), max_level)
        # The vendor's level at the 1G region's start speaks for the whole
        # region only if it allows 1G (kvm_mtrr_check_gfn_range_consistency
        # over KVM_PAGES_PER_HPAGE(1G)); a 2M answer covers the first frame only.
        uniform = hook_lvl is None or hook_lvl >= S.PG_LEVEL_1G
        if max_level >= 3 and not slot.logs_dirty and (hook_lvl is None or hook_lvl >= 3):
            # Would the fault at gfn map the whole 1G region? It faults the
            # host page in first (hva_to_pfn), then takes the host level.
            try:
                vm.host.hva_to_pfn(slot.gfn_to_hva(gfn), write=False)
            except KvmError:
                return 0
            if self.max_mapping_level(slot, gfn, max_level) >= 3:
                return 0  # one 1G mapping: the scalar fault does it in one step
        pd = self._table_for(gfn, 2)
        if pd is None:
            return 0
        plan = self._plan_frames(slot, gfn, nframes, vcpu, uniform, max_level)
        if not plan:
            return 0
        return self._install_frames(slot, pd, gfn, plan) << (9 + S.PAGE_SHIFT)

    def _table_for(self, gfn: int, level: int, create: bool = True) -> int | None:
        """Walk to the table of ``level`` for ``gfn``, linking missing tables as
        ``kvm_tdp_mmu_map`` does (``tdp_mmu_link_sp``); None at a huge leaf
        above it, or at a missing table when not ``create``."""
        root = self.get_root(0)
        idx = root.idx
        lvl = self.root_level
        while lvl > level:
            i = (gfn >> (9 * (lvl - 1))) & 511
            spte = int(self.pool.data[idx, i])
            if spte & self.mmu_present:
                if spte & S.PT_PAGE_SIZE_MASK:
                    return None
                idx = ((spte & S.SPTE_BASE_ADDR_MASK) >> 12) - self._pfn_base
            elif create:
                idx = self.link_sp(idx, i, lvl - 1, gfn & ~(S.KVM_PAGES_PER_HPAGE(lvl) - 1))
            else:
                return None
            lvl -= 1
        return idx

    # --------------------------------------------------------------- huge
    def _prefault_huge(self, gpa: int, size: int, vcpu: Any) -> int:
        """Whole 2M frames (and 1G regions) of a huge-page VMA at once; 0 = not applicable.

        Each frame's ``kvm_tdp_map_page`` would fault the host page in
        (``hva_to_pfn``), pick the level of ``kvm_mmu_hugepage_adjust`` (1G
        for a whole region of a 1G host page without disallow counts, else
        2M), link a new PD per 1G region (``tdp_mmu_link_sp``) and write one
        leaf (``make_spte``) with no flush. Here that is one host populate
        (:meth:`HostMemory.fault_in_blocks`), one ``alloc_many``, one numpy
        fill from the ``make_spte`` template and one vectorised link. Covers
        the leading frames for which every rule gives that outcome, up to
        the next 512 GiB boundary; the rest goes to the other paths.
        """
        gfn = gpa >> S.PAGE_SHIFT
        max_level = self.max_huge_page_level
        if gfn & 511 or self.invalidate.in_progress or self.root_level < 3 or max_level < 2:
            return 0
        vm = self.vm
        slot = vm.memslots.gfn_to_memslot(gfn, 0)
        if slot is None or slot.is_invalid or slot.logs_dirty:
            return 0
        host = vm.host
        hva0 = slot.gfn_to_hva(gfn)
        vma = host.find_vma(hva0)
        if vma is None or vma.blocks is None or hva0 & ((512 << S.PAGE_SHIFT) - 1):
            return 0
        end = min(slot.end_gfn, gfn + (size >> S.PAGE_SHIFT), (gfn | ((1 << 27) - 1)) + 1)
        nframes = min((end - gfn) >> 9, (vma.end - hva0) >> (9 + S.PAGE_SHIFT))
        # disallow_lpage at 2M: write tracking, misaligned slot ends, attributes
        if nframes <= 0:
            return 0
        i2 = slot.lpage_idx(gfn, 2)
        lp2 = slot.lpage_info[2][i2 : i2 + nframes]
        if lp2.any():
            nframes = int(np.flatnonzero(lp2)[0])
            if nframes == 0:
                return 0
        # The vendor's cap (guest MTRRs) depends on the era and configuration,
        # not on the gfn: None here is None for the whole range, and so is the
        # gfn-independence of get_mt_mask that the 4K bulk path relies on.
        if vm.hooks.max_mapping_level(vcpu, gfn & ~((1 << 18) - 1), max_level) is not None:
            return 0
        g9 = gfn >> 9
        r0 = gfn >> 18
        j0 = r0 & 511
        nregions = ((g9 + nframes - 1) >> 9) - r0 + 1
        # PDPT entries (the PDPT may not exist yet: nothing mapped) and the
        # 1G-capable regions; None = all zero / none, the common case.
        pdpt = self._table_for(gfn, 3, create=False)
        ents = None
        if pdpt is not None:
            ents = self.pool.data[pdpt, j0 : j0 + nregions].copy()
            if not ents.any():
                ents = None
        cap3 = None
        if max_level >= 3 and vma.page_level >= 3:
            i3 = slot.lpage_idx(gfn, 3)
            cap3 = slot.lpage_info[3][i3 : i3 + nregions] == 0
            if not cap3.any():
                cap3 = None
        if ents is not None or cap3 is not None:
            nframes = self._huge_prefix(g9, nframes, ents, cap3)
            if nframes <= 0:
                return 0
        # host pages: every block the frames lie in, as the faults would
        page0 = hva0 >> S.PAGE_SHIFT
        blocks = host.fault_in_blocks(hva0, nframes << 9, write=False)
        sh = 9 * (vma.page_level - 1)
        first_blk = page0 >> sh
        nframes = min(nframes, (((first_blk + blocks.size) << sh) - page0) >> 9)
        if nframes <= 0:
            return 0
        if sh == 9:
            pfns = blocks[:nframes]
        else:
            pages = page0 + (np.arange(nframes, dtype=np.int64) << 9)
            pfns = blocks[(pages >> sh) - first_blk] + (pages & ((1 << sh) - 1))
        writable = bool(vma.writable) and not slot.is_readonly
        mt = vm.hooks.get_mt_mask(vcpu, gfn, host.is_mmio_pfn(int(pfns[0])))
        pdpt = self._table_for(gfn, 3)
        if pdpt is None:
            return 0
        return self._install_huge(pdpt, gfn, pfns, ents, cap3, writable, mt)

    def _huge_prefix(
        self, g9: int, nframes: int, ents: np.ndarray | None, cap3: np.ndarray | None
    ) -> int:
        """How many leading frames the huge path may map, given the PDPT entries.

        Stops before a present huge leaf (the fault is SPURIOUS), before a
        1G-capable region that is already split or only partly requested
        (the fault maps or skips the whole 1G), and at the first present
        entry of an existing PD (SPURIOUS, nothing changes).
        """
        r0 = g9 >> 9
        nregions = ((g9 + nframes - 1) >> 9) - r0 + 1
        none = np.zeros(nregions, dtype=np.bool_)
        present = none if ents is None else (ents & self._np_present) != 0
        leaf = none if ents is None else present & ((ents & _PS) != 0)
        big = none if cap3 is None else cap3
        starts = np.maximum((np.arange(r0, r0 + nregions, dtype=np.int64) << 9) - g9, 0)
        full = (starts + 512 <= nframes) & ((starts > 0) | (g9 & 511 == 0))
        stop = nframes
        bad = np.flatnonzero(leaf | (big & (present | ~full)))
        if bad.size:
            stop = int(starts[bad[0]])
        if ents is None:
            return stop
        split = np.flatnonzero(present & ~leaf)
        kids = ((ents[split] & _ADDR) >> _SHIFT).astype(np.int64) - self._pfn_base
        for j, kid in zip(split.tolist(), kids.tolist(), strict=True):
            lo = int(starts[j])
            if lo >= stop:
                break
            c0 = (g9 + lo) & 511
            row = self.pool.data[kid, c0 : c0 + min(512 - c0, stop - lo)]
            hit = np.flatnonzero((row & self._np_present) != 0)
            if hit.size:
                return lo + int(hit[0])
        return stop

    def _install_huge(
        self,
        pdpt: int,
        gfn: int,
        pfns: np.ndarray,
        ents: np.ndarray | None,
        cap3: np.ndarray | None,
        writable: bool,
        mt: int | None,
    ) -> int:
        """Write the leaves and PDs :meth:`_prefault_huge` planned; bytes handled.

        Leaves are ``make_spte``'s template with the pfn ORed in
        (:meth:`_template`); a new PD is linked with ``make_nonleaf_spte``
        (``tdp_mmu_link_sp``). PDs are allocated in region order, as the
        faults would allocate them.
        """
        pool = self.pool
        nframes = int(pfns.size)
        g9 = gfn >> 9
        r0 = gfn >> 18
        j0 = r0 & 511
        nregions = ((g9 + nframes - 1) >> 9) - r0 + 1
        tmpl = np.uint64(self._template(2, writable, mt, False))
        if ents is None and cap3 is None:
            new_pd = np.arange(nregions, dtype=np.int64)
            giant = new_pd[:0]
        else:
            none = np.zeros(nregions, dtype=np.bool_)
            present = none if ents is None else (ents[:nregions] & self._np_present) != 0
            big = none if cap3 is None else cap3[:nregions]
            new_pd = np.flatnonzero(~present & ~big)
            giant = np.flatnonzero(big)
        k = int(new_pd.size)
        idxs = pool.alloc_many(k, 2, (new_pd + r0) << 18) if k else new_pd
        data = pool.data  # alloc_many may have grown the pool
        fixed = nframes
        i0 = int(idxs[0]) if k else 0
        if k << 9 == nframes and not g9 & 511 and int(idxs[-1]) - i0 == k - 1:
            # every frame in a new PD, whole PDs, fresh rows: one block write
            dest = data[i0 : i0 + k].reshape(-1)
            np.left_shift(pfns.view(np.uint64), _SHIFT, out=dest)
            dest |= tmpl
        else:
            vals = (pfns.view(np.uint64) << _SHIFT) | tmpl
            rows = np.full(nregions, -1, dtype=np.int64)
            if ents is not None:
                e = ents[:nregions]
                old = ((e & self._np_present) != 0) & ((e & _PS) == 0)
                rows[old] = ((e[old] & _ADDR) >> _SHIFT).astype(np.int64) - self._pfn_base
            rows[new_pd] = idxs
            frames = np.arange(nframes, dtype=np.int64)
            frame_rows = rows[((g9 + frames) >> 9) - r0]
            sel = frame_rows >= 0
            flat = data.reshape(-1)
            flat[(frame_rows[sel] << 9) + ((g9 + frames[sel]) & 511)] = vals[sel]
            fixed = int(sel.sum())
        if k:
            nonleaf = np.uint64(S.make_nonleaf_spte(self.fmt, 0, self.ad_disabled))
            data[pdpt, j0 + new_pd] = nonleaf | (
                (idxs.astype(np.uint64) + np.uint64(self._pfn_base)) << _SHIFT
            )
        if giant.size:
            t3 = np.uint64(self._template(3, writable, mt, False))
            first = ((giant + r0) << 9) - g9
            data[pdpt, j0 + giant] = t3 | (pfns[first].astype(np.uint64) << _SHIFT)
            fixed += int(giant.size)
        stats = self.vm.stats
        stats["pf_fixed"] += fixed
        stats["ret_pf.FIXED"] += fixed
        return nframes << (9 + S.PAGE_SHIFT)

    def _plan_frames(
        self, slot: Any, gfn: int, nframes: int, vcpu: Any, uniform: bool, max_level: int
    ) -> list[tuple[int, np.ndarray, bool, int | None]]:
        """Per frame: (goal level, pfns, host writable, mt_mask); stops at trouble."""
        vm = self.vm
        host = vm.host
        plan: list[tuple[int, np.ndarray, bool, int | None]] = []
        dirty = slot.logs_dirty
        lp2 = slot.lpage_info.get(2) if max_level >= 2 else None
        mt_cache: dict[bool, int | None] = {}
        hva0 = slot.gfn_to_hva(gfn)
        vma = host.find_vma(hva0)
        if vma is None:
            return plan
        # Frames wholly inside this VMA; the caller comes back for the rest.
        nframes = min(nframes, (vma.end - hva0) >> (9 + S.PAGE_SHIFT))
        if nframes == 0:
            return plan
        try:
            all_pfns = host.hva_to_pfn_range(hva0, nframes << 9, write=False)
        except KvmError:
            # hva_to_pfn failed somewhere: plan frame by frame up to it.
            all_pfns = None
        frame_bytes = 512 << S.PAGE_SHIFT
        for f in range(nframes):
            fgfn = gfn + (f << 9)
            hva = hva0 + f * frame_bytes
            if all_pfns is not None:
                pfns = all_pfns[f << 9 : (f + 1) << 9]
            else:
                try:
                    pfns = host.hva_to_pfn_range(hva, 512, write=False)
                except KvmError:
                    break
            # host_pfn_mapping_level over the frame: a 512-page span lies in at
            # most two host leaves of 2M or more, so its two ends decide.
            host_level = min(
                host.host_mapping_level(hva), host.host_mapping_level(hva + frame_bytes - 4096)
            )
            level = 1
            flvl = 2
            if not uniform:
                r = vm.hooks.max_mapping_level(vcpu, fgfn, 2)
                flvl = 2 if r is None else min(2, r)
            if (
                not dirty
                and max_level >= 2
                and lp2 is not None
                and host_level >= 2
                and flvl >= 2
                and not lp2[slot.lpage_idx(fgfn, 2)]
            ):
                level = 2
            is_mmio = host.is_mmio_pfn(int(pfns[0]))
            mt: int | None
            if uniform:
                if is_mmio not in mt_cache:
                    mt_cache[is_mmio] = vm.hooks.get_mt_mask(vcpu, fgfn, is_mmio)
                mt = mt_cache[is_mmio]
            elif flvl >= 2:
                # the vendor says this 2M frame has one memory type
                mt = vm.hooks.get_mt_mask(vcpu, fgfn, is_mmio)
            else:
                mt = -1  # per-gfn get_mt_mask calls in _leaf_values
            writable = bool(vma.writable) and not slot.is_readonly
            plan.append((level, pfns, writable, mt))
        return plan

    def _template(self, level: int, writable: bool, mt: int | None, tracked: bool) -> int:
        """``make_spte`` of a prefetch read fault with pfn 0 (the pfn is ORed in).

        Memoised per ``pre_fault_memory`` call: every other input of
        ``make_spte`` here is fixed for the VM.
        """
        key = (level, writable, mt, tracked)
        cached = self._templates.get(key)
        if cached is not None:
            return cached
        spte, _ = S.make_spte(
            self.fmt,
            level=level,
            pfn=0,
            old_spte=0,
            pte_access=S.ACC_ALL,
            prefetch=True,
            synchronizing=False,
            host_writable=writable,
            mt_mask=mt,
            nx_huge_pages=self.nx_huge_pages,
            ad_disabled=self.ad_disabled,
            try_unsync=lambda: int(tracked),
        )
        self._templates[key] = spte
        return spte

    def _install_frames(
        self, slot: Any, pd: int, gfn: int, plan: list[tuple[int, np.ndarray, bool, int | None]]
    ) -> int:
        """Write the planned frames; returns how many frames were handled."""
        vm = self.vm
        pool = self.pool
        i0 = (gfn >> 9) & 511
        ents = pool.data[pd, i0 : i0 + len(plan)].copy()
        present = (ents & self._np_present) != 0
        huge = present & ((ents & _PS) != 0)
        fixed = spurious = 0
        handled = 0
        new_tables: list[int] = []
        fill_existing: list[int] = []
        for f, (level, pfns, writable, mt) in enumerate(plan):
            if level == 2:
                if present[f] and not huge[f] and self.nx_huge_pages:
                    child = ((int(ents[f]) & S.SPTE_BASE_ADDR_MASK) >> 12) - self._pfn_base
                    if pool.nx_disallowed[child]:
                        break  # disallowed_hugepage_adjust: the scalar path
                if present[f]:
                    spurious += 1
                else:
                    pool.data[pd, i0 + f] = self._template(2, writable, mt, False) | (
                        int(pfns[0]) << S.PAGE_SHIFT
                    )
                    fixed += 1
            elif huge[f]:
                break  # a huge SPTE to split: the scalar path
            elif present[f]:
                fill_existing.append(f)
            else:
                new_tables.append(f)
            handled = f + 1
        if new_tables:
            k = len(new_tables)
            fgfns = np.array([gfn + (f << 9) for f in new_tables], dtype=np.int64)
            idxs = pool.alloc_many(k, 1, fgfns)
            block = np.empty((k, 512), dtype=np.uint64)
            for row, f in enumerate(new_tables):
                self._leaf_values(slot, gfn + (f << 9), plan[f], block[row])
            if int(idxs[-1]) - int(idxs[0]) == k - 1 and bool(np.all(np.diff(idxs) == 1)):
                pool.data[int(idxs[0]) : int(idxs[0]) + k] = block
            else:
                pool.data[idxs] = block
            nonleaf = S.make_nonleaf_spte(self.fmt, 0, self.ad_disabled)
            cols = np.array(new_tables, dtype=np.int64) + i0
            pool.data[pd, cols] = np.uint64(nonleaf) | (
                (idxs.astype(np.uint64) + np.uint64(self._pfn_base)) << np.uint64(12)
            )
            fixed += k * 512
        for f in fill_existing:
            child = ((int(ents[f]) & S.SPTE_BASE_ADDR_MASK) >> 12) - self._pfn_base
            row = pool.data[child]
            empty = (row & self._np_present) == 0
            vals = self._leaf_values(slot, gfn + (f << 9), plan[f])
            row[empty] = vals[empty]
            n = int(empty.sum())
            fixed += n
            spurious += 512 - n
        if slot.logs_dirty and slot.dirty_bitmap is not None:
            for f in new_tables + fill_existing:
                if plan[f][2]:
                    for g in range(gfn + (f << 9), gfn + (f << 9) + 512):
                        if not self.vm.page_track.is_write_tracked(slot, g):
                            vm.memslots.mark_page_dirty(slot, g)
        stats = vm.stats
        stats["pf_fixed"] += fixed
        stats["ret_pf.FIXED"] += fixed
        stats["ret_pf.SPURIOUS"] += spurious
        return handled

    def _leaf_values(
        self,
        slot: Any,
        fgfn: int,
        entry: tuple[int, np.ndarray, bool, int | None],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The 512 4K SPTEs a frame's prefetch faults would write (into ``out``)."""
        _, pfns, writable, mt = entry
        if out is None:
            out = np.empty(512, dtype=np.uint64)
        if mt == -1:
            vals = np.empty(512, dtype=np.uint64)
            host = self.vm.host
            for j in range(512):
                m = self.vm.hooks.get_mt_mask(
                    self._prefault_vcpu, fgfn + j, host.is_mmio_pfn(int(pfns[j]))
                )
                vals[j] = self._template(1, writable, m, self._tracked(slot, fgfn + j))
            np.bitwise_or(vals, pfns << _SHIFT, out=out)
            return out
        vals = out
        np.left_shift(pfns, _SHIFT, out=vals)
        vals |= np.uint64(self._template(1, writable, mt, False))
        if writable:
            track = slot.gfn_write_track
            rel = fgfn - slot.base_gfn
            t = np.asarray(track[rel : rel + 512]) != 0
            if t.any():
                wp = np.uint64(self._template(1, writable, mt, True))
                vals[t] = (pfns[t] << _SHIFT) | wp
        return vals

    def _tracked(self, slot: Any, gfn: int) -> bool:
        return bool(self.vm.page_track.is_write_tracked(slot, gfn))
