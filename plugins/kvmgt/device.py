"""The GVT device and its vGPUs: attach/close, page-track glue, workloads, GPU DMA.

``GvtDevice`` is ``struct intel_gvt`` (host GGTT, GVT's own pages, the global
PPGTT LRU); ``Vgpu`` is ``struct intel_vgpu`` with the KVMGT glue of
``drivers/gpu/drm/i915/gvt/kvmgt.c`` (G1, G5, L6, L7), the workload path of
``scheduler.c: prepare_workload`` (L3) and a GPU that does DMA by walking the
**shadow** tables in host memory.
"""

from __future__ import annotations

import errno
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu.errors import KvmError, KvmmuError
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.dma import DmaCache, HostPagePool
from kvmmu.plugins.kvmgt.ggtt import GGTT_START_OFFSET, Ggtt, GmRange
from kvmmu.plugins.kvmgt.gtt import GttType
from kvmmu.plugins.kvmgt.invariants import check_vgpu
from kvmmu.plugins.kvmgt.ppgtt import PpgttMm
from kvmmu.plugins.kvmgt.track import GvtPageTrack, ProtectTable
from kvmmu.plugins.kvmgt.write import ShadowPpgtt

if TYPE_CHECKING:
    from kvmmu.plugins.kvmgt.config import KvmgtConfig
    from kvmmu.vm import VM

__all__ = [
    "VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE",
    "VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY",
    "VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE",
    "VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY",
    "GpuFault",
    "GvtDevice",
    "Vgpu",
]

#: ``enum vgt_g2v_type`` (``i915_pvinfo.h``).
VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE = 2
VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY = 3
VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE = 4
VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY = 5
T = GttType


class GpuFault(KvmmuError):
    """A GPU access hit a non-present GTT entry (a GPU page fault / CAT error)."""

    def __init__(self, gma: int, where: str) -> None:
        self.gma = gma
        super().__init__(f"GPU fault at gma {gma:#x}: {where}")


class GvtDevice:
    """``struct intel_gvt``: what the vGPUs of one host GPU share."""

    def __init__(self, vm: VM, cfg: KvmgtConfig) -> None:
        self.vm = vm
        self.cfg = cfg
        self.pool = HostPagePool(vm, cfg.kernel_hva, cfg.max_shadow_pages)
        #: ``gvt->gtt.scratch_mfn``: the GGTT scratch page (not counted in the budget)
        limit, self.pool.limit = self.pool.limit, None
        self.scratch_mfn = self.pool.alloc("the GGTT scratch page")
        self.host_ggtt = np.zeros(cfg.gm_size >> PAGE_SHIFT, dtype=np.uint64)
        self.lru: list[tuple[Vgpu, PpgttMm]] = []  # ppgtt_mm_lru_list_head
        self.vgpus: list[Vgpu] = []
        for i in range(cfg.vgpus):
            self.vgpus.append(Vgpu(self, i))
        self.pool.limit = None if limit is None else limit + self.pool.in_use
        self.pool_base = self.pool.in_use

    def reclaim_one_ppgtt_mm(self) -> bool:
        """``reclaim_one_ppgtt_mm`` (L4): invalidate the oldest unpinned mm."""
        for item in list(self.lru):
            vgpu, mm = item
            if mm.pincount:
                continue
            self.lru.remove(item)
            vgpu.gtt.invalidate_mm(mm)
            vgpu.stats["mm_reclaimed"] += 1
            return True
        return False

    def attached_vgpus(self) -> list[Vgpu]:
        return [v for v in self.vgpus if v.attached]


class Vgpu:
    """One vGPU (``struct intel_vgpu``) with its KVMGT attachment."""

    def __init__(self, gvt: GvtDevice, vgpu_id: int) -> None:
        cfg = gvt.cfg
        self.gvt = gvt
        self.vm = gvt.vm
        self.id = vgpu_id
        self.attached = False
        self.failsafe = False
        self.errors: list[str] = []
        self.stats: Counter[str] = Counter()
        self.ptable = ProtectTable(self.vm, lambda: self.attached)
        self.track = GvtPageTrack(self.ptable)
        self.dma = DmaCache(self.vm)
        self.gtt = ShadowPpgtt(
            self.vm,
            gvt.pool,
            self.dma,
            self.track,
            ggtt_scratch_mfn=gvt.scratch_mfn,
            ips_enabled=self.ips_enabled,
            has_2m=cfg.has_2m_gtt,
            attached=lambda: self.attached,
            log=self.log,
            reclaim=gvt.reclaim_one_ppgtt_mm,
        )
        self.ggtt = Ggtt(
            gvt.host_ggtt,
            self.dma,
            gvt.scratch_mfn,
            GmRange(cfg.aperture_base, cfg.aperture_size),
            GmRange(cfg.hidden_base, cfg.hidden_size),
            self.gtt.gfn_is_valid,
        )
        self.ggtt.reset(invalidate_old=False)
        #: the ``GEN8_GAMW_ECO_DEV_RW_IA`` vreg bit ``GAMW_ECO_ENABLE_64K_IPS_FIELD``
        self.gamw_ips = cfg.gamw_eco_64k_ips

    # ---------------------------------------------------------------- misc
    def log(self, msg: str) -> None:
        """``gvt_vgpu_err`` / ``gvt_dbg_mm``: the model keeps the messages."""
        self.errors.append(msg)

    def ips_enabled(self) -> bool:
        """``vgpu_ips_enabled``: gen9/10 only with the GAMW vreg bit, gen11+ always."""
        gen = self.gvt.cfg.gen
        if gen in (9, 10):
            return self.gamw_ips
        return gen >= 11

    # ----------------------------------------------------------- attach (G1)
    def open(self) -> None:
        """``intel_vgpu_open_device`` (G1): at most one attached vGPU per VM."""
        if self.attached:
            raise KvmError(errno.EEXIST, f"kvmgt: vGPU {self.id} is already open")
        if self.gvt.attached_vgpus():
            raise KvmError(
                errno.EEXIST,
                "kvmgt: another vGPU is already attached to this VM (at most one per VM, G1)",
            )
        self.attached = True

    def close(self) -> None:
        """``intel_vgpu_close_device`` in L7 order.

        release the vGPU (the PPGTT mms stay: they go with the vGPU's
        destruction), clear ATTACHED, unregister the notifier, destroy the
        protect table (no KVM calls) and the DMA cache (unmap + unpin all).
        KVM's write-track counts for still-shadowed tables are therefore
        left behind (spec/consumers.md §5 Q4).
        """
        if not self.attached:
            raise KvmError(errno.EINVAL, f"kvmgt: vGPU {self.id} is not open")
        self.attached = False
        self.ptable.destroy()
        self.dma.destroy()

    def destroy(self) -> None:
        """``intel_gvt_destroy_vgpu`` -> ``intel_vgpu_clean_gtt``: mms, GGTT, scratch."""
        if self.attached:
            self.close()
        for item in [x for x in self.gvt.lru if x[0] is self]:
            self.gvt.lru.remove(item)
        self.gtt.destroy_all_mms()
        self.ggtt.destroy()
        self.gtt.release_scratch()

    # ------------------------------------------------------ page track (G5)
    def page_track_write(self, gpa: int, data: bytes) -> None:
        """``kvmgt_page_track_write`` -> ``intel_vgpu_page_track_handler`` (G5).

        Only gfns in the protect table are handled. In failsafe mode write
        protection is dropped and the shadow is not updated. Handler errors
        are only logged: ``track_write`` returns void to KVM.
        """
        gfn = gpa >> PAGE_SHIFT
        if gfn not in self.ptable.gfns:
            return
        self.stats["track_writes"] += 1
        rec = self.track.find(gfn)
        if rec is None:
            self.log(f"ENXIO: no page-track record for gfn {gfn:#x}")
            return
        if self.failsafe:
            self.track.disable(gfn)
            return
        try:
            rec.handler(rec.priv, gpa, data)
        except KvmError as e:
            self.stats["track_write_errors"] += 1
            self.log(f"fail: guest page write error, gpa {gpa:#x}: {e}")

    def remove_region(self, gfn: int, nr_pages: int) -> None:
        """``kvmgt_page_track_remove_region`` (v6.6+, L6)."""
        self.ptable.remove_region(gfn, nr_pages)

    # --------------------------------------------------------- PPGTT mm (L1)
    def get_ppgtt_mm(self, pdps: list[int], *, l3: bool = False) -> PpgttMm:
        """``intel_vgpu_get_ppgtt_mm``: find (kref +1) or create and shadow (L1, L2)."""
        pdps = self._check_pdps(pdps, l3)
        mm = self.gtt.find_mm(pdps)
        if mm is not None:
            mm.ref += 1
            return mm
        root = T.PPGTT_ROOT_L3_ENTRY if l3 else T.PPGTT_ROOT_L4_ENTRY
        mm = self.gtt.create_mm(root, pdps)
        self.gvt.lru.append((self, mm))
        return mm

    def put_ppgtt_mm(self, pdps: list[int], *, l3: bool = False) -> None:
        """``intel_vgpu_put_ppgtt_mm``: EINVAL if unknown; kref -1, release at 0."""
        pdps = self._check_pdps(pdps, l3)
        mm = self.gtt.find_mm(pdps)
        if mm is None:
            raise KvmError(errno.EINVAL, "kvmgt: fail to find ppgtt instance")
        mm.ref -= 1
        if mm.ref == 0:
            if (self, mm) in self.gvt.lru:
                self.gvt.lru.remove((self, mm))
            self.gtt.destroy_mm(mm)

    @staticmethod
    def _check_pdps(pdps: list[int], l3: bool) -> list[int]:
        p = [int(x) for x in pdps]
        if (l3 and len(p) != 4) or (not l3 and len(p) not in (1, 4)):
            raise ValueError(
                f"pdps: an L3 PPGTT takes 4 root pointers, an L4 one 1 (or 4); got {len(p)}"
            )
        if any(not 0 <= x < 1 << 64 for x in p):
            raise ValueError("pdps: root pointers are u64 values")
        return p + [0] * (4 - len(p))

    def g2v_notify(self, op: int, pdps: list[int]) -> PpgttMm | None:
        """``handle_g2v_notification`` for the PPGTT create/destroy ops (L1)."""
        if op == VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE:
            return self.get_ppgtt_mm(pdps)
        if op == VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE:
            return self.get_ppgtt_mm(pdps, l3=True)
        if op == VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY:
            self.put_ppgtt_mm(pdps)
            return None
        if op == VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY:
            self.put_ppgtt_mm(pdps, l3=True)
            return None
        raise ValueError(
            f"g2v_notify: op {op} is not a PPGTT op; allowed: 2, 3 (L3 create/destroy), "
            "4, 5 (L4 create/destroy)"
        )

    def pin_mm(self, mm: PpgttMm) -> None:
        """``intel_vgpu_pin_mm``: pincount +1, shadow if needed, LRU tail."""
        mm.pincount += 1
        try:
            self.gtt.shadow_mm(mm)
        except KvmError:
            mm.pincount -= 1
            raise
        if (self, mm) in self.gvt.lru:
            self.gvt.lru.remove((self, mm))
        self.gvt.lru.append((self, mm))

    def unpin_mm(self, mm: PpgttMm) -> None:
        """``intel_vgpu_unpin_mm`` (``atomic_dec_if_positive``)."""
        if mm.pincount > 0:
            mm.pincount -= 1

    # ------------------------------------------------------- workloads (L3)
    def submit_workload(
        self,
        mm: PpgttMm,
        reads: list[tuple[int, int]] | None = None,
        writes: list[tuple[int, bytes]] | None = None,
    ) -> list[bytes]:
        """``prepare_workload`` then run: pin + shadow, pdps, OOS sync, post-shadow flush.

        The "workload" is a list of GPU DMA reads ``(gma, size)`` and writes
        ``(gma, data)`` through ``mm``'s shadow tables; the mm is unpinned
        when it completes. Returns the bytes read.
        """
        if mm not in self.gtt.mms:
            raise KvmError(errno.EINVAL, "kvmgt: submit_workload: mm is not one of this vGPU's")
        self.pin_mm(mm)  # 1. pin the shadow mm (shadow again if needed)
        try:
            # 2. update_shadow_pdps: the ring context takes shadow_pdps (nothing to copy)
            # 3. intel_vgpu_sync_oos_pages: OOS is disabled (W12)
            self.stats["post_shadow_flushed"] += self.gtt.flush_post_shadow()  # 4.
            self.stats["workloads"] += 1
            out = [self.dma_read(mm, gma, size) for gma, size in reads or []]
            for gma, data in writes or []:
                self.dma_write(mm, gma, data)
            return out
        finally:
            self.unpin_mm(mm)

    # --------------------------------------------------------------- GPU DMA
    def translate(self, mm: PpgttMm | None, gma: int) -> int:
        """The GPU's walk of ``gma``: shadow PPGTT in host memory (or the host GGTT).

        Raises :class:`GpuFault` at a non-present entry.
        """
        if mm is None:
            hpa = self.ggtt.host_translate(gma)
            if hpa is None:
                raise GpuFault(gma, "GGTT entry not present")
            return hpa
        if not mm.shadowed:
            raise GpuFault(gma, "PPGTT is not shadowed")
        root, chain = self.gtt.levels(mm, gma)
        host = self.vm.host
        e, et = root, mm.root_type
        if not gtt.test_present(e, et):
            raise GpuFault(gma, "root pointer not present")
        for t, idx in chain:
            e = host.read_u64((gtt.get_pfn(e, et) << PAGE_SHIFT) + idx * 8)
            et = gtt.real_type(gtt.entry_type(t), e, False)
            if not gtt.test_present(e, et):
                raise GpuFault(gma, f"{et.name} at index {idx} not present")
            if et == T.PPGTT_PTE_2M_ENTRY:
                return (gtt.get_pfn(e, et) << PAGE_SHIFT) + (gma & ((2 << 20) - 1))
            if et == T.PPGTT_PTE_1G_ENTRY:
                return (gtt.get_pfn(e, et) << PAGE_SHIFT) + (gma & ((1 << 30) - 1))
        return (gtt.get_pfn(e, et) << PAGE_SHIFT) + (gma & (PAGE_SIZE - 1))

    def _chunks(self, gma: int, size: int) -> list[tuple[int, int]]:
        if size <= 0:
            raise ValueError(f"GPU DMA size must be positive, got {size}")
        out = []
        while size:
            n = min(size, PAGE_SIZE - (gma & (PAGE_SIZE - 1)))
            out.append((gma, n))
            gma += n
            size -= n
        return out

    def dma_read(self, mm: PpgttMm | None, gma: int, size: int) -> bytes:
        """GPU reads ``size`` bytes at ``gma`` through the shadow tables (or GGTT)."""
        hpas = [(self.translate(mm, g), n) for g, n in self._chunks(gma, size)]
        self.stats["gpu_dma_reads"] += 1
        return b"".join(self.vm.host.read_phys(h, n) for h, n in hpas)

    def dma_write(self, mm: PpgttMm | None, gma: int, data: bytes) -> None:
        """GPU writes ``data`` at ``gma``; every page is translated before any byte lands."""
        hpas = [(self.translate(mm, g), n) for g, n in self._chunks(gma, len(data))]
        pos = 0
        for h, n in hpas:
            self.vm.host.write_phys(h, data[pos : pos + n])
            pos += n
        self.stats["gpu_dma_writes"] += 1

    # ------------------------------------------------------------------ GGTT
    def ggtt_mmio_write(self, off: int, data: bytes) -> None:
        """``intel_vgpu_emulate_ggtt_mmio_write``: ``off`` is the BAR0 offset (GG1)."""
        self.ggtt.mmio_write(off - GGTT_START_OFFSET, data)

    def ggtt_mmio_read(self, off: int, size: int) -> bytes:
        """``intel_vgpu_emulate_ggtt_mmio_read``."""
        return self.ggtt.mmio_read(off - GGTT_START_OFFSET, size)

    # ------------------------------------------------------------ checking
    def check_invariants(self) -> list[str]:
        """Shadow == guest, refcounts, tracking, DMA krefs (see invariants.py)."""
        return check_vgpu(self)

    def report(self) -> dict[str, Any]:
        """JSON-friendly state and counters."""
        return {
            "id": self.id,
            "attached": self.attached,
            "ppgtt_mms": len(self.gtt.mms),
            "spts": len(self.gtt.spts),
            "tracked_gfns": len(self.ptable.gfns),
            "dma_mappings": len(self.dma.by_gfn),
            "pending_post_shadow": sum(len(s.post_shadow) for s in self.gtt.post_shadow_list),
            "stale_entries": sum(len(s.stale) for s in self.gtt.spts.values()),
            "errors": len(self.errors),
            "stats": dict(self.stats),
        }
