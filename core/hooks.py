"""The typed facade through which the core calls plugin hooks.

The core never calls ``pm.hook.x`` directly: each hook has one method here,
so the argument names, the result handling and the error attribution live
in one place (:class:`kvmmu.plugin_host.PluginHost`). The vendor's hot hooks
(``get_mt_mask``) are called through the same path; the host caches each
hook's implementation list until a plugin joins or leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu.errors import PluginError

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot, MemslotChange
    from kvmmu.memtype import MemType
    from kvmmu.plugin_host import PluginHost
    from kvmmu.spte import SpteFormat
    from kvmmu.vcpu import VCpu
    from kvmmu.vm import VM

__all__ = ["Hooks"]


class Hooks:
    """One method per hook in :mod:`kvmmu.hookspecs`."""

    def __init__(self, vm: VM, host: PluginHost) -> None:
        self.vm = vm
        self.host = host

    # vendor -------------------------------------------------------------
    def spte_format(self) -> SpteFormat:
        fmt = self.host.call_first("kvmmu_spte_format", vm=self.vm)
        if fmt is None:
            raise PluginError(self.vm.config.vendor, "kvmmu_spte_format", "returned no format")
        return fmt

    def get_mt_mask(self, vcpu: VCpu | None, gfn: int, is_mmio: bool) -> int | None:
        r = self.host.call_first_args("kvmmu_get_mt_mask", (self.vm, vcpu, gfn, is_mmio))
        return None if r is None else int(r)

    def effective_memtype(
        self, vcpu: VCpu, spte: int, guest_pat_type: MemType | None, hpa: int
    ) -> MemType:
        r = self.host.call_first(
            "kvmmu_effective_memtype",
            vm=self.vm,
            vcpu=vcpu,
            spte=spte,
            guest_pat_type=guest_pat_type,
            hpa=hpa,
        )
        if r is None:
            raise PluginError(self.vm.config.vendor, "kvmmu_effective_memtype", "returned None")
        return r

    def hardware_cr0(self, vcpu: VCpu, cr0: int) -> int:
        r = self.host.call_first("kvmmu_hardware_cr0", vm=self.vm, vcpu=vcpu, cr0=cr0)
        return cr0 if r is None else int(r)

    def max_mapping_level(self, vcpu: VCpu | None, gfn: int, max_level: int) -> int | None:
        r = self.host.call_first_args("kvmmu_max_mapping_level", (self.vm, vcpu, gfn, max_level))
        return None if r is None else int(r)

    def pae_pdptes_in_registers(self) -> bool:
        return bool(self.host.call_first("kvmmu_pae_pdptes_in_registers", vm=self.vm))

    def cpu_dirty_log_size(self) -> int:
        r = self.host.call_first("kvmmu_cpu_dirty_log_size", vm=self.vm)
        return 0 if r is None else int(r)

    def noncoherent_dma_changed(self, old_count: int, new_count: int) -> None:
        self.host.call(
            "kvmmu_noncoherent_dma_changed", vm=self.vm, old_count=old_count, new_count=new_count
        )

    def cr0_changed(self, vcpu: VCpu, old: int, new: int) -> None:
        self.host.call("kvmmu_cr0_changed", vm=self.vm, vcpu=vcpu, old=old, new=new)

    def msr_written(self, vcpu: VCpu, index: int, old: int, new: int) -> None:
        self.host.call("kvmmu_msr_written", vm=self.vm, vcpu=vcpu, index=index, old=old, new=new)

    # lifecycle ----------------------------------------------------------
    def vm_init(self) -> None:
        self.host.call("kvmmu_vm_init", vm=self.vm)

    def vm_destroy(self) -> None:
        self.host.call("kvmmu_vm_destroy", vm=self.vm)

    def vcpu_create(self, vcpu: VCpu) -> None:
        self.host.call("kvmmu_vcpu_create", vm=self.vm, vcpu=vcpu)

    # memslots -----------------------------------------------------------
    def memslot_prepare(
        self, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> None:
        self.host.call(
            "kvmmu_memslot_prepare", veto=True, vm=self.vm, old=old, new=new, change=change
        )

    def memslot_commit(
        self, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> None:
        self.host.call("kvmmu_memslot_commit", vm=self.vm, old=old, new=new, change=change)

    # flushes and zaps ---------------------------------------------------
    def flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        self.vm.stats["remote_tlb_flush"] += 1
        self.host.call("kvmmu_flush_remote_tlbs_range", vm=self.vm, gfn=gfn, nr_pages=nr_pages)

    def flush_remote_tlbs_gfns(self, gfns: np.ndarray) -> None:
        if len(gfns) == 0:
            return
        self.vm.stats["remote_tlb_flush"] += 1
        arr = np.asarray(gfns, dtype=np.uint64)
        self.host.call("kvmmu_flush_remote_tlbs_gfns", vm=self.vm, gfns=arr)

    def zap_all_fast(self, new_valid_gen: int) -> None:
        self.host.call("kvmmu_zap_all_fast", vm=self.vm, new_valid_gen=new_valid_gen)

    # MMIO ---------------------------------------------------------------
    def mmio_read(self, gpa: int, size: int) -> bytes | None:
        r = self.host.call_first("kvmmu_mmio_read", vm=self.vm, gpa=gpa, size=size)
        return None if r is None else bytes(r)

    def mmio_write(self, gpa: int, data: bytes) -> bool:
        return bool(self.host.call_first("kvmmu_mmio_write", vm=self.vm, gpa=gpa, data=data))

    # checks and reports -------------------------------------------------
    def check_invariants(self) -> list[str]:
        out: list[str] = []
        for name, result in self.host.iter_results("kvmmu_check_invariants", vm=self.vm):
            out.extend(
                f"{name}: {m}" if not str(m).startswith(name) else str(m) for m in result or []
            )
        return out

    def report_sections(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, result in self.host.iter_results("kvmmu_report_section", vm=self.vm):
            if result is not None:
                out[name] = result
        return out


def scenario_devices(hooks: Hooks) -> dict[str, str]:
    """Device name -> owning plugin, from ``kvmmu_scenario_devices``."""
    out: dict[str, str] = {}
    for name, result in hooks.host.iter_results("kvmmu_scenario_devices", vm=hooks.vm):
        for dev in result or []:
            out[str(dev)] = name
    return out


def scenario_op(hooks: Hooks, device: str, action: str, args: dict[str, Any]) -> Any:
    """Dispatch a device step through ``kvmmu_scenario_op``."""
    return hooks.host.call_first(
        "kvmmu_scenario_op", vm=hooks.vm, device=device, action=action, args=args
    )
