"""Shadow PPGTT: shadow page tables (spts), PPGTT mms, scratch pages.

A model of ``drivers/gpu/drm/i915/gvt/gtt.c`` (spec/consumers.md §1.3,
W7–W10, L1–L8, S1). Shadow page tables are real host pages from
:class:`~kvmmu.plugins.kvmgt.dma.HostPagePool`; their entries are read and
written in host memory, so the GPU (``Vgpu.dma_read``) walks them as
hardware would. Guest tables are read from guest memory
(``intel_gvt_read_gpa``, G6). The write handler lives in ``write.py``.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.gtt import GttType

if TYPE_CHECKING:
    from kvmmu.plugins.kvmgt.dma import DmaCache, HostPagePool
    from kvmmu.plugins.kvmgt.track import GvtPageTrack
    from kvmmu.vm import VM

__all__ = ["PpgttMm", "Spt", "VgpuGtt"]

T = GttType
SIZE_2M = 2 << 20
SIZE_4K = PAGE_SIZE
_PT_TYPES = (T.PPGTT_PTE_PT, T.PPGTT_PDE_PT, T.PPGTT_PDP_PT, T.PPGTT_PML4_PT)


@dataclass(eq=False)
class Spt:
    """``struct intel_vgpu_ppgtt_spt``: one shadow page table.

    ``gfn`` is ``None`` for a shadow-only table (a split 2M entry, W10).
    ``post_shadow`` is the ``post_shadow_bitmap`` (W6). ``stale`` is model
    bookkeeping: indices a refused (W1) or failed (W11) update left different
    from the guest, which the kernel only logs.
    """

    shadow_type: GttType
    mfn: int
    gfn: int | None = None
    guest_type: GttType = T.INVALID
    pde_ips: bool = False
    refcount: int = 1
    post_shadow: set[int] = field(default_factory=set)
    stale: set[int] = field(default_factory=set)

    @property
    def hpa(self) -> int:
        return self.mfn << PAGE_SHIFT


@dataclass(eq=False)
class PpgttMm:
    """``struct intel_vgpu_mm`` of type PPGTT (L1, L2, L4, L5)."""

    root_type: GttType
    guest_pdps: list[int]
    shadow_pdps: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    shadowed: bool = False
    ref: int = 1
    pincount: int = 0

    @property
    def l3(self) -> bool:
        return self.root_type == T.PPGTT_ROOT_L3_ENTRY


class VgpuGtt(ABC):
    """The PPGTT half of ``struct intel_vgpu_gtt`` for one vGPU (write handling: write.py)."""

    def __init__(
        self,
        vm: VM,
        pool: HostPagePool,
        dma: DmaCache,
        track: GvtPageTrack,
        *,
        ggtt_scratch_mfn: int,
        ips_enabled: Callable[[], bool],
        has_2m: bool,
        attached: Callable[[], bool],
        log: Callable[[str], None],
        reclaim: Callable[[], bool],
    ) -> None:
        self.vm = vm
        self.host = vm.host
        self.pool = pool
        self.dma = dma
        self.track = track
        self.ggtt_scratch_mfn = ggtt_scratch_mfn
        self.ips_enabled = ips_enabled
        self.has_2m = has_2m
        self.attached = attached
        self.log = log
        self._reclaim = reclaim
        self.reshadows = 0
        self.spts: dict[int, Spt] = {}  # spt_tree: shadow mfn -> spt
        self.mms: list[PpgttMm] = []
        self.post_shadow_list: list[Spt] = []
        self.scratch_pt: dict[GttType, int] = {}
        self._create_scratch_page_tree()

    # ------------------------------------------------------------ scratch (S1)
    def _create_scratch_page_tree(self) -> None:
        """``alloc_scratch_pages`` for PTE_PT..PML4_PT (S1).

        ``scratch_pt[PTE_PT]`` is a zeroed data page; each higher type is a
        table whose 512 entries point one level down with PRESENT|RW (plus
        ``PPAT_CACHED`` in the PTE table used under a PDE).
        """
        for t in _PT_TYPES:
            mfn = self.pool.alloc(f"scratch_pt[{t.name}]")
            self.scratch_pt[t] = mfn
            if t != T.PPGTT_PTE_PT:
                below = T(t - 1)
                se = gtt.set_pfn(0, gtt.entry_type(below), self.scratch_pt[below])
                se |= gtt.GEN8_PAGE_PRESENT | gtt.GEN8_PAGE_RW
                if t == T.PPGTT_PDE_PT:
                    se |= gtt.PPAT_CACHED
                page = np.full(512, se, dtype="<u8")
                self.host.write_phys(mfn << PAGE_SHIFT, page.tobytes())

    def release_scratch(self) -> None:
        """``release_scratch_page_tree``."""
        for mfn in self.scratch_pt.values():
            self.pool.free(mfn)
        self.scratch_pt.clear()

    # -------------------------------------------------------- entry access
    def get_shadow(self, spt: Spt, index: int) -> tuple[int, GttType]:
        """``ppgtt_get_shadow_entry``: value and real type (shadow never uses IPS)."""
        v = self.host.read_u64(spt.hpa + index * 8)
        return v, gtt.real_type(gtt.entry_type(spt.shadow_type), v, False)

    def set_shadow(self, spt: Spt, index: int, value: int) -> None:
        """``ppgtt_set_shadow_entry``."""
        self.host.write_u64(spt.hpa + index * 8, value)

    def get_guest(self, spt: Spt, index: int) -> tuple[int, GttType] | None:
        """``ppgtt_get_guest_entry`` via ``intel_gvt_read_gpa`` (G6); None if unreadable."""
        assert spt.gfn is not None
        try:
            raw = self.vm.read_guest((spt.gfn << PAGE_SHIFT) + index * 8, 8)
        except KvmError:
            return None
        v = int.from_bytes(raw, "little")
        return v, gtt.real_type(gtt.entry_type(spt.guest_type), v, spt.pde_ips)

    def shadow_page(self, spt: Spt) -> np.ndarray:
        """All 512 shadow entries (a copy)."""
        return np.frombuffer(self.host.read_phys(spt.hpa, PAGE_SIZE), dtype="<u8").copy()

    # ------------------------------------------------------------- spt alloc
    def find_spt_by_mfn(self, mfn: int) -> Spt | None:
        """``intel_vgpu_find_spt_by_mfn`` (radix ``spt_tree``)."""
        return self.spts.get(mfn)

    def find_spt_by_gfn(self, gfn: int) -> Spt | None:
        """``intel_vgpu_find_spt_by_gfn``: through the page-track record, if it is ours."""
        rec = self.track.find(gfn)
        if rec is None or rec.handler != self.write_protection_handler:
            return None
        spt: Spt = rec.priv
        return spt

    @abstractmethod
    def write_protection_handler(self, priv: object, gpa: int, data: bytes) -> None:
        """``ppgtt_write_protection_handler``: implemented in ``write.py``."""

    def alloc_spt(self, t: GttType) -> Spt:
        """``ppgtt_alloc_spt``: on ENOMEM reclaim an unpinned mm and retry (L4)."""
        while True:
            try:
                mfn = self.pool.alloc(f"a {t.name} shadow page")
                break
            except KvmError as e:
                if e.errno != errno.ENOMEM or not self._reclaim():
                    raise
        spt = Spt(shadow_type=t, mfn=mfn)
        self.spts[mfn] = spt
        return spt

    def alloc_spt_gfn(self, t: GttType, gfn: int, ips: bool) -> Spt:
        """``ppgtt_alloc_spt_gfn``: an spt plus its page-track record (G2)."""
        spt = self.alloc_spt(t)
        try:
            self.track.register(gfn, self.write_protection_handler, spt)
        except KvmError:
            self.free_spt(spt)
            raise
        spt.gfn = gfn
        spt.guest_type = t
        spt.pde_ips = ips
        return spt

    def free_spt(self, spt: Spt) -> None:
        """``ppgtt_free_spt`` (L5): unmap, drop from spt_tree, unregister the track."""
        self.pool.free(spt.mfn)
        self.spts.pop(spt.mfn, None)
        if spt.gfn is not None and self.track.find(spt.gfn) is not None:
            rec = self.track.find(spt.gfn)
            if rec is not None and rec.priv is spt:
                self.track.unregister(spt.gfn)
        if spt in self.post_shadow_list:
            self.post_shadow_list.remove(spt)
        spt.post_shadow.clear()

    # ---------------------------------------------------------- invalidation
    def iter_present_shadow(self, spt: Spt) -> Iterator[tuple[int, int, GttType]]:
        """``for_each_present_shadow_entry`` (all 512: shadow tables never use IPS)."""
        page = self.shadow_page(spt)
        for i in np.nonzero(page & np.uint64(gtt.GEN8_PAGE_PRESENT))[0]:
            v = int(page[i])
            yield int(i), v, gtt.real_type(gtt.entry_type(spt.shadow_type), v, False)

    def invalidate_pte(self, spt: Spt, value: int, t: GttType) -> None:
        """``ppgtt_invalidate_pte``: DMA-unmap unless the pfn is 0 or scratch."""
        pfn = gtt.get_pfn(value, t)
        if not pfn or pfn == self.scratch_pt[spt.shadow_type]:
            return
        self.dma.unmap(pfn << PAGE_SHIFT)

    def invalidate_spt_by_shadow_entry(self, value: int, t: GttType) -> None:
        """``ppgtt_invalidate_spt_by_shadow_entry``: skip scratch, ENXIO if unknown."""
        pfn = gtt.get_pfn(value, t)
        if t not in (T.PPGTT_ROOT_L3_ENTRY, T.PPGTT_ROOT_L4_ENTRY):
            cur = T(gtt.next_pt_type(t) + 1)
            if pfn == self.scratch_pt[cur]:
                return
        s = self.find_spt_by_mfn(pfn)
        if s is None:
            raise KvmError(errno.ENXIO, f"kvmgt: fail to find shadow page: mfn {pfn:#x}")
        self.invalidate_spt(s)

    def invalidate_spt(self, spt: Spt) -> None:
        """``ppgtt_invalidate_spt``: refcount -1; at 0 release children and free.

        Decision (spec/consumers.md §5 Q11): 2M leaves and every split-64K
        slot are unmapped too, so DMA krefs always equal shadow references.
        """
        spt.refcount -= 1
        if spt.refcount > 0:
            return
        for _i, v, t in self.iter_present_shadow(spt):
            if t in (T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_2M_ENTRY):
                self.invalidate_pte(spt, v, t)
            elif t == T.PPGTT_PTE_1G_ENTRY:
                continue  # never shadowed (W10)
            else:
                self.invalidate_spt_by_shadow_entry(v, t)
        self.free_spt(spt)

    def clear_shadow_page(self, spt: Spt) -> None:
        """Reshadow on an IPS change (W9): release every entry, then zero the page.

        The kernel only ``clear_page``s (leaking the DMA maps, §5 Q11); the
        model releases them first so krefs stay exact.
        """
        for i, v, t in self.iter_present_shadow(spt):
            self.remove_entry(spt, v, t, i)
        self.host.write_phys(spt.hpa, bytes(PAGE_SIZE))

    # ---------------------------------------------------------------- populate
    def populate_spt_by_guest_entry(self, we: int, wt: GttType) -> Spt:
        """``ppgtt_populate_spt_by_guest_entry`` (W9)."""
        ips = False
        if wt == T.PPGTT_PDE_ENTRY:
            ips = self.ips_enabled() and bool(we & gtt.GEN8_PDE_IPS_64K)
        gfn = gtt.get_pfn(we, wt)
        spt = self.find_spt_by_gfn(gfn)
        if spt is not None:
            spt.refcount += 1
            if ips != spt.pde_ips:
                spt.pde_ips = ips
                self.reshadows += 1  # "reshadow PDE since ips changed"
                self.clear_shadow_page(spt)
                try:
                    self.populate_spt(spt)
                except KvmError:
                    spt.refcount -= 1
                    raise
            return spt
        spt = self.alloc_spt_gfn(gtt.next_pt_type(wt), gfn, ips)
        try:
            self.track.enable(gfn)
            self.populate_spt(spt)
        except KvmError:
            # ``err_free_spt``. Decision (as §5 Q11): entries populated before
            # the failure are released first, so krefs and child refcounts
            # stay exact (the kernel's ppgtt_free_spt leaks them).
            self.clear_shadow_page(spt)
            self.free_spt(spt)
            raise
        return spt

    def generate_shadow_entry(self, ge: int, gt: GttType, s: Spt) -> int:
        """``ppgtt_generate_shadow_entry``: guest bits, PFN = child mfn, IPS cleared."""
        se = ge
        if gt == T.PPGTT_PDE_ENTRY:
            se &= ~gtt.GEN8_PDE_IPS_64K  # 64K is always split
        return gtt.set_pfn(se, gt, s.mfn)

    def gfn_is_valid(self, gfn: int) -> bool:
        """``intel_gvt_is_valid_gfn``: the gfn lies in a (valid) memslot."""
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        return slot is not None and not slot.is_invalid

    def populate_spt(self, spt: Spt) -> None:
        """``ppgtt_populate_spt``: every present guest entry, stride 16 under IPS."""
        step = gtt.GTT_64K_PTE_STRIDE if spt.pde_ips else 1
        for i in range(0, gtt.GTT_ENTRY_NUM_IN_ONE_PAGE, step):
            g = self.get_guest(spt, i)
            if g is None or not gtt.test_present(*g):
                continue
            ge, gt_ = g
            if not gtt.is_leaf_type(gt_):
                s = self.populate_spt_by_guest_entry(ge, gt_)
                self.set_shadow(spt, i, self.generate_shadow_entry(ge, gt_, s))
                continue
            # W10: every present leaf is DMA-mapped; one the host cannot pin
            # (e.g. outside guest memory) fails the populate with ENXIO. The
            # cited gtt.c has no ``intel_gvt_is_valid_gfn`` scratch fallback
            # (removed in v6.6 by "drm/i915/gvt: remove interface
            # intel_gvt_is_valid_gfn").
            self.populate_shadow_entry(spt, i, ge, gt_)

    def populate_shadow_entry(self, spt: Spt, index: int, ge: int, gt_: GttType) -> None:
        """``ppgtt_populate_shadow_entry`` (W10): map a present guest leaf."""
        if not gtt.test_present(ge, gt_):
            return
        gfn = gtt.get_pfn(ge, gt_)
        if gt_ == T.PPGTT_PTE_64K_ENTRY:
            self.split_64k(spt, index, ge)
            return
        if gt_ == T.PPGTT_PTE_1G_ENTRY:
            raise KvmError(errno.EINVAL, "kvmgt: GVT doesn't support 1GB entry (W10)")
        size = SIZE_4K
        if gt_ == T.PPGTT_PTE_2M_ENTRY:
            if not self.has_2m:
                self.split_2m(spt, index, ge, gt_)
                return
            try:
                dma_addr = self.dma.map(gfn, SIZE_2M)
            except KvmError:
                self.split_2m(spt, index, ge, gt_)
                return
            if dma_addr & (SIZE_2M - 1):
                # A 2M entry holds only address bits 45:21 (ADDR_2M_MASK), so
                # set_pfn would point it at the 2 MiB-aligned page below the
                # pinned run (spec/consumers.md §1.2, W10). gvt_pin_guest_page
                # checks contiguity only; the kernel's 2M pins are THPs and
                # aligned, but the model's contiguous host pages need not be.
                # Treat an unaligned run as "no 2M possible" and split.
                self.dma.unmap(dma_addr)
                self.split_2m(spt, index, ge, gt_)
                return
            self.set_shadow(spt, index, gtt.set_pfn(ge, gt_, dma_addr >> PAGE_SHIFT))
            return
        try:
            dma_addr = self.dma.map(gfn, size)
        except KvmError as e:
            raise KvmError(errno.ENXIO, f"kvmgt: dma map gfn {gfn:#x} failed: {e}") from e
        self.set_shadow(spt, index, gtt.set_pfn(ge, gt_, dma_addr >> PAGE_SHIFT))

    def split_64k(self, spt: Spt, index: int, ge: int) -> None:
        """``split_64KB_gtt_entry``: 16 x 4K entries at index..index+15, bit 52 set."""
        start = gtt.get_pfn(ge, T.PPGTT_PTE_64K_ENTRY)
        entry = ge | gtt.GTT_SPTE_FLAG_64K_SPLITED
        for i in range(gtt.GTT_64K_PTE_STRIDE):
            dma_addr = self.dma.map(start + i, SIZE_4K)
            self.set_shadow(
                spt, index + i, gtt.set_pfn(entry, T.PPGTT_PTE_4K_ENTRY, dma_addr >> PAGE_SHIFT)
            )

    def split_2m(self, spt: Spt, index: int, ge: int, gt_: GttType) -> None:
        """``split_2MB_gtt_entry``: a shadow-only, untracked PT of 512 x 4K entries.

        PAT moves from bit 12 to bit 7; the PDE loses D (bit 6), PS and IPS and
        points at the sub-table (W10).
        """
        start = gtt.get_pfn(ge, gt_)
        sub = self.alloc_spt(T.PPGTT_PTE_PT)
        page = np.zeros(512, dtype="<u8")
        sub_base = (ge & ~gtt.PAGE_PAT) | ((ge & gtt.PAGE_PAT_LARGE) >> 5)
        for k in range(512):
            try:
                dma_addr = self.dma.map(start + k, SIZE_4K)
            except KvmError:
                # the kernel invalidates the parent here; the model frees the sub-table
                for j in range(k):
                    self.dma.unmap(int(page[j]) & gtt.ADDR_4K_MASK)
                self.free_spt(sub)
                raise
            page[k] = gtt.set_pfn(sub_base, T.PPGTT_PTE_4K_ENTRY, dma_addr >> PAGE_SHIFT)
        self.host.write_phys(sub.hpa, page.tobytes())
        se = ge & ~gtt.PAGE_DIRTY
        se, _ = gtt.clear_pse(se, gt_)
        se &= ~gtt.GEN8_PDE_IPS_64K
        self.set_shadow(spt, index, gtt.set_pfn(se, T.PPGTT_PDE_ENTRY, sub.mfn))

    # ------------------------------------------------------------ add / remove
    def remove_entry(self, spt: Spt, se: int, st: GttType, index: int) -> None:
        """``ppgtt_handle_guest_entry_removal`` (W8)."""
        if not gtt.test_present(se, st):
            return
        if gtt.get_pfn(se, st) == self.scratch_pt[spt.shadow_type]:
            return
        if not gtt.is_leaf_type(st):
            s = self.find_spt_by_mfn(gtt.get_pfn(se, st))
            if s is None:
                raise KvmError(errno.ENXIO, "kvmgt: fail to find guest page (W8)")
            self.invalidate_spt(s)
        else:
            self.invalidate_pte(spt, se, st)

    def add_entry(self, spt: Spt, we: int, wt: GttType, index: int) -> None:
        """``ppgtt_handle_guest_entry_add`` (W9, W10)."""
        if not gtt.is_leaf_type(wt):
            s = self.populate_spt_by_guest_entry(we, wt)
            self.set_shadow(spt, index, self.generate_shadow_entry(we, wt, s))
        else:
            self.populate_shadow_entry(spt, index, we, wt)

    # --------------------------------------------------------------- PPGTT mm
    def shadow_mm(self, mm: PpgttMm) -> None:
        """``shadow_ppgtt_mm`` (L2): populate each present root, write shadow roots."""
        if mm.shadowed:
            return
        mm.shadowed = True
        try:
            for i in range(4):
                ge = mm.guest_pdps[i]
                if not gtt.test_present(ge, mm.root_type):
                    continue
                spt = self.populate_spt_by_guest_entry(ge, mm.root_type)
                mm.shadow_pdps[i] = self.generate_shadow_entry(ge, mm.root_type, spt)
        except KvmError:
            self.invalidate_mm(mm)
            raise

    def invalidate_mm(self, mm: PpgttMm) -> None:
        """``invalidate_ppgtt_mm`` (L5)."""
        if not mm.shadowed:
            return
        for i in range(4):
            se = mm.shadow_pdps[i]
            if not gtt.test_present(se, mm.root_type):
                continue
            self.invalidate_spt_by_shadow_entry(se, mm.root_type)
            mm.shadow_pdps[i] = 0
        mm.shadowed = False

    def find_mm(self, pdps: list[int]) -> PpgttMm | None:
        """``intel_vgpu_find_ppgtt_mm``: L4 matches pdps[0], L3 all four."""
        for mm in self.mms:
            if mm.l3 and list(pdps) == mm.guest_pdps:
                return mm
            if not mm.l3 and pdps[0] == mm.guest_pdps[0]:
                return mm
        return None

    def create_mm(self, root_type: GttType, pdps: list[int]) -> PpgttMm:
        """``intel_vgpu_create_ppgtt_mm``: shadows at once; needs ATTACHED (L2)."""
        if not self.attached():
            raise KvmError(errno.EINVAL, "kvmgt: create PPGTT mm: vGPU is not attached (L2)")
        g = [pdps[0], 0, 0, 0] if root_type == T.PPGTT_ROOT_L4_ENTRY else list(pdps)
        mm = PpgttMm(root_type=root_type, guest_pdps=g)
        self.shadow_mm(mm)
        self.mms.append(mm)
        return mm

    def destroy_mm(self, mm: PpgttMm) -> None:
        """``_intel_vgpu_mm_release`` for a PPGTT mm."""
        if mm in self.mms:
            self.mms.remove(mm)
        self.invalidate_mm(mm)

    def destroy_all_mms(self) -> None:
        """``intel_vgpu_destroy_all_ppgtt_mm``; leftover spts are freed."""
        for mm in list(self.mms):
            self.destroy_mm(mm)
        for spt in list(self.spts.values()):
            self.free_spt(spt)

    # ------------------------------------------------------------- walks (L8)
    def levels(self, mm: PpgttMm, gma: int) -> tuple[int, list[tuple[GttType, int]]]:
        """Root entry and the (table type, index) chain for ``gma``."""
        if mm.l3:
            root = mm.shadow_pdps[gma >> 30 & 3]
            types = [T.PPGTT_PDE_PT, T.PPGTT_PTE_PT]
        else:
            root = mm.shadow_pdps[0]
            types = [T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT]
        return root, [(t, gtt.gma_index(gma, t, l3=mm.l3)) for t in types]

    def gma_to_gpa(self, mm: PpgttMm, gma: int) -> int | None:
        """``intel_vgpu_gma_to_gpa`` (L8): walk shadow spts, read the guest leaf."""
        root, chain = self.levels(mm, gma)
        e, et = root, mm.root_type
        for n, (_t, idx) in enumerate(chain):
            s = self.find_spt_by_mfn(gtt.get_pfn(e, et))
            if s is None:
                return None
            if n == len(chain) - 1:
                if s.gfn is None:
                    return None
                g = self.get_guest(s, idx)
                if g is None:
                    return None
                e, et = g
            else:
                e, et = self.get_shadow(s, idx)
            if not gtt.test_present(e, et):
                return None
        return (gtt.get_pfn(e, et) << PAGE_SHIFT) + (gma & (PAGE_SIZE - 1))
