"""System property test: every consumer plugin on one VM under random operations.

DESIGN.md (Testing): random sequences of memslot changes, accesses, tracked
writes, zaps, host invalidations, GPU work and device DMA, with
``vm.check_invariants()`` after every step. The VM runs VMX with the MMU
present bit high so the IOMMU can share the TDP for real (T6), KVMGT with a
PPGTT the guest edits through vCPU writes, and a virtio-gpu device.
"""

from __future__ import annotations

from typing import Any

import kvmmu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu.plugins.iommu import DmaFault
from kvmmu.plugins.kvmgt.device import VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE
from kvmmu.plugins.kvmgt.guest import GuestPpgtt

HVA = 0x7000_0000_0000
RAM = 16 << 20
PAGES = 64  # the gfns the steps touch: [0, 64) plus the PPGTT pool above them
EXTRA_HVA = HVA + (1 << 30)
EXTRA_GPA = 1 << 28
POOL = (0x100000, 0x180000)  # guest PPGTT tables
GMA_BASE = 0x10000


def make_vm() -> tuple[Any, Any, Any, Any]:
    vm = kvmmu.VM(
        kvmmu.VMConfig(
            vendor="vmx",
            vcpus=2,
            plugins={
                "enabled": ["kvmgt", "virtio_gpu", "iommu"],
                "vmx": {"mmu_present_high": True},
                "iommu": {"mode": "shared", "devices": ["nic0"]},
            },
        )
    )
    vm.host.mmap_anon(HVA, RAM)
    vm.set_user_memory_region(0, 0, 0, RAM, HVA)
    vm.host.mmap_anon(EXTRA_HVA, 8 << 12)
    g = GuestPpgtt(vm, *POOL, vcpu=vm.vcpus[1])
    vgpu = vm.plugin("kvmgt").vgpu
    mm = vgpu.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    return vm, g, vgpu, mm


step = st.one_of(
    st.tuples(st.just("access"), st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(st.just("track"), st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(st.just("zap"), st.integers(0, PAGES), st.integers(1, 16)),
    st.tuples(st.just("zap_all")),
    st.tuples(st.just("invalidate"), st.integers(0, PAGES - 1), st.integers(1, 8)),
    st.tuples(st.just("dma"), st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(
        st.just("ppgtt_map"),
        st.integers(0, 7),
        st.integers(0, PAGES - 1),
        st.sampled_from(["8", "4+4"]),
    ),
    st.tuples(st.just("ppgtt_unmap"), st.integers(0, 7)),
    st.tuples(st.just("submit"), st.integers(0, 7)),
    st.tuples(st.just("slot")),
    st.tuples(st.just("dirty"), st.booleans()),
    st.tuples(st.just("prefault"), st.integers(0, PAGES - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_random_system_operations_keep_every_invariant(steps: list[tuple[Any, ...]]) -> None:
    vm, g, vgpu, mm = make_vm()
    nic = vm.plugin("iommu").devices["nic0"]
    vcpu = vm.vcpus[0]  # paging off: gva == gpa
    mapped: set[int] = set()
    extra = False
    for s in steps:
        kind = s[0]
        if kind == "access":
            gpa = (s[1] << 12) + 8
            if s[2]:
                vcpu.access(gpa, "write", 8, bytes([s[1]]) * 8)
            else:
                vcpu.access(gpa, "read")
        elif kind == "track":
            if s[2]:
                vm.write_track_add_gfn(s[1])
            elif vm.page_track.count(s[1]) > _own_tracking(vgpu, s[1]):
                vm.write_track_remove_gfn(s[1])
        elif kind == "zap":
            vm.zap_gfn_range(s[1], s[1] + s[2])
        elif kind == "zap_all":
            vm.zap_all_fast()
        elif kind == "invalidate":
            hva = HVA + (s[1] << 12)
            vm.host.invalidate_range(hva, hva + (s[2] << 12))
        elif kind == "dma":
            try:
                if s[2]:
                    nic.dma_write(s[1] << 12, b"\xa5" * 16)
                else:
                    nic.dma_read(s[1] << 12, 16)
            except DmaFault:
                pass  # a write IOPF to a tracked gfn fails (T3, T8): a DMA fault, not a bug
        elif kind == "ppgtt_map":
            g.map_4k(GMA_BASE + (s[1] << 12), s[2] << 12, width=s[3])
            mapped.add(s[1])
        elif kind == "ppgtt_unmap":
            if s[1] in mapped:
                g.unmap(GMA_BASE + (s[1] << 12))
                mapped.discard(s[1])
        elif kind == "submit":
            reads = [(GMA_BASE + (s[1] << 12), 8)] if s[1] in mapped else []
            vgpu.submit_workload(mm, reads=reads)
        elif kind == "slot":
            size = 0 if extra else 8 << 12
            vm.set_user_memory_region(1, 0, EXTRA_GPA, size, EXTRA_HVA)
            extra = not extra
        elif kind == "dirty":
            flags = kvmmu.KVM_MEM_LOG_DIRTY_PAGES if s[1] else 0
            vm.set_user_memory_region(0, flags, 0, RAM, HVA)
            if s[1]:
                vm.get_dirty_log(0)
        elif kind == "prefault":
            vm.pre_fault_memory(s[1] << 12, 4096)
        assert vm.check_invariants() == [], (s, vm.check_invariants())


def _own_tracking(vgpu: Any, gfn: int) -> int:
    """KVMGT's own write-track reference on ``gfn`` (its PPGTT table pages)."""
    return 1 if gfn in vgpu.ptable.gfns else 0
