"""The TDP MMU's tables: roots, walks, linking, splitting, zapping, write-protect.

A model of ``arch/x86/kvm/mmu/tdp_mmu.c`` (and the ``tdp_iter.c`` walk) on
the numpy :class:`~kvmmu.mmu.pool.SptePool`. One root per address space
(as_id 0 normal, 1 SMM); ``kvm_mmu_zap_all_fast`` marks roots invalid and
the next use builds a new one (spec/kvm-mmu.md §3.14). Bulk operations walk
the tables in the range and change each table's entries with numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu import spte as S
from kvmmu.mmu.invalidate import InvalidateState, hull_union
from kvmmu.mmu.pool import SPTE_ENT_PER_PAGE, SptePool, pool_base_for

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot
    from kvmmu.spte import SpteFormat

__all__ = ["Root", "TdpBase"]

_PS = np.uint64(S.PT_PAGE_SIZE_MASK)
_ADDR = np.uint64(S.SPTE_BASE_ADDR_MASK)
_ZERO = np.uint64(0)


class Root:
    """A TDP MMU root (``struct kvm_mmu_page`` with ``role.level`` = root level).

    ``invalid`` is ``role.invalid``; ``idx`` the pool row of the root table.
    ``exported_refs`` counts the references external users (a KVM TDP FD,
    spec/consumers.md T2 [TDP-35]) hold; ``exported`` is ``sp->exported``.
    vCPU references are the model's ``_vcpu_roots``.
    """

    __slots__ = ("as_id", "exported", "exported_refs", "idx", "invalid")

    def __init__(self, idx: int, as_id: int) -> None:
        self.idx = idx
        self.as_id = as_id
        self.invalid = False
        self.exported = False
        self.exported_refs = 0

    def __repr__(self) -> str:
        ex = f", exported={self.exported_refs}" if self.exported else ""
        return f"Root(idx={self.idx}, as_id={self.as_id}, invalid={self.invalid}{ex})"


class TdpBase:
    """State and table primitives shared by the fault path and bulk operations."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        fmt: SpteFormat = vm.spte_format
        self.fmt = fmt
        #: ``SPTE_MMU_PRESENT_MASK`` of this format (bit 11, or 59 with the T6
        #: move; spec/consumers.md T6), as int and as numpy scalar.
        self.mmu_present = int(fmt.mmu_present_mask)
        self._np_present = np.uint64(self.mmu_present)
        cfg = vm.config
        self.host_maxphyaddr = int(getattr(cfg, "host_maxphyaddr", 46))
        self.pool = SptePool(pool_base_for(self.host_maxphyaddr))
        self.root_level = int(fmt.root_level)
        #: ``max_huge_page_level`` (spec/kvm-mmu.md §3.6).
        self.max_huge_page_level = int(fmt.max_level)
        #: ``kvm_mmu_max_gfn``: the last gfn below host MAXPHYADDR.
        self.max_gfn = (1 << (self.host_maxphyaddr - S.PAGE_SHIFT)) - 1
        self.nx_huge_pages = bool(getattr(cfg, "nx_huge_pages", False))
        #: ``mmu_invalidate_retry_gfn[_unsafe]`` checks on (off only in the
        #: explorer's ``buggy`` variant of the seed-005 race).
        self.retry_check = bool(getattr(cfg, "mmu_notifier_retry_check", True))
        #: ``sp->role.ad_disabled`` for TDP = ``!kvm_ad_enabled``.
        self.ad_disabled = not fmt.ad_enabled
        #: ``tdp_mmu_enabled``: on by default since ~5.15 (spec kvm-mmu-2.md §8);
        #: off, the legacy direct MMU runs ``direct_pte_prefetch``.
        era = getattr(vm, "era", None)
        default_tdp_mmu = era is None or era >= (5, 15)
        self.tdp_mmu_enabled = bool(getattr(cfg, "tdp_mmu", default_tdp_mmu))
        #: ``kvm_x86_ops.cpu_dirty_log_size`` from the vendor: 0 = no PML,
        #: dirty logging by write-protection; else PML (spec/kvm-mmu-2.md §7).
        self.cpu_dirty_log_size = vm.hooks.cpu_dirty_log_size()
        self.invalidate = InvalidateState()
        #: ``kvm->arch.mmu_valid_gen`` (toggled by zap_all_fast).
        self.mmu_valid_gen = 0
        self.roots: list[Root] = []
        self._active: dict[int, Root] = {}
        #: id(vcpu) -> (vcpu, {as_id: Root}): ``vcpu->arch.mmu->root``.
        self._vcpu_roots: dict[int, tuple[Any, dict[int, Root]]] = {}
        #: id(vcpu) -> (vcpu, gfn, access, generation): the vCPU MMIO cache.
        self._mmio_cache: dict[int, tuple[Any, int, int, int]] = {}
        #: ``nx_lpage_splits``: sps tracked as possible NX huge pages.
        self.possible_nx_huge_pages: set[int] = set()
        self._pfn_base = self.pool.base_pfn
        #: MMU-notifier invalidations started: (hva_start, hva_end, found a slot).
        self._mn_found: list[tuple[int, int, bool]] = []

    # ------------------------------------------------------------------ roots
    def get_root(self, as_id: int = 0) -> Root:
        """``kvm_tdp_mmu_get_vcpu_root_hpa``: the valid root of ``as_id``, made on demand."""
        root = self._active.get(as_id)
        if root is None:
            root = Root(self.pool.alloc(self.root_level, 0), as_id)
            self.roots.append(root)
            self._active[as_id] = root
        return root

    def vcpu_root(self, vcpu: Any, as_id: int = 0) -> Root:
        """``kvm_mmu_reload``: the vCPU's root, reloaded if missing or obsolete.

        ``kvm_mmu_free_obsolete_roots`` drops an invalid root before the vCPU
        enters the guest (spec/kvm-mmu.md §3.14). ``vcpu`` None (IOMMU, no
        vCPU) uses the current valid root.
        """
        if vcpu is None:
            return self.get_root(as_id)
        entry = self._vcpu_roots.get(id(vcpu))
        if entry is None:
            entry = (vcpu, {})
            self._vcpu_roots[id(vcpu)] = entry
        roots = entry[1]
        root = roots.get(as_id)
        if root is None or root.invalid:
            root = self.get_root(as_id)
            roots[as_id] = root
        return root

    def get_exported_root(self, as_id: int = 0) -> int:
        """``kvm_tdp_mmu_get_exported_root`` (RFC "Sharing KVM TDP to IOMMU";
        spec/consumers.md T2 [TDP-35]): find the valid root of ``as_id`` and
        take a reference, or create it; mark it ``exported``. Returns its hpa.

        vCPUs in that mode keep loading the same root; ``zap_all_fast`` never
        invalidates it (T4).
        """
        root = self.get_root(as_id)
        root.exported = True
        root.exported_refs += 1
        self.vm.stats["tdp_exported_root_get"] += 1
        return self.pool.hpa(root.idx)

    def put_exported_root(self, hpa: int) -> None:
        """``kvm_tdp_mmu_put_exported_root`` (T2 put [TDP-35]).

        Drop one exported reference; on the last one clear ``exported``, zap
        the root's leaves (one ranged flush if anything was zapped) and, if
        no vCPU uses it as its root, free it (its refcount drops to zero:
        ``kvm_tdp_mmu_put_root``). A vCPU that still holds it keeps it.
        """
        root = next((r for r in self.roots if self.pool.hpa(r.idx) == hpa), None)
        if root is None or not root.exported:
            raise ValueError(f"put_exported_root: {hpa:#x} is not an exported root")
        root.exported_refs -= 1
        self.vm.stats["tdp_exported_root_put"] += 1
        if root.exported_refs:
            return
        root.exported = False
        self.flush_range(self.zap_root_leafs(root, 0, self.max_gfn + 1))
        if self._vcpu_holds(root):
            return
        # No vCPU reference: the root's refcount reaches zero and it is freed.
        root.invalid = True
        if self._active.get(root.as_id) is root:
            del self._active[root.as_id]
        self.free_subtree(root.idx)
        self.roots.remove(root)

    def _vcpu_holds(self, root: Root) -> bool:
        return any(r is root for _, roots in self._vcpu_roots.values() for r in roots.values())

    def exported_roots(self) -> list[Root]:
        """Roots currently exported (``sp->exported``)."""
        return [r for r in self.roots if r.exported]

    def root_hpa(self, as_id: int = 0) -> int:
        """Host physical address of the current root of ``as_id`` (IOMMU sharing)."""
        return self.pool.hpa(self.get_root(as_id).idx)

    def valid_roots(self, as_id: int | None = None) -> list[Root]:
        return [r for r in self.roots if not r.invalid and (as_id is None or r.as_id == as_id)]

    # ------------------------------------------------------------ primitives
    def child_idx(self, spte: int) -> int:
        """``spte_to_child_sp``: the pool row a non-leaf SPTE points to."""
        return ((spte & S.SPTE_BASE_ADDR_MASK) >> S.PAGE_SHIFT) - self._pfn_base

    def link_sp(self, parent: int, i: int, child_level: int, gfn: int) -> int:
        """``tdp_mmu_alloc_sp`` + ``tdp_mmu_link_sp``: a new empty table at ``parent[i]``."""
        child = self.pool.alloc(child_level, gfn)
        self.pool.data[parent, i] = S.make_nonleaf_spte(
            self.fmt, self.pool.hpa(child), self.ad_disabled
        )
        return child

    def small_sptes(self, huge_spte: int, child_level: int) -> np.ndarray:
        """The 512 ``make_small_spte`` children of ``huge_spte`` (TDP role: ACC_ALL)."""
        first = S.make_small_spte(
            self.fmt,
            huge_spte,
            child_level,
            0,
            exec_allowed=True,
            nx_huge_pages=self.nx_huge_pages,
        )
        step = S.KVM_PAGES_PER_HPAGE(child_level) << S.PAGE_SHIFT
        offs = np.arange(SPTE_ENT_PER_PAGE, dtype=np.uint64) * np.uint64(step)
        return np.uint64(first) | offs

    def split_huge_page(
        self, parent: int, i: int, level: int, huge_spte: int, nx_disallowed: bool
    ) -> int:
        """``tdp_mmu_split_huge_page``: replace a huge leaf with a full child table.

        No TLB flush: the translation is unchanged (tdp_mmu.c comment).
        """
        gfn = int(self.pool.gfn[parent]) + i * S.KVM_PAGES_PER_HPAGE(level)
        child = self.pool.alloc(level - 1, gfn)
        self.pool.data[child] = self.small_sptes(huge_spte, level - 1)
        self.pool.nx_disallowed[child] = nx_disallowed
        self.pool.data[parent, i] = S.make_nonleaf_spte(
            self.fmt, self.pool.hpa(child), self.ad_disabled
        )
        self.vm.stats["tdp_split_huge_page"] += 1
        return child

    def free_subtree(self, idx: int) -> None:
        """``handle_removed_pt``: free a table and every table below it."""
        stack = [idx]
        data = self.pool.data
        while stack:
            t = stack.pop()
            if int(self.pool.level[t]) > 1:
                ents = data[t]
                nl = np.flatnonzero(((ents & self._np_present) != _ZERO) & ((ents & _PS) == _ZERO))
                if nl.size:
                    kids = ((ents[nl] & _ADDR) >> np.uint64(12)).astype(np.int64) - self._pfn_base
                    stack.extend(kids.tolist())
            self.possible_nx_huge_pages.discard(t)
            self.pool.free(t)

    def walk_tables(
        self, root_idx: int, start: int, end: int, min_level: int = 1
    ) -> Iterator[tuple[int, int, int, int]]:
        """Yield ``(table, level, i0, i1)`` for every table overlapping ``[start, end)``.

        Pre-order (``for_each_tdp_pte_min_level``): a table is yielded before
        its children are read, so a consumer that splits an entry sees the
        new child table visited next.
        """
        pool = self.pool
        stack = [root_idx]
        while stack:
            idx = stack.pop()
            level = int(pool.level[idx])
            base = int(pool.gfn[idx])
            shift = 9 * (level - 1)
            i0 = max(0, (start - base) >> shift)
            i1 = min(SPTE_ENT_PER_PAGE, ((end - 1 - base) >> shift) + 1)
            if i0 >= i1:
                continue
            yield idx, level, i0, i1
            if level > min_level:
                ents = pool.data[idx, i0:i1]
                nl = np.flatnonzero(((ents & self._np_present) != _ZERO) & ((ents & _PS) == _ZERO))
                if nl.size:
                    kids = ((ents[nl] & _ADDR) >> np.uint64(12)).astype(np.int64) - self._pfn_base
                    stack.extend(reversed(kids.tolist()))

    def roots_for(self, as_id: int | None) -> list[Root]:
        """Roots a bulk operation visits (invalid roots are already freed)."""
        return self.valid_roots(as_id)

    # ------------------------------------------------------------ bulk edits
    def zap_leafs(self, start: int, end: int, as_id: int | None = None) -> tuple[int, int] | None:
        """``tdp_mmu_zap_leafs``: zap every present leaf overlapping ``[start, end)``.

        A huge leaf that overlaps the range is zapped whole. Page tables stay
        (only ``zap_all_fast`` frees them). Returns the hull ``(lo, hi)`` of
        the gfns whose SPTEs changed, or None.
        """
        hull: tuple[int, int] | None = None
        for root in self.roots_for(as_id):
            hull = hull_union(hull, self.zap_root_leafs(root, start, end))
        return hull

    def zap_root_leafs(self, root: Root, start: int, end: int) -> tuple[int, int] | None:
        """``tdp_mmu_zap_leafs`` on one root; returns the changed hull or None."""
        lo, hi = -1, -1
        data = self.pool.data
        present_mask = self._np_present
        for idx, level, i0, i1 in self.walk_tables(root.idx, start, end):
            ents = data[idx, i0:i1]
            present = (ents & present_mask) != _ZERO
            if level > 1:
                present &= (ents & _PS) != _ZERO
            hit = np.flatnonzero(present)
            if not hit.size:
                continue
            ents[hit] = _ZERO
            lo, hi = self._widen_hull(lo, hi, idx, level, i0, hit)
        return None if lo < 0 else (lo, hi)

    def _widen_hull(
        self, lo: int, hi: int, idx: int, level: int, i0: int, hit: np.ndarray
    ) -> tuple[int, int]:
        """Widen ``[lo, hi)`` (``lo < 0``: empty) by the gfns of entries ``hit``
        (indices from ``i0``) of table ``idx`` at ``level``."""
        span = S.KVM_PAGES_PER_HPAGE(level)
        base = int(self.pool.gfn[idx]) + i0 * span
        a = base + int(hit[0]) * span
        b = base + (int(hit[-1]) + 1) * span
        return (a if lo < 0 else min(lo, a)), max(hi, b)

    def clear_bits_range(
        self, start: int, end: int, clear: int, min_level: int = 1, as_id: int | None = None
    ) -> tuple[int, int] | None:
        """``wrprot_gfn_range`` / ``clear_dirty_gfn_range``: clear ``clear`` in every
        present leaf at ``level >= min_level`` overlapping the range; return the hull."""
        lo, hi = -1, -1
        mask = np.uint64(clear)
        data = self.pool.data
        for root in self.roots_for(as_id):
            for idx, level, i0, i1 in self.walk_tables(root.idx, start, end):
                if level < min_level:
                    continue
                ents = data[idx, i0:i1]
                sel = ((ents & self._np_present) != _ZERO) & ((ents & mask) != _ZERO)
                if level > 1:
                    sel &= (ents & _PS) != _ZERO
                hit = np.flatnonzero(sel)
                if not hit.size:
                    continue
                ents[hit] &= ~mask
                lo, hi = self._widen_hull(lo, hi, idx, level, i0, hit)
        return None if lo < 0 else (lo, hi)

    def split_huge_pages_range(
        self, start: int, end: int, target_level: int = 1, as_id: int | None = None
    ) -> int:
        """``tdp_mmu_split_huge_pages_root``: split every huge leaf overlapping the
        range down to ``target_level`` (eager page split, spec kvm-mmu-2.md §5.3).

        Children inherit memtype and permissions (``make_small_spte``); no
        flush. Returns the number of huge SPTEs split.
        """
        n = 0
        data = self.pool.data
        for root in self.roots_for(as_id):
            for idx, level, i0, i1 in self.walk_tables(root.idx, start, end):
                if level <= target_level:
                    continue
                ents = data[idx, i0:i1]
                hit = np.flatnonzero(((ents & self._np_present) != _ZERO) & ((ents & _PS) != _ZERO))
                for h in hit.tolist():
                    i = i0 + h
                    self.split_huge_page(idx, i, level, int(data[idx, i]), False)
                    data = self.pool.data
                    n += 1
        return n

    def flush_range(self, hull: tuple[int, int] | None) -> None:
        """``kvm_flush_remote_tlbs_range`` over exactly the changed hull."""
        if hull is not None:
            self.vm.hooks.flush_remote_tlbs_range(hull[0], hull[1] - hull[0])

    # -------------------------------------------------- indirect shadow pages
    #: ``kvm->arch.indirect_shadow_pages``: a TDP-only VM (no nested guests in
    #: the model) has none.
    indirect_shadow_pages = 0

    def unprotect_page(self, gfn: int) -> bool:
        """``kvm_mmu_unprotect_page``: zap the indirect sps of ``gfn``; a TDP
        MMU has none, so nothing is zapped (returns False)."""
        return False

    # ------------------------------------------------------------ mmu_try_to_unsync
    def try_unsync(self, slot: Memslot, gfn: int, can_unsync: bool, prefetch: bool) -> int:
        """``mmu_try_to_unsync_pages``: -EPERM (non-zero) for a write-tracked gfn.

        The TDP MMU has no indirect shadow pages; the shadow MMU extends this
        with its unsync rules (spec/kvm-mmu.md §3.12).
        """
        if self.vm.page_track.is_write_tracked(slot, gfn):
            return 1
        return 0

    def max_mapping_level(self, slot: Memslot, gfn: int, max_level: int) -> int:
        """``__kvm_mmu_max_mapping_level`` (mmu.c; spec/kvm-mmu.md §3.6).

        Clamp to ``max_huge_page_level``, step down while the slot's
        ``disallow_lpage`` is non-zero, then take the host mapping level.
        """
        level = min(max_level, self.max_huge_page_level)
        info = slot.lpage_info
        base = slot.base_gfn
        while level > S.PG_LEVEL_4K:
            sh = 9 * (level - 1)  # gfn_to_index, inline: this runs on every fault
            if not info[level][(gfn >> sh) - (base >> sh)]:
                break
            level -= 1
        if level == S.PG_LEVEL_4K:
            return level
        host_level = self.vm.host.host_mapping_level(slot.gfn_to_hva(gfn))
        return min(host_level, level)
