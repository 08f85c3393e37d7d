"""The TDP fault path: every RET_PF outcome, MMIO SPTEs, levels, fast path, races.

Rules from arch/x86/kvm/mmu/mmu.c and tdp_mmu.c (spec/kvm-mmu.md §3.2–3.12,
kvm-mmu-2.md §5).
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import pytest
from kvmmu import spte as S
from kvmmu.mmu import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
)

HVA = 0x7F00_0000_0000
R = PFERR_USER_MASK
W = PFERR_WRITE_MASK | PFERR_USER_MASK


def _vm(size: int = 8 << 20, page_level: int = 1, flags: int = 0, **cfg: Any) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=cfg.pop("vendor", "vmx"), **cfg))
    vm.host.mmap_anon(HVA, size, page_level=page_level)
    vm.set_user_memory_region(0, flags, 0, size, HVA)
    return vm


def test_ret_pf_fixed_then_spurious() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x3000, W) == RET_PF_FIXED
    assert vm.mmu.page_fault(v, 0x3000, W | PFERR_PRESENT_MASK) == RET_PF_SPURIOUS
    assert vm.stats["ret_pf.FIXED"] == 1 and vm.stats["pf_spurious"] == 1
    assert vm.stats["pf_taken"] == 2
    assert vm.mmu.check_invariants() == []


def test_ret_pf_emulate_on_write_to_tracked_gfn() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    vm.write_track_add_gfn(5)
    # not-present fault on a tracked gfn: mapped read-only (§2.3 item 4)
    assert vm.mmu.page_fault(v, 5 << 12, R) == RET_PF_FIXED
    spte, level = vm.mmu.translate(5 << 12)
    assert level == 1 and not spte & S.PT_WRITABLE_MASK
    assert not spte & vm.spte_format.mmu_writable_mask
    # present write: page_fault_handle_page_track -> EMULATE
    assert vm.mmu.page_fault(v, 5 << 12, W | PFERR_PRESENT_MASK) == RET_PF_EMULATE
    assert vm.mmu.check_invariants() == []


def test_write_fault_not_present_on_tracked_gfn_is_wrprot_emulate() -> None:
    vm = _vm()
    vm.write_track_add_gfn(6)
    assert vm.mmu.page_fault(vm.vcpus[0], 6 << 12, W) == RET_PF_EMULATE
    spte, _ = vm.mmu.translate(6 << 12)
    assert not spte & S.PT_WRITABLE_MASK


def test_ret_pf_emulate_write_to_readonly_slot_not_mmio_cached() -> None:
    vm = _vm(flags=kvmmu.KVM_MEM_READONLY)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x2000, W) == RET_PF_EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 0
    assert vm.mmu.translate(0x2000) is None
    assert vm.mmu.page_fault(v, 0x2000, R) == RET_PF_FIXED
    assert not vm.mmu.translate(0x2000)[0] & S.PT_WRITABLE_MASK


def test_mmio_spte_created_for_gfn_without_slot() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    assert vm.mmu.page_fault(v, gpa, R) == RET_PF_EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 1
    hit = vm.mmu.translate(gpa)
    assert hit is not None and S.is_mmio_spte(vm.spte_format, hit[0])
    assert vm.mmu.fault_error_code(hit, False, False, False) == PFERR_RSVD_MASK
    # the RSVD exit finds the vCPU's MMIO cache, then the SPTE: EMULATE
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_EMULATE


def test_mmio_spte_stale_after_generation_bump() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    vm.mmu.page_fault(v, gpa, R)
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 21)
    vm.set_user_memory_region(1, 0, gpa, 1 << 21, HVA + (1 << 32))  # generation moves
    old = vm.mmu.translate(gpa)[0]
    assert not S.check_mmio_spte(old, vm.memslots.generation)
    # check_mmio_spte fails -> RET_PF_INVALID -> the normal path maps RAM
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_FIXED
    assert S.is_shadow_present_pte(vm.mmu.translate(gpa)[0])


def test_rsvd_fault_on_non_mmio_spte_retries() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x1000, R)
    assert vm.mmu.page_fault(v, 0x1000, PFERR_RSVD_MASK) == RET_PF_RETRY


def test_gfn_above_max_gfn_emulates_without_mmio_spte() -> None:
    vm = _vm()
    gpa = (vm.mmu.max_gfn + 1) << 12
    assert vm.mmu.page_fault(vm.vcpus[0], gpa, R) == RET_PF_EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 0


def test_mmio_caching_disabled_emulates_immediately() -> None:
    vm = _vm(vendor="svm", host_maxphyaddr=52)
    assert not vm.spte_format.mmio_caching
    assert vm.mmu.page_fault(vm.vcpus[0], 0x1_0000_0000, R) == RET_PF_EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 0


def test_ret_pf_retry_on_invalid_slot() -> None:
    vm = _vm()
    slot = vm.memslots.gfn_to_memslot(0)
    slot.flags |= 1 << 16  # KVM_MEMSLOT_INVALID (as install_invalid leaves it)
    assert vm.mmu.page_fault(vm.vcpus[0], 0x1000, R) == RET_PF_RETRY
    slot.flags &= ~(1 << 16)


def test_efault_when_hva_has_no_vma() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.set_user_memory_region(0, 0, 0, 1 << 20, HVA)
    with pytest.raises(kvmmu.KvmError) as e:
        vm.mmu.page_fault(vm.vcpus[0], 0x1000, R)
    assert e.value.errno == errno.EFAULT and vm.stats["ret_pf.EFAULT"] == 1


def _drive_to(gen: Any, step: str) -> None:
    while next(gen) != step:
        pass


def test_hva_to_pfn_retry_when_invalidation_races() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    gen = vm.mmu.page_fault_steps(v, 0x4000, W)
    _drive_to(gen, "faultin_pfn")
    vm.invalidate_hva_range(HVA + 0x4000, HVA + 0x5000)  # reclaim: new pfn next time
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    assert stop.value.value == RET_PF_RETRY
    assert vm.mmu.translate(0x4000) is None
    assert vm.mmu.check_invariants() == []


def test_race_without_retry_check_installs_stale_pfn() -> None:
    vm = _vm(mmu_notifier_retry_check=False)
    gen = vm.mmu.page_fault_steps(vm.vcpus[0], 0x4000, W)
    _drive_to(gen, "faultin_pfn")
    vm.invalidate_hva_range(HVA + 0x4000, HVA + 0x5000)
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    assert stop.value.value == RET_PF_FIXED
    assert any("stale" in m for m in vm.mmu.check_invariants())


def test_obsolete_root_fault_retries() -> None:
    vm = _vm()
    gen = vm.mmu.page_fault_steps(vm.vcpus[0], 0x4000, W)
    _drive_to(gen, "mmu_lock")
    vm.zap_all_fast()
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == RET_PF_RETRY
    assert vm.mmu.page_fault(vm.vcpus[0], 0x4000, W) == RET_PF_FIXED


def test_hugepage_level_follows_host_thp() -> None:
    vm = _vm(page_level=2)
    vm.mmu.page_fault(vm.vcpus[0], 0x20_3000, W)
    spte, level = vm.mmu.translate(0x20_3000)
    assert level == 2 and S.spte_to_pfn(spte) % 512 == 0


def test_hugepage_1g_on_hugetlbfs() -> None:
    vm = _vm(size=1 << 30, page_level=3)
    vm.mmu.page_fault(vm.vcpus[0], 0x1234_5000, R)
    assert vm.mmu.translate(0x1234_5000)[1] == 3


def test_disallow_count_forces_4k() -> None:
    vm = _vm(page_level=2)
    vm.write_track_add_gfn(0x205)
    vm.mmu.page_fault(vm.vcpus[0], 0x20_0000, W)
    assert vm.mmu.translate(0x20_0000)[1] == 1
    assert vm.mmu.translate(0x20_0000)[0] & S.PT_WRITABLE_MASK  # only 0x205 is tracked


def test_dirty_logging_forces_4k() -> None:
    vm = _vm(page_level=2, flags=kvmmu.KVM_MEM_LOG_DIRTY_PAGES)
    vm.mmu.page_fault(vm.vcpus[0], 0x20_0000, W)
    assert vm.mmu.translate(0x20_0000)[1] == 1
    assert list(vm.get_dirty_log(0)) == [0x200]


def test_nx_huge_pages_exec_fault_maps_4k_and_stays_4k() -> None:
    vm = _vm(page_level=2, nx_huge_pages=True)
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x20_0000, R)
    spte, level = vm.mmu.translate(0x20_0000)
    assert level == 2 and not spte & vm.spte_format.x_mask  # huge SPTEs never executable
    # exec fault: split to 4K, children get X back (make_small_spte)
    r = vm.mmu.page_fault(v, 0x20_0000, PFERR_FETCH_MASK | PFERR_PRESENT_MASK)
    assert r == RET_PF_SPURIOUS
    spte, level = vm.mmu.translate(0x20_0000)
    assert level == 1 and spte & vm.spte_format.x_mask
    # disallowed_hugepage_adjust: later non-exec faults do not rebuild the huge page
    vm.zap_gfn_range(0x201, 0x202)
    vm.mmu.page_fault(v, 0x20_1000, R)
    assert vm.mmu.translate(0x20_1000)[1] == 1
    assert vm.stats["nx_lpage_splits"] >= 1


def test_fast_page_fault_on_dirty_log_write_protected_spte() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x7000, W)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    spte, _ = vm.mmu.translate(0x7000)
    assert not spte & S.PT_WRITABLE_MASK and spte & vm.spte_format.mmu_writable_mask
    assert vm.mmu.page_fault(v, 0x7000, W | PFERR_PRESENT_MASK) == RET_PF_FIXED
    assert vm.stats["pf_fast"] == 1
    assert vm.mmu.translate(0x7000)[0] & S.PT_WRITABLE_MASK
    assert list(vm.get_dirty_log(0)) == [7]


def test_fast_page_fault_restores_access_tracked_spte_without_ad() -> None:
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    v = vm.vcpus[0]
    vm.pre_fault_memory(0x8000, 0x1000)  # prefetch: created access-tracked
    assert vm.mmu.translate(0x8000) is None
    assert vm.mmu.page_fault(v, 0x8000, R) == RET_PF_FIXED
    assert vm.stats["pf_fast"] == 1 and vm.mmu.translate(0x8000) is not None


def test_prefetch_window_is_8_aligned() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.tdp_mmu_enabled = False  # the legacy direct MMU prefetches
    for g in range(0x10, 0x20):
        vm.gfn_to_pfn(g, write=True)  # host pages present (GUP fast-only)
    vm.mmu.page_fault(v, 0x13 << 12, W)
    mapped = [g for g in range(0x0E, 0x1A) if vm.mmu.translate(g << 12) is not None]
    assert mapped == list(range(0x10, 0x18))
    spte, _ = vm.mmu.translate(0x14 << 12)
    assert not spte & vm.spte_format.accessed_mask  # prefetched: not Accessed
    assert vm.stats["pte_prefetch"] == 7


def test_tdp_mmu_does_not_prefetch() -> None:
    vm = _vm()
    for g in range(0x10, 0x18):
        vm.gfn_to_pfn(g, write=True)
    vm.mmu.page_fault(vm.vcpus[0], 0x13 << 12, W)
    assert vm.mmu.translate(0x14 << 12) is None


def test_mmio_spte_stale_after_generation_bump_with_mmu_present_high() -> None:
    """consumers.md T6: the split generation (3-11/52-58/60-62) still detects a bump."""
    vm = _vm(plugins={"vmx": {"mmu_present_high": True}})
    fmt = vm.spte_format
    assert fmt.mmu_present_mask == 1 << 59
    assert fmt.mmio_gen_layout == S.MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    assert vm.mmu.page_fault(v, gpa, R) == RET_PF_EMULATE
    mmio = vm.mmu.translate(gpa)[0]
    assert S.is_mmio_spte(fmt, mmio)
    assert S.check_mmio_spte(mmio, vm.memslots.generation, fmt.mmio_gen_layout)
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 21)
    vm.set_user_memory_region(1, 0, gpa, 1 << 21, HVA + (1 << 32))  # generation moves
    old = vm.mmu.translate(gpa)[0]
    assert not S.check_mmio_spte(old, vm.memslots.generation, fmt.mmio_gen_layout)
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_FIXED
    new = vm.mmu.translate(gpa)[0]
    assert S.is_shadow_present_pte(new, fmt.mmu_present_mask) and not new & (1 << 11)
    vm.mmu.page_fault(v, 0x3000, W)
    assert vm.mmu.translate(0x3000)[0] & (1 << 59)
    assert vm.check_invariants() == []


def test_direct_prefetch_stops_window_when_first_page_of_run_unpinnable() -> None:
    """§3.9: ``direct_pte_prefetch_many`` returns -1 when
    ``gfn_to_page_many_atomic`` pins nothing, which ends the window scan: the
    run after the faulting SPTE is not prefetched either."""
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.tdp_mmu_enabled = False  # the legacy direct MMU prefetches
    for g in range(0x11, 0x18):
        vm.gfn_to_pfn(g, write=True)  # 0x10 stays unpopulated: GUP fast-only pins 0
    vm.mmu.page_fault(v, 0x13 << 12, W)
    mapped = [g for g in range(0x10, 0x18) if vm.mmu.translate(g << 12) is not None]
    assert mapped == [0x13]
    assert vm.stats["pte_prefetch"] == 0


def test_direct_prefetch_partial_run_continues_window() -> None:
    """§3.9: a run pinned only in part maps that prefix and returns 0, so
    the scan goes on to the next run."""
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.tdp_mmu_enabled = False
    for g in (0x10, 0x11, 0x14, 0x15, 0x16, 0x17):
        vm.gfn_to_pfn(g, write=True)  # 0x12 unpopulated: the first run stops there
    vm.mmu.page_fault(v, 0x13 << 12, W)
    mapped = [g for g in range(0x10, 0x18) if vm.mmu.translate(g << 12) is not None]
    assert mapped == [0x10, 0x11, 0x13, 0x14, 0x15, 0x16, 0x17]


def test_mmio_info_in_cache_emulates_rsvd_fault_before_the_walk() -> None:
    """§3.10 ``handle_mmio_page_fault``: a vCPU MMIO-cache hit (direct: by GPA,
    same memslots generation) is EMULATE without looking at the SPTE and
    without ``kvm_mmu_do_page_fault`` (no ``pf_taken``)."""
    vm = _vm()
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    assert vm.mmu.page_fault(v, gpa, R) == RET_PF_EMULATE
    assert vm.mmu.mmio_info_in_cache(v, gpa)
    assert not vm.mmu.mmio_info_in_cache(v, gpa + 0x1000)
    assert not vm.mmu.mmio_info_in_cache(vm.create_vcpu(), gpa)  # per vCPU
    taken = vm.stats["pf_taken"]
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_EMULATE
    assert vm.stats["pf_taken"] == taken
    # MMIO SPTEs are not shadow-present: kvm_zap_gfn_range leaves them (§3.14)
    vm.mmu.zap_gfn_range(gpa >> 12, (gpa >> 12) + 1)
    assert S.is_mmio_spte(vm.spte_format, vm.mmu.translate(gpa)[0])


def test_noslot_fault_caches_mmio_info_even_with_caching_disabled() -> None:
    """§3.5 ``kvm_handle_noslot_fault``: ``vcpu_cache_mmio_info`` runs before
    the ``enable_mmio_caching`` check; the access is masked by
    ``shadow_mmio_access_mask`` (NPT: W|U)."""
    vm = _vm(vendor="svm", host_maxphyaddr=52)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x1_0000_0000, R) == RET_PF_EMULATE
    gfn, access, gen = vm.mmu.mmio_info(v)
    assert gfn == 0x1_0000_0000 >> 12 and access == S.ACC_WRITE_MASK | S.ACC_USER_MASK
    assert gen == vm.memslots.generation
    assert vm.mmu.translate(0x1_0000_0000) is None


def test_mmio_cache_stale_after_memslot_generation_bump() -> None:
    """§3.10: the MMIO cache matches only while the memslots generation is
    unchanged (``vcpu_match_mmio_gen``)."""
    vm = _vm()
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    vm.mmu.page_fault(v, gpa, R)
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 21)
    vm.set_user_memory_region(1, 0, 1 << 40, 1 << 21, HVA + (1 << 32))
    assert not vm.mmu.mmio_info_in_cache(v, gpa)
    # stale MMIO SPTE: check_mmio_spte fails -> INVALID -> the normal fault
    # path rebuilds the MMIO SPTE with the new generation (EMULATE).
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_EMULATE
    spte = vm.mmu.translate(gpa)[0]
    assert S.check_mmio_spte(spte, vm.memslots.generation)


def test_fast_page_fault_eligibility() -> None:
    """§3.11 ``page_fault_can_be_fast``: never for RSVD; not-present only
    without A/D; present only for writes."""
    vm = _vm()
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x5000, R | PFERR_FETCH_MASK)
    # A/D enabled: a not-present read goes slow even though a leaf exists
    assert vm.mmu.page_fault(v, 0x5000, R) == RET_PF_SPURIOUS
    # present read (not a write): slow path, SPURIOUS from the target level
    assert vm.mmu.page_fault(v, 0x5000, R | PFERR_PRESENT_MASK) == RET_PF_SPURIOUS
    assert vm.stats["pf_fast"] == 0
    # present write on a writable leaf: the fast path says SPURIOUS
    assert vm.mmu.page_fault(v, 0x5000, W | PFERR_PRESENT_MASK) == RET_PF_SPURIOUS
    assert vm.stats["pf_fast"] == 1


def test_fast_page_fault_cannot_make_write_tracked_gfn_writable() -> None:
    """§3.11: a write-tracked gfn's SPTE lacks MMU-writable, so only the slow
    path sees it; a not-present-style write fault (A/D off, fast path
    eligible) is not fixed locklessly and ends in EMULATE."""
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    v = vm.vcpus[0]
    vm.write_track_add_gfn(9)
    assert vm.mmu.page_fault(v, 9 << 12, R) == RET_PF_FIXED
    assert vm.mmu.page_fault(v, 9 << 12, W) == RET_PF_EMULATE
    spte = vm.mmu.translate(9 << 12)[0]
    assert not spte & S.PT_WRITABLE_MASK and not spte & vm.spte_format.mmu_writable_mask
    assert vm.stats["pf_fast"] == 0


def test_max_huge_page_level_clamps_mapping_level() -> None:
    """§3.6: ``__kvm_mmu_max_mapping_level`` clamps to ``max_huge_page_level``
    before asking the host: a 1G host page maps 2M when the MMU stops at 2M."""
    vm = _vm(size=1 << 30, page_level=3)
    vm.mmu.max_huge_page_level = S.PG_LEVEL_2M
    vm.mmu.page_fault(vm.vcpus[0], 0x1234_5000, W)
    assert vm.mmu.translate(0x1234_5000)[1] == S.PG_LEVEL_2M


def test_ept_violation_error_code_bits() -> None:
    """§3.1: EPT violation -> error code: read = USER, write = WRITE, fetch =
    FETCH, PRESENT iff the leaf had any of RWX; GUEST_FINAL is stripped by
    ``lower_32_bits`` before ``kvm_mmu_do_page_fault``. An access-tracked
    leaf (RWX = 0) is not PRESENT."""
    from kvmmu.mmu.fault import PFERR_GUEST_FINAL_MASK as FINAL

    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    mmu = vm.mmu
    assert mmu.fault_error_code(None, False, False, False) == FINAL | PFERR_USER_MASK
    assert mmu.fault_error_code(None, True, False, False) == FINAL | PFERR_WRITE_MASK
    assert mmu.fault_error_code(None, False, True, False) == FINAL | PFERR_FETCH_MASK
    vm.write_track_add_gfn(3)
    mmu.page_fault(vm.vcpus[0], 0x3000, R)
    hit = mmu.translate(0x3000)
    assert hit is not None and not hit[0] & S.PT_WRITABLE_MASK
    assert mmu.fault_error_code(hit, True, False, True) == FINAL | PFERR_WRITE_MASK | (
        PFERR_PRESENT_MASK
    )
    vm.pre_fault_memory(0x8000, 0x1000)  # access-tracked: hardware-not-present
    assert mmu.translate(0x8000) is None


def test_npf_error_code_bits() -> None:
    """§3.1: #NPF carries the x86 #PF bits: P for a present leaf, W, U at
    CPL 3, FETCH; an MMIO SPTE (reserved bit 51) gives P|RSVD."""
    from kvmmu.mmu.fault import PFERR_GUEST_FINAL_MASK as FINAL

    vm = _vm(vendor="svm")
    mmu = vm.mmu
    v = vm.vcpus[0]
    assert mmu.fault_error_code(None, True, False, True) == FINAL | W
    assert mmu.fault_error_code(None, False, True, False) == FINAL | PFERR_FETCH_MASK
    vm.write_track_add_gfn(3)
    mmu.page_fault(v, 0x3000, R)
    hit = mmu.translate(0x3000)
    assert mmu.fault_error_code(hit, True, False, False) == (
        FINAL | PFERR_PRESENT_MASK | PFERR_WRITE_MASK
    )
    assert mmu.page_fault(v, 0x1_0000_0000, R) == RET_PF_EMULATE
    hit = mmu.translate(0x1_0000_0000)
    code = mmu.fault_error_code(hit, False, False, False)
    assert code == FINAL | PFERR_PRESENT_MASK | PFERR_RSVD_MASK


def test_rsvd_fault_on_present_spte_with_reserved_bits_is_einval() -> None:
    """§3.10 ``handle_mmio_page_fault``: a reserved-bit hit on a present,
    non-MMIO SPTE is a KVM bug (``get_mmio_spte`` WARNs): -EINVAL. Only
    shadow-present SPTEs are checked (MMIO SPTEs have reserved bits by
    design); with the MMU-present bit at 59, bit 11 is reserved (T6)."""
    vm = _vm(plugins={"vmx": {"mmu_present_high": True}})
    v = vm.vcpus[0]
    mmu = vm.mmu
    assert mmu.page_fault(v, 0x4000, W) == RET_PF_FIXED
    table, i, level, spte = mmu._last_spte(mmu.vcpu_root(v), 4)
    assert level == 1 and vm.spte_format.rsvd_mask & (1 << 11)
    assert mmu.page_fault(v, 0x4000, PFERR_RSVD_MASK) == RET_PF_RETRY  # clean SPTE
    mmu.pool.data[table, i] = spte | (1 << 11)
    with pytest.raises(kvmmu.KvmError) as e:
        mmu.page_fault(v, 0x4000, PFERR_RSVD_MASK)
    assert e.value.errno == errno.EINVAL


def _prefetch_vm(**cfg: Any) -> Any:
    vm = _vm(**cfg)
    vm.mmu.tdp_mmu_enabled = False  # the legacy direct MMU prefetches
    for g in range(0x10, 0x18):
        vm.gfn_to_pfn(g, write=True)
    return vm


def test_direct_prefetch_skipped_while_invalidation_in_progress() -> None:
    """§3.9: ``direct_pte_prefetch`` does nothing while
    ``mmu_invalidate_in_progress`` (even for a range elsewhere)."""
    vm = _prefetch_vm()
    inv = vm.mmu.invalidate
    inv.begin()
    inv.range_add(0x1000, 0x1001)
    assert vm.mmu.page_fault(vm.vcpus[0], 0x13 << 12, W) == RET_PF_FIXED
    inv.end()
    assert vm.stats["pte_prefetch"] == 0


def test_direct_prefetch_skipped_without_ad_bits() -> None:
    """§3.9: A/D disabled: no way to tell prefetched from accessed, no prefetch."""
    vm = _prefetch_vm(plugins={"vmx": {"ept_ad": False}})
    vm.mmu.page_fault(vm.vcpus[0], 0x13 << 12, W)
    assert vm.stats["pte_prefetch"] == 0


def test_direct_prefetch_skips_dirty_logged_slot() -> None:
    """§3.9: ``gfn_to_memslot_dirty_bitmap(no_dirty_log = ACC_ALL & W)``
    returns no slot when the slot logs dirty pages."""
    vm = _prefetch_vm(flags=kvmmu.KVM_MEM_LOG_DIRTY_PAGES)
    vm.mmu.page_fault(vm.vcpus[0], 0x13 << 12, W)
    assert vm.stats["pte_prefetch"] == 0
    assert list(vm.get_dirty_log(0)) == [0x13]


def test_direct_prefetch_of_tracked_gfn_is_read_only() -> None:
    """§3.9/§2.3: a prefetched SPTE for a write-tracked gfn is read-only and
    not MMU-writable; its neighbours are writable but not Accessed."""
    vm = _prefetch_vm()
    vm.write_track_add_gfn(0x15)
    vm.mmu.page_fault(vm.vcpus[0], 0x13 << 12, W)
    fmt = vm.spte_format
    tracked = vm.mmu.translate(0x15 << 12)[0]
    assert not tracked & (S.PT_WRITABLE_MASK | fmt.mmu_writable_mask)
    other = vm.mmu.translate(0x16 << 12)[0]
    assert other & S.PT_WRITABLE_MASK and not other & fmt.accessed_mask


def test_smm_mmio_spte_uses_the_vcpu_address_space_generation() -> None:
    """§3.10: ``make_mmio_spte`` and ``check_mmio_spte`` use
    ``kvm_vcpu_memslots(vcpu)->generation``, the generation of the address
    space the fault runs in (SMM: as_id 1), so a memslot update in as_id 0
    does not make an SMM MMIO SPTE stale."""
    vm = _vm()
    v = vm.vcpus[0]
    gpa = 0x1_0000_0000
    ms = vm.memslots
    assert ms.generation_of(1) != ms.generation_of(0)
    assert vm.mmu.page_fault(v, gpa, R, as_id=1) == RET_PF_EMULATE
    spte = vm.mmu.translate(gpa, as_id=1)[0]
    assert S.get_mmio_spte_generation(spte) == ms.generation_of(1) & S.MMIO_SPTE_GEN_MASK
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 21)
    vm.set_user_memory_region(1, 0, 1 << 40, 1 << 21, HVA + (1 << 32))  # as_id 0 only
    taken = vm.stats["pf_taken"]
    # the MMIO cache (as_id 0 generation) misses; the SPTE's generation matches
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK, as_id=1) == RET_PF_EMULATE
    assert vm.stats["pf_taken"] == taken
    assert vm.mmu.translate(gpa, as_id=1)[0] == spte


def test_tdp_and_shadow_mmu_accessors_name_what_is_needed() -> None:
    """vm.tdp_mmu() / vm.shadow_mmu(): the MMU when the VM has it, else
    EOPNOTSUPP saying which config it needs."""
    tdp = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    shadow = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", tdp=False))
    assert tdp.tdp_mmu() is tdp.mmu and shadow.shadow_mmu() is shadow.mmu
    with pytest.raises(kvmmu.KvmError) as ei:
        shadow.tdp_mmu()
    assert ei.value.errno == errno.EOPNOTSUPP and "tdp = true" in str(ei.value)
    with pytest.raises(kvmmu.KvmError) as ei:
        tdp.shadow_mmu()
    assert ei.value.errno == errno.EOPNOTSUPP and "tdp = false" in str(ei.value)
