"""KVMGT / GVT-g: a vGPU whose shadow PPGTT lives on KVM page write-tracking.

The plugin holds one GVT device per VM (:class:`~kvmmu.plugins.kvmgt.device.GvtDevice`)
with its vGPUs; ``vm.plugin("kvmgt").vgpu`` is the attached one. Guest PPGTT
pages are write-tracked through the core (``vm.write_track_add_gfn``);
emulated guest writes arrive through ``kvmmu_track_write`` (spec/consumers.md
§1; docs/kvmgt.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.errors import KvmError
from kvmmu.hookspecs import hookimpl
from kvmmu.plugins.kvmgt.config import KvmgtConfig
from kvmmu.plugins.kvmgt.device import GpuFault, GvtDevice, Vgpu
from kvmmu.plugins.kvmgt.ggtt import GGTT_START_OFFSET

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = ["BAR0_SIZE", "GpuFault", "KvmgtConfig", "KvmgtPlugin", "Vgpu"]

#: BAR0: MMIO registers below 8 MiB, the GGTT from 8 MiB to 16 MiB (GG1).
BAR0_SIZE = 16 << 20


class KvmgtPlugin:
    """KVMGT / GVT-g shadow PPGTT on KVM page write-tracking (spec/consumers.md §1)."""

    name = "kvmgt"
    kind = "consumer"

    def __init__(self, vm: VM, config: KvmgtConfig | None) -> None:
        self.vm = vm
        self.cfg = config if config is not None else KvmgtConfig()
        self.gvt: GvtDevice | None = None
        #: scenario PPGTTs by device, then by name (scenario_ops.py)
        self.scenario_ppgtts: dict[str, dict[str, Any]] = {}

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[KvmgtConfig]:
        """``[plugins.kvmgt]``."""
        return KvmgtConfig

    # -------------------------------------------------------------- access
    @property
    def device(self) -> GvtDevice:
        """The GVT device (exists after ``vm_init``)."""
        if self.gvt is None:
            raise RuntimeError("kvmgt: the GVT device is created in kvmmu_vm_init")
        return self.gvt

    @property
    def vgpu(self) -> Vgpu:
        """vGPU 0 (the one attached to this VM unless told otherwise)."""
        return self.device.vgpus[0]

    @property
    def vgpus(self) -> list[Vgpu]:
        return self.device.vgpus

    # --------------------------------------------------------------- hooks
    @hookimpl
    def kvmmu_vm_init(self, vm: VM) -> None:
        """Create the GVT device and its vGPUs; open vGPU 0 (G1) if ``attach``."""
        self.gvt = GvtDevice(vm, self.cfg)
        if self.cfg.attach:
            self.gvt.vgpus[0].open()

    @hookimpl
    def kvmmu_vm_destroy(self, vm: VM) -> None:
        """Close and destroy every vGPU (L7, then ``intel_gvt_destroy_vgpu``)."""
        if self.gvt is not None:
            for v in self.gvt.vgpus:
                v.destroy()

    @hookimpl
    def kvmmu_track_write(self, vm: VM, gpa: int, new: bytes) -> None:
        """``kvmgt_page_track_write`` for every attached vGPU (G5)."""
        if self.gvt is not None:
            for v in self.gvt.vgpus:
                if v.attached:
                    v.page_track_write(gpa, new)

    @hookimpl
    def kvmmu_track_remove_region(self, vm: VM, gfn: int, nr_pages: int) -> None:
        """``kvmgt_page_track_remove_region`` (K9, L6): forget protect entries only."""
        if self.gvt is not None:
            for v in self.gvt.vgpus:
                if v.attached:
                    v.remove_region(gfn, nr_pages)

    @property
    def page_track_registered(self) -> bool:
        """KVMGT's page-track node is registered only while a vGPU is attached
        (``kvmgt_open_device`` .. ``kvmgt_close_device``). From 6.6 the core
        refuses a memslot MOVE while it is (K10, ``c70934e0ab2d``)."""
        return self.gvt is not None and bool(self.gvt.attached_vgpus())

    def _bar0_offset(self, gpa: int) -> int | None:
        off = gpa - self.cfg.bar0_gpa
        return off if 0 <= off < BAR0_SIZE else None

    @hookimpl
    def kvmmu_mmio_write(self, vm: VM, gpa: int, data: bytes) -> bool | None:
        """BAR0 writes; the GGTT half is ``intel_vgpu_emulate_ggtt_mmio_write`` (GG1).

        An invalid access (not 4 or 8 bytes) is logged and dropped, as the
        kernel's error return never reaches the guest.
        """
        off = self._bar0_offset(gpa)
        if off is None or self.gvt is None:
            return None
        v = self.gvt.attached_vgpus()
        if not v:
            return None
        if off >= GGTT_START_OFFSET:
            try:
                v[0].ggtt_mmio_write(off, bytes(data))
            except KvmError as e:
                v[0].log(f"GGTT MMIO write at BAR0+{off:#x}: {e}")
        return True

    @hookimpl
    def kvmmu_mmio_read(self, vm: VM, gpa: int, size: int) -> bytes | None:
        """BAR0 reads (GGTT: the virtual entry; registers read as zero)."""
        off = self._bar0_offset(gpa)
        if off is None or self.gvt is None:
            return None
        v = self.gvt.attached_vgpus()
        if not v:
            return None
        if off >= GGTT_START_OFFSET:
            try:
                return v[0].ggtt_mmio_read(off, size)
            except KvmError as e:
                v[0].log(f"GGTT MMIO read at BAR0+{off:#x}: {e}")
        return bytes(size)

    @hookimpl
    def kvmmu_check_invariants(self, vm: VM) -> list[str]:
        """Shadow == guest, refcounts, tracking and DMA krefs of every vGPU."""
        if self.gvt is None:
            return []
        out: list[str] = []
        for v in self.gvt.vgpus:
            out.extend(v.check_invariants())
        return out

    @hookimpl
    def kvmmu_report_section(self, vm: VM) -> dict[str, Any] | None:
        """Per-vGPU counters and state."""
        if self.gvt is None:
            return None
        return {
            "gen": self.cfg.gen,
            "host_pages_in_use": self.gvt.pool.in_use,
            "vgpus": [v.report() for v in self.gvt.vgpus],
        }

    @hookimpl
    def kvmmu_scenario_devices(self) -> list[str]:
        """Scenario device names: ``gpu0``, ``gpu1``, ... one per vGPU."""
        from kvmmu.plugins.kvmgt.scenario_ops import device_names

        return device_names(self) if self.gvt is not None else []

    @hookimpl
    def kvmmu_scenario_op(self, device: str, action: str, args: dict[str, Any]) -> Any:
        """Run a scenario step on one of this plugin's vGPUs (scenario_ops.py)."""
        from kvmmu.plugins.kvmgt.scenario_ops import device_names, run_action

        if self.gvt is None or device not in device_names(self):
            return None
        return run_action(self, device, action, args)
