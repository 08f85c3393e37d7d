"""KVM_PRE_FAULT_MEMORY (spec/kvm-mmu-2.md §6)."""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import numpy as np
import pytest
from kvmmu import spte as S
from kvmmu.mmu import PFERR_GUEST_FINAL_MASK

HVA = 0x7F00_0000_0000


def _vm(
    size: int = 16 << 20, page_level: int = 2, hva: int = HVA, flags: int = 0, **cfg: Any
) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=cfg.pop("vendor", "vmx"), **cfg))
    vm.host.mmap_anon(HVA, size + (2 << 20), page_level=page_level)
    vm.set_user_memory_region(0, flags, 0, size, hva)
    return vm


@pytest.mark.parametrize(
    ("gpa", "size"), [(0x1001, 0x1000), (0, 0x1800), (0, 0), ((1 << 64) - 0x1000, 0x2000)]
)
def test_prefault_einval_on_bad_range(gpa: int, size: int) -> None:
    vm = _vm()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.pre_fault_memory(gpa, size)
    assert e.value.errno == errno.EINVAL


def test_prefault_enoent_without_memslot_and_partial_progress() -> None:
    vm = _vm()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.pre_fault_memory(1 << 32, 0x1000)
    assert e.value.errno == errno.ENOENT
    # progress stops at the slot end; the processed bytes are returned
    assert vm.pre_fault_memory((16 << 20) - 0x1000, 0x3000) == 0x1000


def test_prefault_returns_end_of_huge_mapping() -> None:
    vm = _vm()
    assert vm.mmu.pre_fault_memory(0x20_3000, 0x1000) == 0x1000
    assert vm.mmu.translate(0x20_3000)[1] == 2
    # the ioctl step returns min(size, end_of_mapping - gpa)
    assert vm.mmu._prefault_one(0x20_3000, 0x30_0000, None) == 0x40_0000 - 0x20_3000


def test_prefault_maps_read_fault_not_accessed_no_pf_taken() -> None:
    vm = _vm()
    assert vm.pre_fault_memory(0, 4 << 20) == 4 << 20
    spte, level = vm.mmu.translate(0x1000)
    assert level == 2 and not spte & vm.spte_format.accessed_mask
    assert spte & S.PT_WRITABLE_MASK  # host page writable: read fault maps W
    assert vm.stats["pf_taken"] == 0 and vm.mmu.check_invariants() == []


def _table_image(vm: Any, gfns: range) -> list[tuple[int, int] | None]:
    return [vm.mmu.translate(g << 12) for g in gfns]


@pytest.mark.parametrize("case", ["thp", "4k_incongruent", "dirty", "tracked", "partial"])
def test_prefault_bulk_equals_scalar_faults(case: str) -> None:
    def build() -> Any:
        hva = HVA + 0x1000 if case == "4k_incongruent" else HVA
        flags = kvmmu.KVM_MEM_LOG_DIRTY_PAGES if case == "dirty" else 0
        vm = _vm(hva=hva, flags=flags)
        if case == "tracked":
            vm.write_track_add_gfn(0x345)
        if case == "partial":
            vm.mmu.page_fault(vm.vcpus[0], 0x40_5000, 2)
        return vm

    bulk, scalar = build(), build()
    assert bulk.pre_fault_memory(0, 16 << 20) == 16 << 20
    gpa = 0
    while gpa < 16 << 20:
        gpa += scalar.mmu._prefault_one(gpa, (16 << 20) - gpa, None)
    gfns = range(0, 4096, 7)
    assert _table_image(bulk, gfns) == _table_image(scalar, gfns)
    assert bulk.mmu.check_invariants() == []
    if case == "dirty":
        assert np.array_equal(bulk.get_dirty_log(0), scalar.get_dirty_log(0))


def test_prefault_eagain_on_invalid_slot() -> None:
    vm = _vm()
    slot = vm.memslots.gfn_to_memslot(0)
    slot.flags |= 1 << 16
    with pytest.raises(kvmmu.KvmError) as e:
        vm.mmu._prefault_one(0, 0x1000, None)
    assert e.value.errno == errno.EAGAIN
    slot.flags &= ~(1 << 16)


def test_prefault_error_code_is_guest_final_read() -> None:
    assert PFERR_GUEST_FINAL_MASK == 1 << 32


GB = 1 << 30
MB2 = 2 << 20


def _state(vm: Any) -> dict[str, Any]:
    """Every table row and its metadata, the free list, the host's pfns and stats."""
    pool, host = vm.mmu.pool, vm.host
    top = pool._top
    return {
        "data": pool.data[:top].tolist(),
        "meta": [a[:top].tolist() for a in (pool.level, pool.gfn, pool.live, pool.nx_disallowed)],
        "free": list(pool._free),
        "small": dict(host._small),
        "blocks": [None if v.blocks is None else v.blocks.tolist() for v in host.vmas()],
        "runs": (list(host._run_pfns), list(host._runs)),
        "next_pfn": host._next_pfn,
        "host_stats": vars(host.stats).copy(),
        "pf_fixed": vm.stats["pf_fixed"],
    }


def _huge_pair(
    slot_size: int, page_level: int, setup: Any = None, flags: int = 0
) -> tuple[Any, Any]:
    def build() -> Any:
        vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
        vm.host.mmap_anon(HVA, slot_size + GB, page_level=page_level)
        vm.set_user_memory_region(0, flags, 0, slot_size, HVA)
        if setup is not None:
            setup(vm)
        return vm

    return build(), build()


def _prefault_both(bulk: Any, scalar: Any, gpa: int, size: int) -> None:
    done = 0
    while done < size:
        done += bulk.pre_fault_memory(gpa + done, size - done)
    assert done == size
    done = 0
    while done < size:
        done += scalar.mmu._prefault_one(gpa + done, size - done, None)


def _disallow(vm: Any, gfn: int) -> None:
    vm.memslots.gfn_to_memslot(gfn).disallow_lpage(gfn)


HUGE_CASES: dict[str, tuple[int, Any, int, int, int]] = {
    # name: (VMA page level, setup, slot flags, gpa, size)
    "thp_whole": (2, None, 0, 0, 3 * GB),
    "thp_partial_range": (2, None, 0, GB - 6 * MB2, GB + 10 * MB2 + 0x3000),
    "thp_disallowed_frame": (
        2,
        lambda vm: _disallow(vm, (GB + 7 * MB2 + 0x5000) >> 12),
        0,
        0,
        3 * GB,
    ),
    "thp_tracked_gfn": (2, lambda vm: vm.write_track_add_gfn(0x4_0123), 0, 0, 3 * GB),
    "thp_dirty_logging": (2, None, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, GB - 4 * MB2, 8 * MB2),
    "thp_existing_4k_and_2m": (
        2,
        lambda vm: [
            vm.mmu.page_fault(vm.vcpus[0], GB + 0x40_5000, 2),
            vm.mmu._prefault_one(GB + 0x80_0000, MB2, None),
        ],
        0,
        0,
        3 * GB,
    ),
    "thp_free_list": (
        2,
        lambda vm: (
            [vm.mmu._prefault_one(g * GB, MB2, None) for g in range(3)] + [vm.zap_all_fast()]
        ),
        0,
        0,
        3 * GB,
    ),
    "hugetlb_1g": (3, None, 0, 0, 3 * GB),
    "hugetlb_partial_range": (3, None, 0, GB - 4 * MB2, 2 * GB + 0x3000),
    "hugetlb_disallowed_frame": (3, lambda vm: _disallow(vm, (GB + 3 * MB2) >> 12), 0, 0, 3 * GB),
    "hugetlb_tracked_gfn": (3, lambda vm: vm.write_track_add_gfn(0x4_0123), 0, 0, 3 * GB),
    "hugetlb_existing_pd": (3, lambda vm: _disallow(vm, GB >> 12), 0, 0, 3 * GB),
}


@pytest.mark.parametrize("case", sorted(HUGE_CASES))
def test_prefault_huge_equals_per_page_faults(case: str) -> None:
    """The vectorised 2M/1G path builds the very tables, pfns and host state of per-page faults."""
    level, setup, flags, gpa, size = HUGE_CASES[case]
    bulk, scalar = _huge_pair(3 * GB, level, setup, flags)
    _prefault_both(bulk, scalar, gpa, size)
    assert _state(bulk) == _state(scalar)
    assert bulk.mmu.check_invariants() == []
    if flags:
        assert np.array_equal(bulk.get_dirty_log(0), scalar.get_dirty_log(0))


def test_prefault_huge_maps_1g_and_2m_levels() -> None:
    bulk, _ = _huge_pair(3 * GB, 3, lambda vm: _disallow(vm, (GB + 3 * MB2) >> 12))
    assert bulk.pre_fault_memory(0, 3 * GB) == 3 * GB
    levels = [bulk.mmu.translate(gpa)[1] for gpa in (0x1234_5000, GB, GB + 3 * MB2, 2 * GB)]
    assert levels == [3, 2, 1, 3]  # the disallowed frame's region at 2M, its frame at 4K


def test_prefault_huge_skips_during_invalidation() -> None:
    """An invalidation in progress: the per-page path (which retries its gfns) runs."""

    def start(vm: Any) -> None:
        vm.host.invalidate_range_start(HVA + 2 * GB, HVA + 2 * GB + MB2)

    bulk, scalar = _huge_pair(3 * GB, 2, start)
    assert bulk.mmu._prefault_huge(0, GB, None) == 0
    _prefault_both(bulk, scalar, 0, 64 * MB2)
    assert _state(bulk) == _state(scalar)
    for vm in (bulk, scalar):
        vm.host.invalidate_range_end(HVA + 2 * GB, HVA + 2 * GB + MB2)
    _prefault_both(bulk, scalar, 0, GB)
    assert _state(bulk) == _state(scalar)


def test_prefault_honours_per_frame_guest_mtrr_types_in_6_10_with_noncoherent_dma() -> None:
    """memtype.md §7/§8: in 6.7-6.10 with noncoherent DMA the EPT memtype is the
    guest MTRR type per page and huge mappings stop at MTRR boundaries; a bulk
    pre-fault must give every frame its own type, exactly as faults do."""

    def build() -> Any:
        # 6.10: the only release with both KVM_PRE_FAULT_MEMORY (6.10+) and
        # guest MTRRs honoured (up to 6.10), spec/kvm-mmu-2.md §8.
        vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era="6.10"))
        vm.host.mmap_anon(HVA, 1 << 30, page_level=2)
        vm.set_user_memory_region(0, 0, 0, 1 << 30, HVA)
        vm.register_noncoherent_dma()
        v = vm.vcpus[0]
        v.set_sregs(cr0=0x11)  # caches on: CR0.CD set would make it WB (quirk on)
        v.set_msr(0x200, 0x0080_0000 | 0)  # PHYSBASE0: 8 MiB, UC
        v.set_msr(0x201, (((1 << 46) - 1) & ~((2 << 20) - 1)) | (1 << 11))  # 2 MiB, valid
        v.set_msr(0x2FF, (1 << 11) | 6)  # MTRRs on, default WB
        return vm

    bulk, scalar = build(), build()
    _prefault_both(bulk, scalar, 0, 16 << 20)
    gfns = range(0, 4096, 3)
    assert _table_image(bulk, gfns) == _table_image(scalar, gfns)
    uc = bulk.mmu.translate(0x80_0000)
    wb = bulk.mmu.translate(0x40_0000)
    assert uc is not None and (uc[0] >> 3) & 7 == 0  # the UC frame's SPTE is UC
    assert wb is not None and (wb[0] >> 3) & 7 == 6


def test_prefault_progress_is_goal_level_of_the_fault() -> None:
    """§6 step 5: ``kvm_tdp_map_page`` reports ``fault.goal_level``. When the
    fast path answers (A/D off: an access-tracked huge leaf is restored
    locklessly), ``kvm_mmu_hugepage_adjust`` never ran, so the goal stays 4K
    and each step advances 4K even though the SPTE is a 2M leaf."""
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    assert vm.pre_fault_memory(0, 2 << 20) == 2 << 20
    spte = vm.mmu._last_spte(vm.mmu.get_root(0), 0)[3]
    assert spte & S.PT_PAGE_SIZE_MASK and S.is_access_track_spte(vm.spte_format, spte)
    assert vm.mmu.translate(0x1000) is None
    fast = vm.stats["pf_fast"]
    assert vm.pre_fault_memory(0, 2 << 20) == 2 << 20
    # first step FIXED (restore), then 511 SPURIOUS steps, all 4K, all fast
    assert vm.stats["pf_fast"] - fast == 512
    # the access-tracked leaf was restored (hardware-present again)
    assert vm.mmu.translate(0x1000)[1] == 2
