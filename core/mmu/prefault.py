"""``KVM_PRE_FAULT_MEMORY`` (6.10+; spec/kvm-mmu-2.md §6), vectorised.

Semantics (``kvm_vcpu_pre_fault_memory`` in ``virt/kvm/kvm_main.c`` and
``kvm_arch_vcpu_pre_fault_memory`` / ``kvm_tdp_map_page`` in mmu.c): each step
is a *prefetch* read fault (``error_code = PFERR_GUEST_FINAL``, no guest
page-table walk, ``pf_taken`` not counted, SPTEs made without Accessed) that
loops on RETRY; FIXED/SPURIOUS succeed, EMULATE is ``-ENOENT``, anything else
``-EIO``; the step advances to the end of the mapping it hit. The ioctl
returns success if any page was processed, else the first error.

The bulk path handles whole 2M frames of a valid slot a 1 GiB region at a
time with numpy, producing exactly what the per-page faults would: the same
level per frame (``__kvm_mmu_max_mapping_level``, dirty logging, the vendor's
``max_mapping_level``), the same SPTE bits (``make_spte`` with the pfn ORed
into a per-frame template), SPURIOUS for present SPTEs. Anything unusual (1G
mappings, huge SPTEs to split, NX-split tables, host faults, invalidations in
progress, partial frames) goes through the scalar fault path.
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
        hit = self._last_spte(self.get_root(0), gpa >> S.PAGE_SHIFT)
        level = hit[2] if hit[3] & self.mmu_present else 1
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
        uniform = hook_lvl is None or hook_lvl >= S.PG_LEVEL_2M
        if (
            max_level >= 3
            and gfn & ((1 << 18) - 1) == 0
            and nframes == 512
            and self.max_mapping_level(slot, gfn, min(max_level, hook_lvl or max_level)) >= 3
        ):
            return 0  # one 1G mapping: the scalar fault does it in one step
        pd = self._pd_for(gfn)
        if pd is None:
            return 0
        plan = self._plan_frames(slot, gfn, nframes, vcpu, uniform, max_level)
        if not plan:
            return 0
        return self._install_frames(slot, pd, gfn, plan) << (9 + S.PAGE_SHIFT)

    def _pd_for(self, gfn: int) -> int | None:
        """Walk to (creating) the 2M-level table for ``gfn``; None at a huge leaf."""
        root = self.get_root(0)
        idx = root.idx
        level = self.root_level
        while level > 2:
            i = (gfn >> (9 * (level - 1))) & 511
            spte = int(self.pool.data[idx, i])
            if spte & self.mmu_present:
                if spte & S.PT_PAGE_SIZE_MASK:
                    return None
                idx = ((spte & S.SPTE_BASE_ADDR_MASK) >> 12) - self._pfn_base
            else:
                idx = self.link_sp(idx, i, level - 1, gfn & ~(S.KVM_PAGES_PER_HPAGE(level) - 1))
            level -= 1
        return idx

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
