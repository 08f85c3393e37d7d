"""VM-wide MMU operations: zaps, invalidations, write-protection, hardware view.

``kvm_zap_gfn_range``, ``kvm_mmu_zap_all_fast``,
``kvm_arch_flush_shadow_memslot``, ``kvm_mmu_slot_gfn_write_protect``, the
MMU-notifier handlers (``virt/kvm/kvm_main.c``, ``arch/x86/kvm/mmu/mmu.c``,
``tdp_mmu.c``; spec/kvm-mmu.md §3.5, §3.14), and what the hardware sees when
it walks the tables (``translate``, ``access_allowed``, the error code of the
EPT violation / #NPF it raises).

Every zap and write-protect calls ``vm.hooks.flush_remote_tlbs_range`` once
with the hull of the gfns whose SPTEs changed, and not at all when nothing
changed. (The kernel flushes the requested range or the whole VM; the hull
is what an IOMMU needs and never smaller than what changed.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu import spte as S
from kvmmu.mmu.fault import (
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
)
from kvmmu.mmu.invalidate import MmuNotifierMixin, hull_union
from kvmmu.mmu.tdp import TdpBase
from kvmmu.quirks import KVM_X86_QUIRK_SLOT_ZAP_ALL

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot

__all__ = ["OpsMixin"]

_PS = S.PT_PAGE_SIZE_MASK
_ADDR = S.SPTE_BASE_ADDR_MASK


class OpsMixin(TdpBase, MmuNotifierMixin):
    """Zap, invalidate, write-protect and hardware-walk operations."""

    #: A TDP MMU, not the shadow MMU (``vcpu.access`` asks).
    shadow = False

    # ------------------------------------------------------------------ zaps
    def zap_gfn_range(self, start: int, end: int) -> None:
        """``kvm_zap_gfn_range``: begin, range_add, zap leafs, flush, end (§3.14)."""
        if start >= end:
            return
        inv = self.invalidate
        inv.begin()
        inv.range_add(start, end)
        try:
            self.flush_range(self.zap_leafs(start, end))
        finally:
            inv.end()

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast`` (spec/kvm-mmu.md §3.14).

        Toggle ``mmu_valid_gen``; ``kvm_tdp_mmu_invalidate_all_roots`` marks
        every root invalid *except exported ones* (vCPUs reload on their next
        entry). Still under the lock, every leaf of each exported root is
        zapped synchronously, with a ranged flush if anything was zapped
        (RFC "Sharing KVM TDP to IOMMU" patch 36: an external user holds the
        root, so it is kept "active"; spec/consumers.md T4 [TDP-36]). Then
        the ``zap_all_fast`` hook (roots invalid, not yet freed), then
        ``kvm_tdp_mmu_zap_invalidated_roots`` frees the invalid roots' tables
        with one flush of the whole gfn space if any leaf was present.
        """
        self.mmu_valid_gen ^= 1
        invalid = [r for r in self.roots if not r.invalid and not r.exported]
        for root in invalid:
            root.invalid = True
        for as_id in [a for a, r in self._active.items() if r.invalid]:
            del self._active[as_id]
        self.vm.stats["mmu_zap_all_fast"] += 1
        self._zap_exported_roots_leafs()
        self.vm.hooks.zap_all_fast(self.mmu_valid_gen)
        had_leaf = False
        for root in invalid:
            had_leaf = had_leaf or self.has_present_leaf(root.idx)
            self.free_subtree(root.idx)
        self.roots = [r for r in self.roots if not r.invalid]
        if had_leaf:
            self.vm.hooks.flush_remote_tlbs_range(0, self.max_gfn + 1)

    def _zap_exported_roots_leafs(self) -> None:
        """T4 [TDP-36]: zap ALL leaf SPTEs of every exported root; flush the hull."""
        hull: tuple[int, int] | None = None
        for root in self.roots:
            if root.exported and not root.invalid:
                hull = hull_union(hull, self.zap_root_leafs(root, 0, self.max_gfn + 1))
        if hull is not None:
            self.vm.stats["tdp_exported_root_leaf_zaps"] += 1
            self.flush_range(hull)

    def has_present_leaf(self, root_idx: int) -> bool:
        """Whether any leaf SPTE below the root table ``root_idx`` is present."""
        for idx, level, i0, i1 in self.walk_tables(root_idx, 0, 1 << 62):
            ents = self.pool.data[idx, i0:i1]
            present = (ents & self._np_present) != 0
            if level > 1:
                present &= (ents & np.uint64(_PS)) != 0
            if present.any():
                return True
        return False

    def flush_shadow_memslot(self, slot: Memslot) -> None:
        """``kvm_arch_flush_shadow_memslot`` (DELETE/MOVE).

        Before 6.12 always ``zap_all_fast``; from 6.12 only while
        ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` is on, else ``kvm_mmu_zap_memslot``
        zaps just the slot's range (spec/kvm-mmu.md §3.14; memtype.md §11.4).
        """
        era = getattr(self.vm, "era", None)
        if (era is not None and era < (6, 12)) or self.vm.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL):
            self.zap_all_fast()
        else:
            self.flush_range(self.zap_leafs(slot.base_gfn, slot.end_gfn, slot.as_id))

    def track_write(self, gpa: int, new: bytes) -> None:
        """``kvm_mmu_track_write``: returns at once with no indirect shadow pages."""
        return None

    # --------------------------------------------------------- MMU notifiers
    def mn_unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> tuple[int, int] | None:
        """``kvm_tdp_mmu_unmap_gfn_range``: zap the leaves in the slot's address space."""
        return self.zap_leafs(start, end, slot.as_id)

    def mn_flush(self, hull: tuple[int, int] | None) -> None:
        self.flush_range(hull)

    def mn_lock(self) -> None:
        """The TDP MMU unmaps under ``read_lock(mmu_lock)``; no contention is modelled."""

    # -------------------------------------------------------- write-protect
    def write_protect_gfn(self, slot: Memslot, gfn: int, level: int = 1) -> bool:
        """``kvm_mmu_slot_gfn_write_protect`` -> ``kvm_tdp_mmu_write_protect_gfn``.

        Clears W and MMU-writable on every leaf at ``level`` or above that maps
        ``gfn`` (a huge SPTE covering it included), in the slot's address
        space; flushes the changed range. Returns whether anything changed.
        """
        hull = self.clear_bits_range(
            gfn, gfn + 1, S.PT_WRITABLE_MASK | self.fmt.mmu_writable_mask, level, slot.as_id
        )
        self.flush_range(hull)
        return hull is not None

    # ------------------------------------------------------- hardware view
    def _hw_present(self, spte: int) -> bool:
        if self.fmt.name == "ept":
            return bool(spte & 0x7)
        return bool(spte & S.PT_PRESENT_MASK)

    def translate(self, gpa: int, as_id: int = 0) -> tuple[int, int] | None:
        """What the CPU (or an IOMMU) sees: walk the current root for ``gpa``.

        Returns ``(leaf spte, level)`` when the leaf is hardware-visible (EPT:
        any of RWX; x86: P) - MMIO SPTEs included, which fault as EPT
        misconfig / reserved-bit #NPF - else None.
        """
        root = self._active.get(as_id)
        if root is None:
            return None
        data = self.pool.data
        gfn = gpa >> S.PAGE_SHIFT
        idx = root.idx
        level = self.root_level
        while True:
            spte = int(data[idx, (gfn >> (9 * (level - 1))) & 511])
            if level == 1 or spte & _PS or not spte & self.mmu_present:
                if self._hw_present(spte):
                    return spte, level
                return None
            idx = ((spte & _ADDR) >> 12) - self._pfn_base
            level -= 1

    def access_allowed(self, spte: int, write: bool, exec_: bool, user: bool) -> bool:
        """``is_access_allowed`` plus the x86 U/S check; MMIO SPTEs never allow."""
        fmt = self.fmt
        if S.is_mmio_spte(fmt, spte):
            return False
        if user and fmt.name != "ept" and not spte & fmt.user_mask:
            return False
        return S.is_access_allowed(fmt, spte, write=write, exec_=exec_)

    def fault_error_code(
        self, hit: tuple[int, int] | None, write: bool, exec_: bool, user: bool
    ) -> int:
        """The error code the vendor passes to ``kvm_mmu_page_fault``.

        EPT misconfig (MMIO SPTE): ``PFERR_RSVD`` only. EPT violation: reads
        set ``PFERR_USER`` (``EPT_VIOLATION_ACC_READ``), writes W, fetches
        FETCH, PRESENT if the leaf had any of RWX. #NPF: P if the leaf was
        present, W, U for CPL 3, FETCH, RSVD (with P) for an MMIO SPTE.
        Both add ``PFERR_GUEST_FINAL`` (stripped by ``lower_32_bits``).
        """
        spte = hit[0] if hit is not None else 0
        if self.fmt.name == "ept":
            if hit is not None and S.is_mmio_spte(self.fmt, spte):
                return PFERR_RSVD_MASK
            code = PFERR_GUEST_FINAL_MASK
            if write:
                code |= PFERR_WRITE_MASK
            elif exec_:
                code |= PFERR_FETCH_MASK
            else:
                code |= PFERR_USER_MASK
            if hit is not None and spte & 0x7:
                code |= PFERR_PRESENT_MASK
            return code
        code = PFERR_GUEST_FINAL_MASK
        if hit is not None:
            code |= PFERR_PRESENT_MASK
            if S.is_mmio_spte(self.fmt, spte):
                code |= PFERR_RSVD_MASK
        if write:
            code |= PFERR_WRITE_MASK
        if user:
            code |= PFERR_USER_MASK
        if exec_:
            code |= PFERR_FETCH_MASK
        return code

    def spte_hpa(self, spte: int, level: int, gpa: int) -> int:
        """Host physical address a leaf maps ``gpa`` to."""
        size = S.KVM_PAGES_PER_HPAGE(level) << S.PAGE_SHIFT
        return (spte & _ADDR & ~(size - 1)) + (gpa & (size - 1))

    def hw_mark_accessed(self, gpa: int, write: bool, as_id: int = 0) -> None:
        """The CPU sets Accessed (and Dirty on a write) in the leaf when A/D is on."""
        if self.ad_disabled or not self.fmt.accessed_mask:
            return
        root = self._active.get(as_id)
        if root is None:
            return
        data = self.pool.data
        gfn = gpa >> S.PAGE_SHIFT
        idx = root.idx
        level = self.root_level
        while True:
            i = (gfn >> (9 * (level - 1))) & 511
            spte = int(data[idx, i])
            if not spte & self.mmu_present:
                return
            if level == 1 or spte & _PS:
                new = spte | self.fmt.accessed_mask
                if write and spte & S.PT_WRITABLE_MASK:
                    new |= self.fmt.dirty_mask
                if new != spte:
                    data[idx, i] = new
                return
            idx = ((spte & _ADDR) >> 12) - self._pfn_base
            level -= 1

    def mmio_info(self, vcpu: Any) -> tuple[int, int, int] | None:
        """The vCPU's cached MMIO ``(gfn, access, generation)``, if any."""
        entry = self._mmio_cache.get(id(vcpu))
        return None if entry is None else entry[1:]
