"""Random faults, zaps, invalidations, tracking and slot changes keep the MMU invariants.

After every step ``check_invariants()`` must be empty (spec/kvm-mmu.md §2.3,
§3.5, §3.14; kvm-mmu-2.md §5.1, §7).
"""

from __future__ import annotations

import kvmmu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu.mmu import PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK

HVA = 0x7F00_0000_0000
NPAGES = 2048  # 8 MiB, four 2M frames

ops = st.one_of(
    st.tuples(st.just("fault"), st.integers(0, NPAGES + 64), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("zap"), st.integers(0, NPAGES), st.integers(1, 700)),
    st.tuples(st.just("invalidate"), st.integers(0, NPAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("track"), st.integers(0, NPAGES - 1), st.just(0)),
    st.tuples(st.just("untrack"), st.integers(0, NPAGES - 1), st.just(0)),
    st.tuples(st.just("dirty"), st.booleans(), st.just(0)),
    st.tuples(st.just("zap_all"), st.just(0), st.just(0)),
    st.tuples(st.just("prefault"), st.integers(0, NPAGES - 1), st.integers(1, 600)),
    st.tuples(st.just("harvest"), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=25), st.booleans(), st.booleans())
def test_random_ops_keep_invariants(steps: list, nx: bool, thp: bool) -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", nx_huge_pages=nx))
    vm.host.mmap_anon(HVA, NPAGES << 12, page_level=2 if thp else 1)
    vm.set_user_memory_region(0, 0, 0, NPAGES << 12, HVA)
    v = vm.vcpus[0]
    tracked: list[int] = []
    logging = False
    kinds = [PFERR_USER_MASK, PFERR_WRITE_MASK | PFERR_USER_MASK, PFERR_FETCH_MASK]
    for op, a, b in steps:
        if op == "fault":
            hit = vm.mmu.translate(a << 12)
            code = kinds[b] | (PFERR_PRESENT_MASK if hit is not None else 0)
            vm.mmu.page_fault(v, a << 12, code)
        elif op == "zap":
            vm.zap_gfn_range(a, a + b)
        elif op == "invalidate":
            vm.invalidate_hva_range(HVA + (a << 12), HVA + (min(a + b, NPAGES) << 12))
        elif op == "track":
            vm.write_track_add_gfn(a)
            tracked.append(a)
        elif op == "untrack" and tracked:
            vm.write_track_remove_gfn(tracked.pop())
        elif op == "dirty":
            logging = bool(a)
            flags = kvmmu.KVM_MEM_LOG_DIRTY_PAGES if logging else 0
            vm.set_user_memory_region(0, flags, 0, NPAGES << 12, HVA)
        elif op == "zap_all":
            vm.zap_all_fast()
        elif op == "prefault":
            vm.pre_fault_memory(a << 12, min(b, NPAGES - a) << 12)
        elif op == "harvest" and logging:
            vm.get_dirty_log(0)
        assert vm.mmu.check_invariants() == [], (op, a, b)
