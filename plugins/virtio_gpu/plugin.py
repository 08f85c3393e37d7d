"""The ``virtio_gpu`` consumer plugin: the device, a design, the coherency check."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmmu.hookspecs import hookimpl
from kvmmu.memslot import Memslot, MemslotChange
from kvmmu.memtype import MemType
from kvmmu.plugins.virtio_gpu.coherency import Hazard, PageCheck, classify
from kvmmu.plugins.virtio_gpu.config import VirtioGpuConfig
from kvmmu.plugins.virtio_gpu.designs import (
    Design,
    design_mt_mask,
    registers_noncoherent_dma,
)
from kvmmu.plugins.virtio_gpu.device import VirtioGpuDevice
from kvmmu.plugins.virtio_gpu.guest import MAP_CACHE_TO_MEMTYPE, LinuxGuest
from pydantic import BaseModel

if TYPE_CHECKING:
    from kvmmu.vcpu import AccessResult, VCpu
    from kvmmu.vm import VM

__all__ = ["GuestMapping", "MigrationBlocked", "VirtioGpuPlugin"]


class MigrationBlocked(RuntimeError):
    """The VMM refuses to migrate (QEMU: "virgl is not yet migratable", H4)."""


@dataclass(frozen=True)
class GuestMapping:
    """A guest virtual page the driver mapped onto the device region."""

    gva: int
    gpa: int
    memtype: MemType


class VirtioGpuPlugin:
    """virtio-gpu host-visible blobs in a BAR memslot; WC designs and coherency hazards.

    Config ``[plugins.virtio_gpu]`` (:class:`VirtioGpuConfig`). The device is
    realised in ``kvmmu_vm_init``; ``kvmmu_get_mt_mask`` applies the design to
    the device's gfns (consumers run before the vendor, firstresult).
    """

    name = "virtio_gpu"
    kind = "consumer"

    def __init__(self, vm: VM, config: VirtioGpuConfig | None = None) -> None:
        self.vm = vm
        self.config = config if config is not None else VirtioGpuConfig()
        self.design = Design(self.config.design)
        self.device = VirtioGpuDevice(vm, self.config)
        self.stats: Counter[str] = Counter()
        #: guest page (gva) -> mapping, recorded by :meth:`guest_map_blob`.
        self.guest_maps: dict[int, GuestMapping] = {}
        #: gfn -> effective type of the last guest access the plugin saw.
        self.guest_view: dict[int, MemType] = {}
        #: memslot ids whose design mask is forced to WB|IPAT (H4 force_wb).
        self.force_wb_slots: set[int] = set()
        self.hazards: list[Hazard] = []
        self._registered = 0
        #: the Linux-like guest a scenario's ``guest_init`` step made (scenario_ops.py)
        self.scenario_guest: Any = None

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[BaseModel]:
        return VirtioGpuConfig

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    def kvmmu_vm_init(self, vm: VM) -> None:
        """Realise the device; the KVM VIRTIO device sets NONCOHERENT here (§10)."""
        if self.design is Design.VIRTIO_NONCOHERENT:
            # KVM_CREATE_DEVICE(KVM_DEV_TYPE_VIRTIO) + KVM_DEV_VIRTIO_NONCOHERENT_SET:
            # registers once per device; later sets do nothing [VIRTIO-DEV].
            vm.register_noncoherent_dma()
            self._registered += 1
        self.device.realize()

    @hookimpl
    def kvmmu_vm_destroy(self, vm: VM) -> None:
        """Closing the KVM VIRTIO device (or deleting the RFC v1 slot) unregisters."""
        while self._registered:
            self._registered -= 1
            vm.unregister_noncoherent_dma()

    # --------------------------------------------------------------- design
    @hookimpl
    def kvmmu_get_mt_mask(self, vm: VM, gfn: int, is_mmio: bool) -> int | None:
        """The design's EPT memtype for the device's gfns; ``None`` defers to the vendor."""
        if not self.device.owns_gfn(gfn):
            return None
        ms = vm.memslots.gfn_to_memslot(gfn)
        return design_mt_mask(
            self.design,
            ept=vm.config.vendor == "vmx" and vm.config.tdp,
            in_slot=True,
            is_mmio=is_mmio,
            dma_scope=self.config.kvm_mem_dma_scope,
            mmio_guard=self.config.mmio_guard,
            force_wb=ms is not None and ms.id in self.force_wb_slots,
        )

    @hookimpl
    def kvmmu_memslot_commit(
        self, vm: VM, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> None:
        """RFC v1 registration on the flagged slot; the force_wb mitigation (H4)."""
        slot = new if new is not None else old
        if slot is None or slot.id not in self._candidate_slots(slot):
            return
        if registers_noncoherent_dma(self.design, self.config.kvm_mem_dma_scope) and (
            self.design is Design.KVM_MEM_DMA
        ):
            if change is MemslotChange.CREATE:
                vm.register_noncoherent_dma()
                self._registered += 1
            elif change is MemslotChange.DELETE and self._registered:
                self._registered -= 1
                vm.unregister_noncoherent_dma()
        if (
            self.config.migration_mitigation == "force_wb"
            and self.design in (Design.KVM_MEM_DMA, Design.KVM_MEM_WC)
            and new is not None
        ):
            forced = new.logs_dirty
            if forced != (new.id in self.force_wb_slots):
                (self.force_wb_slots.add if forced else self.force_wb_slots.discard)(new.id)
                # "forcing WB (with a zap) once migration starts" [SJC-2020b]
                vm.zap_gfn_range(new.base_gfn, new.base_gfn + new.npages)
                self.stats["force_wb_zaps"] += 1
        if change is MemslotChange.DELETE:
            self.force_wb_slots.discard(slot.id)

    def _candidate_slots(self, slot: Memslot) -> set[int]:
        """Device slot ids, including one being created right now."""
        ids = set(self.device.slots)
        base = slot.base_gfn
        if self.device.bar_gfn <= base < self.device.bar_gfn + self.device.bar_npages:
            ids.add(slot.id)
        return ids

    # ---------------------------------------------------------------- guest
    def guest_map_blob(
        self, guest: LinuxGuest, resource_id: int, gva: int, memtype: MemType | None = None
    ) -> list[GuestMapping]:
        """The guest driver maps a mapped blob: ``io_remap_pfn_range`` with the
        protection ``map_info`` implies ([VGPU-VRAM]), or ``memtype`` if given."""
        blob = self.device.blobs[resource_id]
        gpa = self.device.blob_gpa(resource_id)
        mt = memtype if memtype is not None else MAP_CACHE_TO_MEMTYPE[blob.map_info]
        guest.map_range(gva, gpa, blob.size, mt)
        out = []
        for off in range(0, blob.size, 0x1000):
            m = GuestMapping(gva + off, gpa + off, mt)
            self.guest_maps[m.gva] = m
            out.append(m)
        return out

    def guest_map_page(self, guest: LinuxGuest, gva: int, gpa: int, memtype: MemType) -> None:
        """Map one device page at ``gva`` with ``memtype`` (per-page PAT choices)."""
        guest.map(gva, gpa, memtype)
        self.guest_maps[gva] = GuestMapping(gva, gpa, memtype)

    def guest_access(
        self, vcpu: VCpu, gva: int, kind: str = "read", size: int = 8, data: bytes | None = None
    ) -> AccessResult:
        """``vcpu.access``, remembering the effective type of device pages it reaches."""
        res = vcpu.access(gva, kind, size, data)  # type: ignore[arg-type]
        if res.gpa is not None and res.memtype is not None:
            gfn = res.gpa >> 12
            if self.device.owns_gfn(gfn):
                self.guest_view[gfn] = MemType(res.memtype)
        return res

    # ------------------------------------------------------------ coherency
    def reader_memtype(self) -> MemType:
        """Type of the migration thread's reads: cached by default (Paolo, H3);
        a VRAM BAR can only be read through its host mapping."""
        if self.config.backing == "vram":
            return self.device.host_memtype
        return MemType.from_label(self.config.migration_reader_memtype)

    def whole_vm_honoured(self, vcpu: VCpu, probe_gva: int | None) -> bool:
        """H6 probe: does a guest UC mapping of ordinary RAM come out UC?"""
        if probe_gva is None:
            return False
        res = vcpu.access(probe_gva, "read", 8)
        if res.fault is not None or res.memtype is None:
            raise RuntimeError(f"H6 probe access at {probe_gva:#x} failed: {res.fault}")
        return MemType(res.memtype) is MemType.UC

    def check_coherency(self, vcpu: VCpu, *, ram_probe_gva: int | None = None) -> list[PageCheck]:
        """Access every guest-mapped device page and classify it (coherency.py).

        ``ram_probe_gva``: a guest page mapped UC onto ordinary guest RAM, for
        the H6 probe. The hazards found are appended to :attr:`hazards`.
        """
        whole = self.whole_vm_honoured(vcpu, ram_probe_gva)
        out: list[PageCheck] = []
        for m in sorted(self.guest_maps.values(), key=lambda m: m.gva):
            res = self.guest_access(vcpu, m.gva)
            if res.fault is not None or res.memtype is None or res.hpa is None:
                raise RuntimeError(f"guest access to {m.gva:#x} did not reach memory: {res}")
            eff = MemType(res.memtype)
            mmio = self.vm.host.is_mmio_pfn(res.hpa >> 12)
            slot = self.vm.memslots.gfn_to_memslot(m.gpa >> 12)
            hz = classify(
                vendor=self.vm.config.vendor,
                spte=int(res.spte or 0),
                guest_pat=m.memtype,
                effective=eff,
                host=self.device.host_memtype_at(res.hpa),
                reader=self.reader_memtype(),
                mmio=mmio,
                whole_vm_honoured=whole,
                force_wb_active=slot is not None and slot.id in self.force_wb_slots,
            )
            self.hazards.extend(hz)
            out.append(
                PageCheck(
                    m.gpa,
                    m.memtype,
                    eff,
                    self.device.host_memtype_at(res.hpa),
                    int(res.spte or 0),
                    mmio,
                    hz,
                )
            )
        return out

    def guest_wbinvd(self, vcpu: VCpu) -> bool:
        """A guest ``WBINVD``: does KVM emulate it (write back dirty lines)?

        ``need_emulate_wbinvd`` is ``kvm_arch_has_noncoherent_dma``: only with
        noncoherent DMA registered is WBINVD emulated; otherwise it is skipped
        (spec/consumers.md M6; the early return in ``kvm_emulate_wbinvd_noskip``
        is unverified in the spec). So a guest of designs (a)–(c) cannot push
        its own dirty lines out with WBINVD before the GPU reads (H3).
        """
        emulated = self.vm.noncoherent_dma_count > 0
        self.stats["wbinvd_emulated" if emulated else "wbinvd_skipped"] += 1
        return emulated

    # ------------------------------------------------------------ migration
    def start_migration(self) -> None:
        """The VMM starts live migration: dirty logging on the device's slots."""
        if self.config.migration_mitigation == "block":
            raise MigrationBlocked("virgl is not yet migratable (spec/consumers.md H4)")
        self.device.set_logging(True)

    def stop_migration(self) -> None:
        self.device.set_logging(False)

    def migration_read(self, gpa: int, size: int) -> bytes:
        """The migration thread reads device pages from the host side.

        Per page: when the guest's last effective type differs from the
        reader's type, ``flush`` mitigation clflushes the page first (Yan
        Zhao / Kevin Tian, only reads matter; counted in ``stats["flushes"]``);
        without it the read may be stale (H3, ``stats["stale_reads"]``).
        """
        if self.config.migration_mitigation == "block":
            raise MigrationBlocked("virgl is not yet migratable (spec/consumers.md H4)")
        reader = self.reader_memtype()
        first, last = gpa >> 12, (gpa + size - 1) >> 12
        for gfn in range(first, last + 1):
            seen = self.guest_view.get(gfn)
            if seen is None or seen == reader:
                continue
            if self.config.migration_mitigation == "flush":
                self.stats["flushes"] += 1
            else:
                self.stats["stale_reads"] += 1
                self.hazards.append(
                    Hazard(
                        "H3",
                        f"migration read of gfn {gfn:#x} with {reader.label} while the guest "
                        f"accesses it {seen.label}, no flush: possibly stale",
                    )
                )
        self.stats["migration_reads"] += 1
        return self.vm.read_guest(gpa, size)

    # -------------------------------------------------------------- checks
    @hookimpl
    def kvmmu_check_invariants(self, vm: VM) -> list[str]:
        """Each mapped blob has its memslot at its offset; nothing overlaps."""
        out: list[str] = []
        c = self.config
        spans = []
        for b in self.device.blobs.values():
            if b.offset is None:
                if b.slot is not None:
                    out.append(f"virtio_gpu: unmapped resource {b.resource_id} holds slot {b.slot}")
                continue
            spans.append((b.offset, b.offset + b.size, b.resource_id))
            if c.slot_layout == "per_blob":
                ms = vm.memslots.id_to_memslot(0, b.slot) if b.slot is not None else None
                if ms is None or ms.base_gfn != (c.bar_gpa + b.offset) >> 12:
                    out.append(
                        f"virtio_gpu: resource {b.resource_id} has no memslot at its "
                        "offset (spec/consumers.md §3.1, one memslot per mapped blob)"
                    )
        spans.sort()
        for (_s0, e0, r0), (s1, _e1, r1) in itertools.pairwise(spans):
            if s1 < e0:
                out.append(f"virtio_gpu: resources {r0} and {r1} overlap in the region")
        if self._registered != self._expected_registrations():
            out.append(
                f"virtio_gpu: holds {self._registered} noncoherent DMA registrations, "
                f"expected {self._expected_registrations()}"
            )
        return out

    def _expected_registrations(self) -> int:
        if self.design is Design.VIRTIO_NONCOHERENT:
            return 1
        if registers_noncoherent_dma(self.design, self.config.kvm_mem_dma_scope):
            return len(self.device.slots)
        return 0

    @hookimpl
    def kvmmu_report_section(self, vm: VM) -> dict[str, Any]:
        """Design, blobs, counters, hazards seen, and the hazard table for this VM."""
        from kvmmu.plugins.virtio_gpu.table import hazard_table

        c = self.config
        return {
            "design": self.design.value,
            "backing": c.backing,
            "slot_layout": c.slot_layout,
            "host_memtype": c.host_memtype,
            "slots": sorted(self.device.slots),
            "blobs": [
                {
                    "resource_id": b.resource_id,
                    "size": b.size,
                    "map_info": b.map_info,
                    "offset": b.offset,
                    "slot": b.slot,
                }
                for b in self.device.blobs.values()
            ],
            "stats": dict(self.stats),
            "hazards": [{"id": h.id, "cause": h.cause} for h in self.hazards],
            "hazard_table": hazard_table(
                [vm.config.vendor],
                c.report_designs or [self.design],
                [str(vm.era)],
                backing=c.backing,
                host_memtype=c.host_memtype,
                quirks=dict(vm.config.quirks),
                self_snoop=vm.config.host_self_snoop,
            ),
        }

    # ------------------------------------------------------------ scenarios
    @hookimpl
    def kvmmu_scenario_devices(self) -> list[str]:
        """The device is ``virtio-gpu0`` in scenarios."""
        from kvmmu.plugins.virtio_gpu.scenario_ops import DEVICE

        return [DEVICE]

    @hookimpl
    def kvmmu_scenario_op(self, device: str, action: str, args: dict[str, Any]) -> Any:
        """Run a scenario step on the device (scenario_ops.py)."""
        from kvmmu.plugins.virtio_gpu.scenario_ops import DEVICE, run_action

        if device != DEVICE:
            return None
        return run_action(self, action, args)
