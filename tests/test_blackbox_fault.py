"""Black-box tests of the TDP fault path, SPTE encoding and zapping, from the spec.

Written from spec/kvm-mmu.md §3-§4 and kvm-mmu-2.md §5.2/§5.3, checked against
the kernel (arch/x86/kvm/mmu/spte.c make_spte / make_nonleaf_spte /
make_small_spte / make_huge_spte / make_mmio_spte, mmu.c fast_page_fault /
handle_mmio_page_fault / disallowed_hugepage_adjust / kvm_zap_gfn_range,
tdp_mmu.c kvm_tdp_mmu_map / tdp_mmu_zap_leafs). Only the public API is used:
``kvmmu.VM``, ``vm.mmu.page_fault(_steps)``, ``vm.mmu.pool`` and the
``kvmmu.spte`` helpers.
"""

from __future__ import annotations

from typing import Any

import kvmmu
import pytest
from conftest import FlushRecorder
from hypothesis import given, settings
from hypothesis import strategies as st
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
X = PFERR_FETCH_MASK | PFERR_USER_MASK
P = PFERR_PRESENT_MASK

# EPT bits (spec §4.1, §4.3, §4.4)
EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_WB_IPAT = (6 << 3) | (1 << 6)  # vmx_get_mt_mask for RAM without noncoherent DMA
EPT_A, EPT_D = 1 << 8, 1 << 9
EPT_SVE = 1 << 63
EPT_HOST_W, EPT_MMU_W = 1 << 57, 1 << 58
# x86 / NPT bits (spec §4.2, §4.3)
X86_P, X86_W, X86_U, X86_A, X86_D = 1, 2, 4, 1 << 5, 1 << 6
X86_HOST_W, X86_MMU_W = 1 << 9, 1 << 10
X86_NX = 1 << 63
PS = 1 << 7
MMU_PRESENT = 1 << 11
AD_DISABLED = 1 << 52


def _vm(
    vendor: str = "vmx",
    size: int = 8 << 20,
    page_level: int = 1,
    flags: int = 0,
    writable: bool = True,
    **cfg: Any,
) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, **cfg))
    vm.host.mmap_anon(HVA, size, page_level=page_level, writable=writable)
    vm.set_user_memory_region(0, flags, 0, size, HVA)
    return vm


def _recorder(vm: Any) -> FlushRecorder:
    rec = FlushRecorder()
    vm.register_plugin(rec, "bb_recorder")
    return rec


def _walk(vm: Any, gpa: int) -> list[tuple[int, int]]:
    """Every SPTE on the walk for ``gpa`` as ``(spte, level)``, root first,
    down to the first leaf or non-present entry (regardless of what the
    hardware would see: access-tracked SPTEs included)."""
    fmt = vm.spte_format
    hpa = vm.mmu.root_hpa()
    level = fmt.root_level
    gfn = gpa >> 12
    out = []
    while True:
        spte = int(vm.mmu.pool.table(hpa)[(gfn >> (9 * (level - 1))) & 511])
        out.append((spte, level))
        if level == 1 or spte & PS or not spte & fmt.mmu_present_mask:
            return out
        hpa = spte & S.SPTE_BASE_ADDR_MASK
        level -= 1


def _leaf(vm: Any, gpa: int) -> tuple[int, int]:
    return _walk(vm, gpa)[-1]


def _ept_leaf(pfn: int, *, write: bool = True, exec_: bool = True, level: int = 1) -> int:
    """make_spte for a TDP fault on EPT with A/D (spec §3.12, §4.3, §4.6)."""
    spte = MMU_PRESENT | EPT_SVE | EPT_R | EPT_A | EPT_WB_IPAT | EPT_HOST_W | (pfn << 12)
    if exec_:
        spte |= EPT_X
    if write:
        spte |= EPT_W | EPT_MMU_W | EPT_D
    if level > 1:
        spte |= PS
    return spte


def _npt_leaf(pfn: int, *, write: bool = True, exec_: bool = True, level: int = 1) -> int:
    """make_spte for a TDP fault on NPT (spec §3.12, §4.2, §4.3)."""
    spte = MMU_PRESENT | X86_P | X86_U | X86_A | X86_HOST_W | (pfn << 12)
    if not exec_:
        spte |= X86_NX
    if write:
        spte |= X86_W | X86_MMU_W | X86_D
    if level > 1:
        spte |= PS
    return spte


# ---------------------------------------------------------------------------
# §4 SPTE encoding of faulted leaves and non-leaves, per vendor and level
# ---------------------------------------------------------------------------


def test_ept_4k_write_fault_leaf_exact_bits() -> None:
    vm = _vm()
    assert vm.mmu.page_fault(vm.vcpus[0], 0x3000, W) == RET_PF_FIXED
    pfn = vm.gfn_to_pfn(3)
    assert _leaf(vm, 0x3000) == (_ept_leaf(pfn), 1)


def test_npt_4k_write_fault_leaf_exact_bits() -> None:
    vm = _vm("svm")
    assert vm.mmu.page_fault(vm.vcpus[0], 0x3000, W) == RET_PF_FIXED
    pfn = vm.gfn_to_pfn(3)
    # no memtype bits (PAT index 0), no NX at 4K, U from ACC_USER
    assert _leaf(vm, 0x3000) == (_npt_leaf(pfn), 1)


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
@pytest.mark.parametrize("level", [2, 3])
@pytest.mark.parametrize("nx", [False, True])
def test_huge_leaf_exact_bits(vendor: str, level: int, nx: bool) -> None:
    """PS for level > 4K; NX huge pages drop exec on every huge SPTE (kvm-mmu-2 §5.2)."""
    size = 2 << 30 if level == 3 else 8 << 20
    vm = _vm(vendor, size=size, page_level=level, nx_huge_pages=nx)
    gfn = (1 << (9 * (level - 1))) + 0x23  # inside the second huge frame
    assert vm.mmu.page_fault(vm.vcpus[0], gfn << 12, W) == RET_PF_FIXED
    base = gfn & ~((1 << (9 * (level - 1))) - 1)
    pfn = vm.gfn_to_pfn(base)
    assert pfn % (1 << (9 * (level - 1))) == 0
    make = _ept_leaf if vendor == "vmx" else _npt_leaf
    assert _leaf(vm, gfn << 12) == (make(pfn, exec_=not nx, level=level), level)


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_read_only_host_mapping_leaf_and_write_efault(vendor: str) -> None:
    """host_writable=false: no W, no MMU-writable, no host-writable, no D (§3.12 step 5)."""
    vm = _vm(vendor, writable=False)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x3000, R) == RET_PF_FIXED
    pfn = vm.gfn_to_pfn(3)
    make = _ept_leaf if vendor == "vmx" else _npt_leaf
    expect = make(pfn, write=False) & ~(EPT_HOST_W | X86_HOST_W)
    assert _leaf(vm, 0x3000) == (expect, 1)
    # the fast path cannot set W (not MMU-writable); GUP for write fails -> -EFAULT
    with pytest.raises(kvmmu.KvmError) as ei:
        vm.mmu.page_fault(v, 0x3000, W | P)
    assert ei.value.errno == 14
    assert _leaf(vm, 0x3000) == (expect, 1)


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_nonleaf_sptes_exact_bits(vendor: str) -> None:
    """make_nonleaf_spte: MMU_PRESENT | child | present | W | U | X | Accessed (§4.6)."""
    vm = _vm(vendor)
    vm.mmu.page_fault(vm.vcpus[0], 0x3000, W)
    walk = _walk(vm, 0x3000)
    assert [lvl for _, lvl in walk] == [4, 3, 2, 1]
    for spte, _ in walk[:-1]:
        child = spte & S.SPTE_BASE_ADDR_MASK
        assert vm.mmu.pool.is_table_hpa(child)
        if vendor == "vmx":
            assert spte == MMU_PRESENT | EPT_SVE | EPT_R | EPT_W | EPT_X | EPT_A | child
        else:
            assert spte == MMU_PRESENT | X86_P | X86_W | X86_U | X86_A | child


def test_ept_without_ad_marks_leaf_and_nonleaf_ad_disabled() -> None:
    """SPTE_TDP_AD_DISABLED (bit 52) on every SPTE; non-leaf gets it instead of A (§4.4, §4.6)."""
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    vm.mmu.page_fault(vm.vcpus[0], 0x3000, W)
    walk = _walk(vm, 0x3000)
    for spte, _ in walk[:-1]:
        child = spte & S.SPTE_BASE_ADDR_MASK
        assert spte == MMU_PRESENT | EPT_SVE | EPT_R | EPT_W | EPT_X | AD_DISABLED | child
    leaf, _ = walk[-1]
    assert leaf & AD_DISABLED and not S.spte_ad_enabled(leaf)
    assert leaf & 0x7 == 0x7 and leaf & (EPT_HOST_W | EPT_MMU_W) == EPT_HOST_W | EPT_MMU_W


# ---------------------------------------------------------------------------
# §4.5 / §3.11 access tracking, prefetch and the fast path
# ---------------------------------------------------------------------------


def test_prefault_without_ad_is_access_tracked_then_fast_write_fixes_in_one_step() -> None:
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    v = vm.vcpus[0]
    assert vm.pre_fault_memory(0x5000, 0x1000) == 0x1000
    pfn = vm.gfn_to_pfn(5)
    spte, level = _leaf(vm, 0x5000)
    # prefetch: no A; R and X saved at 54/56, RWX cleared, W not saved but MMU-writable kept
    saved = (EPT_R | EPT_X) << 54
    assert level == 1
    assert spte & 0x7 == 0 and spte & saved == saved and not spte & EPT_A
    assert spte & EPT_MMU_W and spte & EPT_HOST_W and spte & MMU_PRESENT
    assert S.is_access_track_spte(vm.spte_format, spte)
    assert vm.mmu.translate(0x5000) is None  # hardware-non-present
    assert spte_to_pfn_ok(spte, pfn)
    # not-present write, no A/D: fast path restores R|X, sets A and W (MMU-writable)
    before = dict(vm.stats)
    assert vm.mmu.page_fault(v, 0x5000, W) == RET_PF_FIXED
    new, _ = _leaf(vm, 0x5000)
    assert new == (spte & ~saved) | EPT_R | EPT_X | EPT_W | EPT_A
    assert vm.stats["pf_fast"] == before.get("pf_fast", 0) + 1
    assert vm.stats["pf_fixed"] == before["pf_fixed"] + 1


def spte_to_pfn_ok(spte: int, pfn: int) -> bool:
    return S.spte_to_pfn(spte) == pfn


def test_access_tracked_read_restores_rx_only_then_write_sets_w_then_exec_spurious() -> None:
    vm = _vm(plugins={"vmx": {"ept_ad": False}})
    v = vm.vcpus[0]
    vm.pre_fault_memory(0x6000, 0x1000)
    tracked, _ = _leaf(vm, 0x6000)
    assert vm.mmu.page_fault(v, 0x6000, R) == RET_PF_FIXED
    after_read, _ = _leaf(vm, 0x6000)
    assert after_read & 0x7 == EPT_R | EPT_X and after_read & EPT_A
    assert not after_read & (EPT_R | EPT_X) << 54
    assert after_read & EPT_MMU_W and not after_read & EPT_W
    assert vm.mmu.page_fault(v, 0x6000, W | P) == RET_PF_FIXED
    assert _leaf(vm, 0x6000)[0] == after_read | EPT_W
    assert vm.mmu.page_fault(v, 0x6000, X | P) == RET_PF_SPURIOUS
    assert tracked != after_read


def test_prefault_counts_fixed_but_not_taken_and_is_not_accessed() -> None:
    """kvm_mmu_do_page_fault: pf_taken only for non-prefetch (§3.3); pre-fault
    SPTEs are not Accessed (kvm-mmu-2 §6)."""
    vm = _vm()
    assert vm.pre_fault_memory(0, 0x3000) == 0x3000
    assert vm.stats["pf_taken"] == 0 and vm.stats["pf_fixed"] == 3
    for g in range(3):
        spte, level = _leaf(vm, g << 12)
        assert level == 1 and not spte & EPT_A and spte & EPT_W


def test_spurious_write_on_writable_spte_and_read_on_readable() -> None:
    vm = _vm("svm")
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x7000, W) == RET_PF_FIXED
    spte = _leaf(vm, 0x7000)[0]
    assert vm.mmu.page_fault(v, 0x7000, W | P) == RET_PF_SPURIOUS  # fast path
    assert vm.mmu.page_fault(v, 0x7000, R | P) == RET_PF_SPURIOUS  # slow path, same SPTE
    assert _leaf(vm, 0x7000)[0] == spte
    assert vm.stats["pf_spurious"] == 2 and vm.stats["pf_taken"] == 3


# ---------------------------------------------------------------------------
# kvm-mmu-2 §5.2 NX huge pages and split contents
# ---------------------------------------------------------------------------


def test_nx_exec_fault_on_1g_backing_tracks_two_sps_and_neighbours_map_2m() -> None:
    """track_possible_nx_huge_page when req_level >= iter.level: both the 1G-
    and 2M-level sps; disallowed_hugepage_adjust lowers only by one level."""
    vm = _vm(size=2 << 30, page_level=3, nx_huge_pages=True)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x123_4000, X) == RET_PF_FIXED
    spte, level = _leaf(vm, 0x123_4000)
    assert level == 1 and spte & EPT_X
    assert vm.stats["nx_lpage_splits"] == 2
    # another 2M frame of the same 1G: the 1G child is nx-disallowed -> 2M
    assert vm.mmu.page_fault(v, 0x300_0000, W) == RET_PF_FIXED
    spte, level = _leaf(vm, 0x300_0000)
    assert level == 2 and not spte & EPT_X
    # the same 2M frame: its 4K child is nx-disallowed -> 4K
    assert vm.mmu.page_fault(v, 0x123_5000, W) == RET_PF_FIXED
    assert _leaf(vm, 0x123_5000)[1] == 1


def test_nx_exec_fault_on_2m_backing_tracks_one_sp() -> None:
    vm = _vm(page_level=2, nx_huge_pages=True)
    assert vm.mmu.page_fault(vm.vcpus[0], 0x234000, X) == RET_PF_FIXED
    assert _leaf(vm, 0x234000)[1] == 1
    assert vm.stats["nx_lpage_splits"] == 1


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_exec_fault_on_nx_huge_spte_splits_and_is_spurious(vendor: str) -> None:
    """kvm_tdp_mmu_map splits the huge leaf (make_small_spte gives 4K children X
    back); the target SPTE then equals make_spte's result -> RET_PF_SPURIOUS."""
    vm = _vm(vendor, page_level=2, nx_huge_pages=True)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x203000, W) == RET_PF_FIXED
    huge, level = _leaf(vm, 0x203000)
    assert level == 2 and not S.is_executable_pte(vm.spte_format, huge)
    assert vm.mmu.page_fault(v, 0x203000, X | P) == RET_PF_SPURIOUS
    assert vm.stats["pf_spurious"] == 1 and vm.stats["nx_lpage_splits"] == 1
    fmt = vm.spte_format
    for i in (0, 3, 511):
        spte, lvl = _leaf(vm, (0x200 + i) << 12)
        expect = (huge & ~PS) + (i << 12)
        expect = (expect & ~fmt.nx_mask) | fmt.x_mask
        assert lvl == 1 and spte == expect


def test_eager_split_children_exact_contents_with_nx() -> None:
    """Dirty-log enable: eager split to 4K (make_small_spte: frame + index, PS
    cleared, X back under NX) then write-protect: only W goes (kvm-mmu-2 §5.3, §7.1)."""
    vm = _vm(page_level=2, nx_huge_pages=True)
    vm.mmu.page_fault(vm.vcpus[0], 0x400000, W)
    huge, level = _leaf(vm, 0x400000)
    assert level == 2
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    for i in range(0, 512, 37):
        spte, lvl = _leaf(vm, (0x400 + i) << 12)
        assert lvl == 1
        assert spte == ((huge & ~PS & ~EPT_W) | EPT_X) + (i << 12)


def test_dirty_log_write_to_wrprot_huge_splits_and_keeps_siblings_read_only() -> None:
    vm = _vm(page_level=2, eager_page_split=False)
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x200000, W)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    huge, _ = _leaf(vm, 0x200000)
    assert not huge & EPT_W and huge & EPT_MMU_W
    assert vm.mmu.page_fault(v, 0x234000, W | P) == RET_PF_FIXED
    spte, lvl = _leaf(vm, 0x234000)
    assert lvl == 1 and spte & EPT_W
    sib, lvl = _leaf(vm, 0x235000)
    assert lvl == 1 and sib == (huge & ~PS) + (0x35 << 12)
    assert list(vm.get_dirty_log(0)) == [0x234]


# ---------------------------------------------------------------------------
# §3.6 huge-page level selection from the slot layout
# ---------------------------------------------------------------------------


def test_incongruent_gpa_hva_forces_4k() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.host.mmap_anon(HVA, 8 << 20, page_level=2)
    vm.set_user_memory_region(0, 0, 0x1000, 4 << 20, HVA)  # gfn ^ ugfn misaligned
    vm.mmu.page_fault(vm.vcpus[0], 0x40_0000, W)
    assert _leaf(vm, 0x40_0000)[1] == 1


def test_partial_tail_frame_is_4k_full_frame_is_2m() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.host.mmap_anon(HVA, 8 << 20, page_level=2)
    vm.set_user_memory_region(0, 0, 0, 3 << 20, HVA)
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x10_0000, W)
    vm.mmu.page_fault(v, 0x21_0000, W)
    assert _leaf(vm, 0x10_0000)[1] == 2
    assert _leaf(vm, 0x21_0000)[1] == 1


# ---------------------------------------------------------------------------
# §3.5 invalidation / retry protocol, §3.14 obsolete roots
# ---------------------------------------------------------------------------


def test_fault_during_invalidation_retries_only_inside_the_range() -> None:
    vm = _vm()
    v = vm.vcpus[0]
    inv = vm.mmu.invalidate
    inv.begin()
    inv.range_add(5, 6)
    assert vm.mmu.page_fault(v, 5 << 12, W) == RET_PF_RETRY
    assert _leaf(vm, 5 << 12)[0] == 0 or vm.mmu.translate(5 << 12) is None
    assert vm.mmu.page_fault(v, 7 << 12, W) == RET_PF_FIXED
    inv.end()
    assert vm.mmu.page_fault(v, 5 << 12, W) == RET_PF_FIXED
    assert vm.stats["pf_fixed"] == 2 and vm.stats["pf_taken"] == 3


def test_fault_while_invalidation_range_unset_retries() -> None:
    """mmu_invalidate_retry_gfn: in progress with no range yet -> WARN and retry."""
    vm = _vm()
    inv = vm.mmu.invalidate
    inv.begin()
    assert vm.mmu.page_fault(vm.vcpus[0], 0x9000, W) == RET_PF_RETRY
    assert vm.mmu.translate(0x9000) is None
    inv.end()


@pytest.mark.parametrize("at", ["mmu_seq", "faultin_pfn", "mmu_lock"])
def test_fault_racing_a_completed_mmu_notifier_invalidation_retries(at: str) -> None:
    """The sequence moved between the snapshot and mmu_lock: RETRY, no SPTE."""
    vm = _vm()
    gen = vm.mmu.page_fault_steps(vm.vcpus[0], 0x5000, W)
    while next(gen) != at:
        pass
    vm.invalidate_hva_range(HVA + 0x5000, HVA + 0x6000)
    with pytest.raises(StopIteration) as si:
        next(gen)
        next(gen)
        next(gen)
    assert si.value.value == RET_PF_RETRY
    assert vm.mmu.translate(0x5000) is None


def test_fault_racing_invalidation_of_another_gfn_is_not_retried_in_progress() -> None:
    """Only the in-progress range blocks; but a completed invalidation bumps the
    sequence, which retries any fault that snapshotted the old one."""
    vm = _vm()
    v = vm.vcpus[0]
    gen = vm.mmu.page_fault_steps(v, 0x5000, W)
    assert next(gen) == "mmu_seq"
    vm.host.invalidate_range_start(HVA + 0x9000, HVA + 0xA000)
    rest = list_rest(gen)
    assert rest == RET_PF_FIXED  # in progress, gfn outside [9, 10), seq unchanged
    vm.host.invalidate_range_end(HVA + 0x9000, HVA + 0xA000)


def list_rest(gen: Any) -> int:
    try:
        while True:
            next(gen)
    except StopIteration as e:
        return int(e.value)


def test_fault_started_before_zap_all_fast_retries_on_obsolete_root() -> None:
    vm = _vm()
    gen = vm.mmu.page_fault_steps(vm.vcpus[0], 0x5000, W)
    assert next(gen) == "mmu_seq"
    vm.zap_all_fast()
    assert list_rest(gen) == RET_PF_RETRY
    assert vm.mmu.translate(0x5000) is None
    assert vm.mmu.page_fault(vm.vcpus[0], 0x5000, W) == RET_PF_FIXED


# ---------------------------------------------------------------------------
# §3.10 MMIO SPTEs and the generation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_mmio_spte_exact_bits(vendor: str) -> None:
    vm = _vm(vendor)
    gpa = 0x1_2345_6000
    assert vm.mmu.page_fault(vm.vcpus[0], gpa, W) == RET_PF_EMULATE
    gen = vm.memslots.generation & S.MMIO_SPTE_GEN_MASK
    gen_bits = ((gen & 0xFF) << 3) | ((gen >> 8) << 52)
    spte, level = _leaf(vm, gpa)
    # EPT: W|X without R, access mask 0; NPT: BIT(51)|P, access W|U
    marker = 0b110 if vendor == "vmx" else (1 << 51) | 1 | 0b110
    expect = gen_bits | marker | gpa
    assert (spte, level) == (expect, 1)
    assert not spte & MMU_PRESENT
    assert vm.stats["pf_mmio_spte_created"] == 1 and vm.stats["pf_emulate"] == 1


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_stale_mmio_spte_for_still_unbacked_gfn_is_rebuilt_with_new_generation(
    vendor: str,
) -> None:
    vm = _vm(vendor)
    v = vm.vcpus[0]
    gpa = 1 << 32
    vm.mmu.page_fault(v, gpa, R)
    old = _leaf(vm, gpa)[0]
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 21)
    vm.set_user_memory_region(1, 0, 2 << 32, 1 << 21, HVA + (1 << 32))  # elsewhere
    gen = vm.memslots.generation
    assert not S.check_mmio_spte(old, gen)
    # check_mmio_spte false -> RET_PF_INVALID -> slow path: a fresh MMIO SPTE
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_EMULATE
    new = _leaf(vm, gpa)[0]
    assert new == S.make_mmio_spte(vm.spte_format, gpa >> 12, S.ACC_ALL, gen)
    assert S.get_mmio_spte_generation(new) == gen & S.MMIO_SPTE_GEN_MASK
    assert vm.stats["pf_mmio_spte_created"] == 2
    # the rebuilt SPTE matches: the next RSVD fault emulates straight away
    assert vm.mmu.page_fault(v, gpa, PFERR_RSVD_MASK) == RET_PF_EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 2


def test_rsvd_fault_after_zap_all_fast_retries_without_mmio_cache() -> None:
    """handle_mmio_page_fault: leaf no longer MMIO -> RETRY (vCPU 1 has no
    cached MMIO info); vCPU 0's GPA cache still matches the generation -> EMULATE."""
    vm = _vm(vcpus=2)
    v0, v1 = vm.vcpus
    vm.mmu.page_fault(v0, 1 << 32, R)
    vm.zap_all_fast()
    assert vm.mmu.page_fault(v1, 1 << 32, PFERR_RSVD_MASK) == RET_PF_RETRY
    assert vm.mmu.page_fault(v0, 1 << 32, PFERR_RSVD_MASK) == RET_PF_EMULATE


def test_zap_gfn_range_leaves_mmio_sptes() -> None:
    """tdp_mmu_zap_leafs skips SPTEs that are not shadow-present: MMIO SPTEs
    are invalidated by the generation, not zapped."""
    vm = _vm()
    rec = _recorder(vm)
    vm.mmu.page_fault(vm.vcpus[0], 1 << 32, R)
    mmio = _leaf(vm, 1 << 32)[0]
    vm.zap_gfn_range((1 << 20) - 1, (1 << 20) + 2)
    assert _leaf(vm, 1 << 32)[0] == mmio
    assert rec.ranges == []


@settings(max_examples=60, deadline=None)
@given(
    gen=st.integers(0, (1 << 62) - 1),
    gfn=st.integers(0, (1 << 34) - 1),
    vendor=st.sampled_from(["vmx", "svm"]),
)
def test_mmio_generation_encoding_positions_and_wrap_alias(gen: int, gfn: int, vendor: str) -> None:
    fmt = _FORMATS[vendor]
    spte = S.make_mmio_spte(fmt, gfn, S.ACC_ALL, gen)
    g19 = gen & ((1 << 19) - 1)
    assert (spte >> 3) & 0xFF == g19 & 0xFF
    assert (spte >> 52) & 0x7FF == g19 >> 8
    assert S.get_mmio_spte_generation(spte) == g19
    assert S.get_mmio_spte_gfn(spte) == gfn
    assert S.is_mmio_spte(fmt, spte) and not S.is_shadow_present_pte(spte)
    # only 19 bits are kept: a generation 2^19 later aliases (hence the wrap zap)
    assert S.check_mmio_spte(spte, gen + (1 << 19))
    assert not S.check_mmio_spte(spte, gen + 2)
    # IN_PROGRESS is never encoded and never matches
    assert not spte & S.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    assert not S.check_mmio_spte(spte, gen | S.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)


_FORMATS = {
    "vmx": _vm().spte_format,
    "svm": _vm("svm").spte_format,
}


# ---------------------------------------------------------------------------
# §4.6 make_small_spte / make_huge_spte as functions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_make_small_spte_without_exec_permission_stays_nonexecutable(vendor: str) -> None:
    fmt = _FORMATS[vendor]
    huge, _ = S.make_spte(
        fmt,
        level=2,
        pfn=0x4000,
        old_spte=0,
        pte_access=S.ACC_ALL,
        prefetch=False,
        synchronizing=False,
        host_writable=True,
        mt_mask=None,
        nx_huge_pages=True,
        ad_disabled=False,
        try_unsync=lambda: 0,
    )
    assert not S.is_executable_pte(fmt, huge)
    kid = S.make_small_spte(fmt, huge, 1, 7, exec_allowed=False, nx_huge_pages=True)
    assert kid == (huge & ~PS) | (7 << 12)
    assert not S.is_executable_pte(fmt, kid)
    kid_x = S.make_small_spte(fmt, huge, 1, 7, exec_allowed=True, nx_huge_pages=True)
    assert S.is_executable_pte(fmt, kid_x)
    assert kid_x & ~(fmt.x_mask | fmt.nx_mask) == kid & ~(fmt.x_mask | fmt.nx_mask)


@pytest.mark.parametrize("level", [2, 3])
def test_make_huge_spte_round_trip_keeps_low_and_high_bits(level: int) -> None:
    fmt = _FORMATS["vmx"]
    n = 1 << (9 * (level - 1))
    small = _ept_leaf(0x40000 + n - 1, level=1)
    huge = S.make_huge_spte(fmt, small, level, nx_huge_pages=False)
    assert huge == (small | PS) & ~((n - 1) << 12)
    assert S.spte_to_pfn(huge) == 0x40000
    for idx in (0, 3, 511):
        kid = S.make_small_spte(fmt, huge, level - 1, idx, exec_allowed=True, nx_huge_pages=False)
        step = 1 << (9 * (level - 2))
        assert S.spte_to_pfn(kid) == 0x40000 + idx * step
        assert bool(kid & PS) == (level - 1 > 1)


# ---------------------------------------------------------------------------
# §3.14 zapping: partial huge ranges and the flush hook
# ---------------------------------------------------------------------------


def test_zap_partial_1g_range_zaps_the_whole_leaf() -> None:
    vm = _vm(size=2 << 30, page_level=3)
    vm.mmu.page_fault(vm.vcpus[0], 0x4000_0000, W)
    assert _leaf(vm, 0x4000_0000)[1] == 3
    rec = _recorder(vm)
    vm.zap_gfn_range(0x40001, 0x40002)
    assert vm.mmu.translate(0x4000_0000) is None
    assert vm.mmu.translate(0x7FFF_F000) is None
    assert len(rec.ranges) == 1
    vm.zap_gfn_range(0, 16)  # nothing present: no flush
    assert len(rec.ranges) == 1
    assert vm.mmu.invalidate.in_progress == 0


def test_write_track_on_1g_leaf_write_protects_it_then_write_emulates() -> None:
    vm = _vm(size=2 << 30, page_level=3)
    v = vm.vcpus[0]
    vm.mmu.page_fault(v, 0x4000_0000, W)
    rec = _recorder(vm)
    vm.write_track_add_gfn(0x40123)
    spte, level = _leaf(vm, 0x40123 << 12)
    assert level == 3 and not spte & (EPT_W | EPT_MMU_W) and spte & EPT_HOST_W
    assert rec.ranges == [(0x40000, 1 << 18)]
    assert vm.mmu.page_fault(v, 0x40123 << 12, W | P) == RET_PF_EMULATE
    # a not-present-level fault elsewhere now cannot map 1G (disallow_lpage)
    vm.mmu.page_fault(v, 0x4000_0000 + (5 << 21), W | P)
    assert _leaf(vm, 0x4000_0000 + (5 << 21))[1] == 2


def test_untracked_gfn_write_fault_becomes_writable_via_slow_path() -> None:
    """Write tracking removal does not unprotect (§2, kvm-mmu-2 §10); the next
    write misses the fast path (not MMU-writable) and make_spte, finding no
    tracking, sets W | MMU-writable | D."""
    vm = _vm()
    v = vm.vcpus[0]
    vm.write_track_add_gfn(8)
    assert vm.mmu.page_fault(v, 0x8000, R) == RET_PF_FIXED
    ro, _ = _leaf(vm, 0x8000)
    assert not ro & (EPT_W | EPT_MMU_W | EPT_D)
    vm.write_track_remove_gfn(8)
    assert _leaf(vm, 0x8000)[0] == ro
    assert vm.mmu.page_fault(v, 0x8000, W | P) == RET_PF_FIXED
    assert _leaf(vm, 0x8000)[0] == _ept_leaf(vm.gfn_to_pfn(8))


def test_present_write_to_readonly_memslot_emulates_and_keeps_spte() -> None:
    vm = _vm(flags=kvmmu.KVM_MEM_READONLY)
    v = vm.vcpus[0]
    assert vm.mmu.page_fault(v, 0x2000, R) == RET_PF_FIXED
    ro, _ = _leaf(vm, 0x2000)
    assert not ro & (EPT_W | EPT_MMU_W | EPT_HOST_W)
    assert vm.mmu.page_fault(v, 0x2000, W | P) == RET_PF_EMULATE
    assert _leaf(vm, 0x2000)[0] == ro
    assert vm.stats["pf_mmio_spte_created"] == 0 and vm.stats["pf_emulate"] == 1


@settings(max_examples=25, deadline=None)
@given(
    vendor=st.sampled_from(["vmx", "svm"]),
    ops=st.lists(
        st.tuples(st.integers(0, 15), st.sampled_from(["r", "w", "x"])), min_size=1, max_size=12
    ),
)
def test_any_fault_sequence_leaves_the_exact_full_access_leaf(
    vendor: str, ops: list[tuple[int, str]]
) -> None:
    """TDP faults map ACC_ALL on writable host memory (§4.3): whatever the
    access, the 4K leaf is the full make_spte pattern, and a repeat of a
    fixed access is spurious."""
    vm = _vm(vendor, size=1 << 20)
    v = vm.vcpus[0]
    make = _ept_leaf if vendor == "vmx" else _npt_leaf
    done: set[int] = set()
    for gfn, kind in ops:
        code = {"r": R, "w": W, "x": X}[kind] | (P if gfn in done else 0)
        r = vm.mmu.page_fault(v, gfn << 12, code)
        assert r == (RET_PF_SPURIOUS if gfn in done else RET_PF_FIXED)
        done.add(gfn)
        assert _leaf(vm, gfn << 12) == (make(vm.gfn_to_pfn(gfn)), 1)
    assert vm.stats["pf_fixed"] == len(done)
