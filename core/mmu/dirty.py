"""Dirty logging: ``kvm_mmu_slot_apply_flags`` and get-and-clear re-protection.

``arch/x86/kvm/x86.c: kvm_mmu_slot_apply_flags`` (spec/kvm-mmu-2.md §7.1),
eager page split (§5.3), huge-page recovery when logging stops
(``kvm_mmu_zap_collapsible_sptes`` before ~6.13, ``kvm_mmu_recover_huge_pages``
after; the boundary is unverified in the spec), and the re-protection of
harvested gfns (``kvm_arch_mmu_enable_log_dirty_pt_masked`` ->
``kvm_tdp_mmu_clear_dirty_pt_masked``, §7.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu import spte as S
from kvmmu.mmu.tdp import TdpBase

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot

__all__ = ["DirtyMixin"]

_PS = np.uint64(S.PT_PAGE_SIZE_MASK)
_ADDR = S.SPTE_BASE_ADDR_MASK


class DirtyMixin(TdpBase):
    """Dirty-logging transitions and re-protection."""

    def slot_apply_flags(self, old: Memslot | None, new: Memslot | None, change: Any) -> None:
        """``kvm_mmu_slot_apply_flags`` (spec/kvm-mmu-2.md §7.1)."""
        old_flags = old.flags if old is not None else 0
        new_flags = new.flags if new is not None else 0
        log_old = bool(old_flags & 1)
        log_new = bool(new_flags & 1)
        if log_old != log_new:
            # kvm_mmu_update_cpu_dirty_logging: PML on/off (not modelled: no PML).
            self.vm.stats["cpu_dirty_logging_update"] += 1
        if getattr(change, "name", str(change)) != "FLAGS_ONLY" or new is None:
            return
        if new.is_readonly:
            return
        if not log_new:
            if log_old:
                self.recover_huge_pages(new)
            return
        if log_old:
            return
        memslots = self.vm.memslots
        if getattr(memslots, "manual_dirty_log_protect", False) and getattr(
            memslots, "dirty_log_initially_set", False
        ):
            # The bitmap starts all-ones: nothing to protect now (§7.1).
            return
        if getattr(self.vm.config, "eager_page_split", True):
            self.split_huge_pages_range(new.base_gfn, new.end_gfn, 1, new.as_id)
        if self.cpu_dirty_log_size:
            self.clear_bits_range(new.base_gfn, new.end_gfn, self.fmt.dirty_mask, 1, new.as_id)
            self.clear_bits_range(new.base_gfn, new.end_gfn, S.PT_WRITABLE_MASK, 2, new.as_id)
        else:
            # kvm_mmu_slot_remove_write_access(PG_LEVEL_4K): W only, keep MMU-writable.
            self.clear_bits_range(new.base_gfn, new.end_gfn, S.PT_WRITABLE_MASK, 1, new.as_id)
        # kvm_flush_remote_tlbs_memslot: always, over the whole slot (§7.1 "Always
        # flush remote TLBs afterwards"), even when no SPTE changed.
        self.flush_range((new.base_gfn, new.end_gfn))

    def write_protect_gfns(self, gfns: np.ndarray, as_id: int = 0) -> None:
        """Re-protect harvested gfns (``kvm_tdp_mmu_clear_dirty_pt_masked``, wrprot).

        Clears W (keeping MMU-writable) on the 4K leaves of ``gfns``; huge
        leaves are not touched (the kernel's masked clear is 4K-only). One
        ``flush_remote_tlbs_gfns`` call with the gfns that changed.
        """
        arr = np.unique(np.asarray(gfns, dtype=np.int64))
        if arr.size == 0:
            return
        changed: list[np.ndarray] = []
        w = np.uint64(S.PT_WRITABLE_MASK if not self.cpu_dirty_log_size else self.fmt.dirty_mask)
        tables = arr >> 9
        cuts = np.flatnonzero(np.diff(tables)) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [arr.size])).tolist()
        for root in self.roots_for(as_id):
            for s, e in zip(starts, ends, strict=True):
                leaf = self._leaf_table(root.idx, int(arr[s]))
                if leaf is None:
                    continue
                idxs = (arr[s:e] & 511).astype(np.intp)
                ents = self.pool.data[leaf, idxs]
                sel = ((ents & self._np_present) != 0) & ((ents & w) != 0)
                if sel.any():
                    self.pool.data[leaf, idxs[sel]] = ents[sel] & ~w
                    changed.append(arr[s:e][sel])
        if changed:
            out = np.unique(np.concatenate(changed)).astype(np.uint64)
            self.vm.hooks.flush_remote_tlbs_gfns(out)

    def _leaf_table(self, root_idx: int, gfn: int) -> int | None:
        """The 4K table covering ``gfn``, or None if the walk stops above it."""
        data = self.pool.data
        idx = root_idx
        level = self.root_level
        while level > 1:
            spte = int(data[idx, (gfn >> (9 * (level - 1))) & 511])
            if not spte & self.mmu_present or spte & S.PT_PAGE_SIZE_MASK:
                return None
            idx = ((spte & _ADDR) >> 12) - self._pfn_base
            level -= 1
        return idx

    # ------------------------------------------------------- huge recovery
    def recover_huge_pages(self, slot: Memslot) -> None:
        """Logging stopped: restore huge mappings where the slot allows them.

        Before 6.13 ``kvm_mmu_zap_collapsible_sptes``: zap each non-leaf SPTE
        that could map huge, so the next fault maps it huge. From 6.13
        ``kvm_mmu_recover_huge_pages``: replace it in place with
        ``make_huge_spte`` of its first present leaf. Either flushes the
        changed hull.
        """
        era = getattr(self.vm, "era", None)
        in_place = era is None or era >= (6, 13)
        lo, hi = -1, -1
        data = self.pool.data
        for root in self.roots_for(slot.as_id):
            for idx, level, i0, i1 in self.walk_tables(root.idx, slot.base_gfn, slot.end_gfn, 2):
                if level < 2 or level > self.max_huge_page_level:
                    continue
                span = S.KVM_PAGES_PER_HPAGE(level)
                base = int(self.pool.gfn[idx])
                data = self.pool.data
                ents = data[idx, i0:i1]
                nl = np.flatnonzero(((ents & self._np_present) != 0) & ((ents & _PS) == 0))
                for h in nl.tolist():
                    i = i0 + h
                    gfn = base + i * span
                    if gfn < slot.base_gfn or gfn + span > slot.end_gfn:
                        continue
                    if self.max_mapping_level(slot, gfn, level) < level:
                        continue
                    spte = int(data[idx, i])
                    child = ((spte & _ADDR) >> 12) - self._pfn_base
                    if in_place:
                        leaf = self._first_leaf(child)
                        if leaf is None:
                            continue
                        data[idx, i] = S.make_huge_spte(
                            self.fmt, leaf, level, nx_huge_pages=self.nx_huge_pages
                        )
                    else:
                        data[idx, i] = 0
                    self.free_subtree(child)
                    data = self.pool.data
                    lo = gfn if lo < 0 else min(lo, gfn)
                    hi = max(hi, gfn + span)
        self.flush_range(None if lo < 0 else (lo, hi))

    def _first_leaf(self, idx: int) -> int | None:
        """``tdp_mmu_make_huge_spte``'s search: any present leaf below ``idx``."""
        data = self.pool.data
        ents = data[idx]
        present = np.flatnonzero((ents & self._np_present) != 0)
        if not present.size:
            return None
        level = int(self.pool.level[idx])
        for i in present.tolist():
            spte = int(ents[i])
            if level == 1 or spte & S.PT_PAGE_SIZE_MASK:
                return spte
            found = self._first_leaf(((spte & _ADDR) >> 12) - self._pfn_base)
            if found is not None:
                return found
        return None
