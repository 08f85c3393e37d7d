"""Property test: random DMA / zap / host invalidation / memslot changes keep every
invariant (the IOTLB never outlives a zap; pinned pages never reclaimed)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu.errors import KvmError
from kvmmu.plugins.iommu import DmaFault
from kvmmu.plugins.iommu.compare import GUEST_HVA, make_vm

PAGES = 32
EXTRA_HVA = GUEST_HVA + (1 << 30)
EXTRA_GPA = 1 << 28

step = st.one_of(
    st.tuples(st.just("dma"), st.integers(0, PAGES + 4), st.booleans()),
    st.tuples(st.just("zap"), st.integers(0, PAGES), st.integers(1, 8)),
    st.tuples(st.just("reclaim"), st.integers(0, PAGES - 1), st.integers(1, 8)),
    st.tuples(st.just("touch"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("slot"), st.booleans()),
    st.tuples(st.just("zap_all")),
    st.tuples(st.just("track"), st.integers(0, PAGES - 1)),
)


@pytest.mark.parametrize("mode", ["pinned", "shared"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_random_ops_keep_invariants(mode: str, steps: list[tuple]) -> None:
    vm = make_vm(mode, PAGES)
    vm.host.mmap_anon(EXTRA_HVA, 4 << 12)
    dev = vm.plugin("iommu").add_device("d", iopf=True)
    have_extra = False
    for s in steps:
        kind = s[0]
        if kind == "dma":
            gpa = (EXTRA_GPA if s[1] >= PAGES and have_extra else s[1] << 12) + 8
            try:
                if s[2]:
                    dev.dma_write(gpa, b"\x5a" * 16)
                else:
                    dev.dma_read(gpa, 16)
            except DmaFault:
                pass  # outside RAM, tracked page, or unmapped: a DMA fault, not a bug
        elif kind == "zap":
            vm.zap_gfn_range(s[1], s[1] + s[2])
        elif kind == "reclaim":
            hva = GUEST_HVA + (s[1] << 12)
            vm.host.invalidate_range(hva, hva + (min(s[2], PAGES - s[1]) << 12))
        elif kind == "touch":
            vm.pre_fault_memory(s[1] << 12, 4096)
        elif kind == "slot":
            size = (4 << 12) if not have_extra else 0
            vm.set_user_memory_region(1, 0, EXTRA_GPA, size, EXTRA_HVA)
            have_extra = not have_extra
        elif kind == "zap_all":
            vm.zap_all_fast()
        else:
            with contextlib.suppress(KvmError):
                vm.write_track_add_gfn(s[1])
        assert vm.check_invariants() == [], (s, vm.check_invariants())
