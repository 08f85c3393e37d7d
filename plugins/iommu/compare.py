"""Pinned (VFIO baseline) vs shared TDP on the same workload.

``compare_modes(workload)`` runs one :class:`Workload` on two fresh VMs,
one per mode, and returns what the RFC's pros/cons discussion argues about
(spec/consumers.md §2.4): pages pinned, IOTLB invalidations, IO page
faults, and whether host invalidations can reclaim guest memory
(overcommit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmmu.errors import KvmError
from kvmmu.plugins.iommu.device import DmaFault

__all__ = ["GUEST_HVA", "Workload", "compare_modes", "make_vm"]

PAGE_SHIFT = 12
#: Host VA of guest RAM in the workload VMs.
GUEST_HVA = 0x7F00_0000_0000


@dataclass
class Workload:
    """A guest with ``guest_pages`` of RAM (slot 0 at GPA 0) and a list of steps.

    Steps are tuples: ``("dma", gfn, write)`` a device DMA of 8 bytes at
    IOVA = GPA; ``("touch", gfn)`` the vCPU side faults the page in
    (``KVM_PRE_FAULT_MEMORY``); ``("reclaim", gfn, npages)`` the host
    invalidates and reclaims the hva range; ``("zap", gfn, npages)``
    ``kvm_zap_gfn_range``; ``("zap_all",)`` fast zap.
    """

    guest_pages: int = 64
    steps: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.guest_pages <= 0:
            raise ValueError(f"guest_pages must be positive, got {self.guest_pages}")
        known = {"dma": 3, "touch": 2, "reclaim": 3, "zap": 3, "zap_all": 1}
        for s in self.steps:
            if not s or s[0] not in known or len(s) != known[s[0]]:
                raise ValueError(f"bad workload step {s!r}; allowed: {sorted(known)}")


def make_vm(mode: str, guest_pages: int, **iommu: Any) -> Any:
    """A one-vCPU VMX/EPT VM with ``guest_pages`` of RAM and the iommu plugin.

    The real configuration: VT-d reserves bit 11 and KVM is built with
    ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH`` (``[plugins.vmx] mmu_present_high``;
    spec/consumers.md T6). ``iommu`` overrides ``[plugins.iommu]`` keys.
    """
    import kvmmu

    conf = {"mode": mode, "vtd_bit11_reserved": True, **iommu}
    vm = kvmmu.VM(
        {
            "vcpus": 1,
            "plugins": {
                "enabled": ["iommu"],
                "iommu": conf,
                "vmx": {"mmu_present_high": True},
            },
        }
    )
    size = guest_pages << PAGE_SHIFT
    vm.host.mmap_anon(GUEST_HVA, size)
    vm.set_user_memory_region(0, 0, 0, size, GUEST_HVA)
    return vm


def _run(mode: str, w: Workload) -> dict[str, Any]:
    vm = make_vm(mode, w.guest_pages)
    p = vm.plugin("iommu")
    dev = p.add_device("dev0", iopf=True)
    ok = failed = 0
    for s in w.steps:
        kind = s[0]
        if kind == "dma":
            gpa = int(s[1]) << PAGE_SHIFT
            try:
                if s[2]:
                    dev.dma_write(gpa, b"\xa5" * 8)
                else:
                    dev.dma_read(gpa, 8)
                ok += 1
            except DmaFault:
                failed += 1
        elif kind == "touch":
            vm.pre_fault_memory(int(s[1]) << PAGE_SHIFT, 1 << PAGE_SHIFT)
        elif kind == "reclaim":
            hva = GUEST_HVA + (int(s[1]) << PAGE_SHIFT)
            vm.host.invalidate_range(hva, hva + (int(s[2]) << PAGE_SHIFT))
        elif kind == "zap":
            vm.zap_gfn_range(int(s[1]), int(s[1]) + int(s[2]))
        else:
            vm.zap_all_fast()
    rep = p.kvmmu_report_section()
    return {
        "pages_pinned": rep["pages_pinned"],
        "iotlb_invalidations": rep["iotlb"]["invalidations"],
        "iotlb_entries_invalidated": rep["iotlb"]["entries_invalidated"],
        "io_page_faults": rep["io_page_faults"],
        "pages_reclaimed": vm.host.stats.pages_reclaimed,
        "overcommit_possible": rep["pages_pinned"] == 0,
        "dma_ok": ok,
        "dma_failed": failed,
        "invariant_violations": vm.check_invariants(),
    }


def compare_modes(workload: Workload) -> dict[str, dict[str, Any]]:
    """Run ``workload`` in pinned and in shared mode; return both result dicts.

    Keys per mode: ``pages_pinned``, ``iotlb_invalidations``,
    ``iotlb_entries_invalidated``, ``io_page_faults``, ``pages_reclaimed``
    (host invalidations that freed guest pages), ``overcommit_possible``
    (no guest page pinned), ``dma_ok``, ``dma_failed``,
    ``invariant_violations``.
    """
    try:
        return {mode: _run(mode, workload) for mode in ("pinned", "shared")}
    except KvmError as e:
        raise KvmError(e.errno, f"compare_modes: {e.message}") from e
