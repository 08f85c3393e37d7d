"""VMX plugin: EPT format, effective types, hardware CR0, quirks, zaps, levels."""

from __future__ import annotations

import errno

import pytest
from kvmmu.errors import KvmError
from kvmmu.memtype import (
    ALL_GFNS_END,
    MSR_IA32_CR_PAT,
    MSR_MTRR_DEF_TYPE,
    MemType,
    mtrr_physbase,
    mtrr_physmask,
)
from kvmmu.plugins.vmx import VmxConfig, VmxPlugin
from test_memtype_fakes import CR0_PE_PG, MMIO_BASE, FakeVM

UC, WC, WT, WP, WB, UCM = (
    MemType.UC,
    MemType.WC,
    MemType.WT,
    MemType.WP,
    MemType.WB,
    MemType.UC_MINUS,
)
CD, NW = 1 << 30, 1 << 29
ALL = (0, ALL_GFNS_END)
RAM_HPA = 0x1234_5000


# ---------------------------------------------------------------- format


def test_ept_format_spec_kvm_mmu_4_3() -> None:
    vm = FakeVM(era="6.12")
    f = VmxPlugin(vm).kvmmu_spte_format(vm)
    assert f.name == "ept"
    assert (f.user_mask, f.x_mask, f.nx_mask) == (1, 4, 0)
    assert (f.accessed_mask, f.dirty_mask) == (1 << 8, 1 << 9)
    assert (f.host_writable_mask, f.mmu_writable_mask) == (1 << 57, 1 << 58)
    assert (f.mmio_value, f.mmio_mask, f.mmio_access_mask) == (0b110, 0x7 | 1 << 63, 0)
    assert f.acc_track_mask == 0x7
    assert f.memtype_mask == 0x78
    assert f.present_mask == 1 << 63  # exec-only CPU: no R; SUPPRESS_VE
    assert f.ad_enabled and f.root_level == 4


@pytest.mark.parametrize(("era", "mask"), [("5.19", 0), ("6.0", 0x78), ("6.15", 0x78), ("6.16", 0)])
def test_ept_memtype_mask_only_6_0_to_6_15(era: str, mask: int) -> None:
    vm = FakeVM(era=era)
    assert VmxPlugin(vm).kvmmu_spte_format(vm).memtype_mask == mask


def test_ept_format_options_and_old_masks() -> None:
    vm = FakeVM(era="5.10")
    cfg = VmxConfig(ept_ad=False, ept_5level=True, ept_exec_only=False)
    f = VmxPlugin(vm, cfg).kvmmu_spte_format(vm)
    assert f.present_mask == 1  # R without exec-only, no SUPPRESS_VE before 6.10
    assert f.mmio_mask == 0x7
    assert not f.ad_enabled
    assert f.root_level == 5


def test_vmx_config_forbids_unknown_fields() -> None:
    assert VmxPlugin.kvmmu_config_model() is VmxConfig
    with pytest.raises(ValueError):
        VmxConfig(ept_adx=True)  # type: ignore[call-arg]


def test_vmx_shadow_paging_uses_x86_pte_format() -> None:
    vm = FakeVM(era="6.16", tdp=False)
    f = VmxPlugin(vm).kvmmu_spte_format(vm)
    assert f.name == "shadow"
    assert (f.present_mask, f.user_mask, f.nx_mask, f.memtype_mask) == (1, 4, 1 << 63, 0)
    assert f.mmio_value == (1 << 51) | 1


# ------------------------------------------------- effective memory type


def _eff(vm: FakeVM, spte: int, pat: MemType | None, hpa: int = RAM_HPA) -> MemType:
    return VmxPlugin(vm).kvmmu_effective_memtype(vm, vm.vcpus[0], spte, pat, hpa)


@pytest.mark.parametrize("pat", list(MemType))
def test_ept_ipat_ignores_guest_pat_sdm_24_2_5_2(pat: MemType) -> None:
    vm = FakeVM()
    assert _eff(vm, 0x70, pat) is WB
    assert _eff(vm, 0x40, pat) is UC


@pytest.mark.parametrize(
    ("pat", "expected"), [(UC, UC), (UCM, UC), (WC, WC), (WT, WT), (WB, WB), (WP, WP)]
)
def test_ept_wb_no_ipat_honours_guest_pat_spec_memtype_5(pat: MemType, expected: MemType) -> None:
    assert _eff(FakeVM(), 0x30, pat) is expected


@pytest.mark.parametrize(
    ("pat", "expected"), [(UC, UC), (UCM, UC), (WC, WC), (WT, UC), (WB, UC), (WP, UC)]
)
def test_ept_uc_no_ipat_mmio_only_wc_survives(pat: MemType, expected: MemType) -> None:
    assert _eff(FakeVM(), 0x00, pat, MMIO_BASE) is expected


def test_ept_guest_mtrr_type_combines_by_table_11_7() -> None:
    assert _eff(FakeVM(), int(WT) << 3, WP) is WP
    assert _eff(FakeVM(), int(WC) << 3, WT) is UC


def test_ept_guest_paging_off_pat_is_wb_unverified() -> None:
    assert _eff(FakeVM(), int(WT) << 3, None) is WT


def test_ept_guest_cr0_cd_never_reaches_hardware() -> None:
    vm = FakeVM()
    vm.vcpus[0].cr0 |= CD
    assert _eff(vm, 0x30, WB) is WB


def test_ept_misconfigured_memtype_is_an_error() -> None:
    with pytest.raises(ValueError):
        _eff(FakeVM(), 2 << 3, WB)


@pytest.mark.parametrize("pat", list(MemType))
def test_vmx_shadow_paging_effective_is_host_mtrr_guest_pat_ignored(pat: MemType) -> None:
    """spec/kvm-mmu.md §4.2: PAT index 0 (WB) with the host MTRR type."""
    vm = FakeVM(tdp=False)
    vm.vcpus[0].cr0 |= CD
    assert _eff(vm, 0, pat) is WB
    assert _eff(vm, 0, pat, MMIO_BASE) is UC


def test_hardware_cr0_vmx_clears_cd_nw_always() -> None:
    for disabled in ((), ("cd_nw_cleared",)):
        vm = FakeVM(era="6.8", disabled=disabled)
        hw = VmxPlugin(vm).kvmmu_hardware_cr0(vm, vm.vcpus[0], CR0_PE_PG | CD | NW)
        assert hw == CR0_PE_PG


# ---------------------------------------------------------------- quirks


def test_consumers_23_disable_ignore_guest_pat_without_self_snoop_refused() -> None:
    vm = FakeVM(era="6.16", self_snoop=False, disabled=("ignore_guest_pat",))
    with pytest.raises(KvmError) as e:
        VmxPlugin(vm)
    assert e.value.errno == errno.EINVAL
    assert "KVM_X86_QUIRK_IGNORE_GUEST_PAT" in str(e.value)


def test_quirk_refusal_only_without_self_snoop_and_from_6_16() -> None:
    VmxPlugin(FakeVM(era="6.16", self_snoop=True, disabled=("ignore_guest_pat",)))
    VmxPlugin(FakeVM(era="6.15", self_snoop=False, disabled=("ignore_guest_pat",)))
    VmxPlugin(FakeVM(era="6.16", self_snoop=False, disabled=("cd_nw_cleared",)))


# ------------------------------------------------ consumers.md §4, 21–25


def test_consumers_21_quirk_on_no_ncdma_guest_wc_on_ram_is_wb() -> None:
    vm = FakeVM(era="6.16")
    p = VmxPlugin(vm)
    spte = p.kvmmu_get_mt_mask(vm, None, 0x100, False)
    assert spte == 0x70
    assert p.kvmmu_effective_memtype(vm, vm.vcpus[0], spte, WC, RAM_HPA) is WB


def test_consumers_22_quirk_disabled_self_snoop_guest_wc_is_wc() -> None:
    vm = FakeVM(era="6.16", disabled=("ignore_guest_pat",))
    p = VmxPlugin(vm)
    spte = p.kvmmu_get_mt_mask(vm, None, 0x100, False)
    assert spte == 0x30
    assert p.kvmmu_effective_memtype(vm, vm.vcpus[0], spte, WC, RAM_HPA) is WC


def test_consumers_24_first_ncdma_with_quirk_on_zaps_all() -> None:
    vm = FakeVM(era="6.16")
    p = VmxPlugin(vm)
    vm.noncoherent_dma_count = 1
    p.kvmmu_noncoherent_dma_changed(vm, 0, 1)
    assert vm.zaps == [ALL]


def test_consumers_25_host_mmio_guest_wb_is_uc() -> None:
    vm = FakeVM(era="6.16")
    p = VmxPlugin(vm)
    spte = p.kvmmu_get_mt_mask(vm, None, MMIO_BASE >> 12, True)
    assert spte == 0x00
    assert p.kvmmu_effective_memtype(vm, vm.vcpus[0], spte, WB, MMIO_BASE) is UC


# ------------------------------------------------------------------ zaps


@pytest.mark.parametrize(
    ("era", "tdp", "disabled", "zaps"),
    [
        pytest.param("6.6", True, (), False, id="6_6_never"),
        pytest.param("6.7", True, (), True, id="6_7_ept"),
        pytest.param("6.15", False, (), False, id="6_15_shadow_no_memtype_mask"),
        pytest.param("6.16", True, (), True, id="6_16_quirk_on"),
        pytest.param("6.16", True, ("ignore_guest_pat",), False, id="6_16_quirk_off"),
        pytest.param("6.16", False, (), True, id="6_16_quirk_on_shadow"),
    ],
)
def test_noncoherent_first_and_last_registration_zap_spec_11_1(
    era: str, tdp: bool, disabled: tuple[str, ...], zaps: bool
) -> None:
    vm = FakeVM(era=era, tdp=tdp, disabled=disabled)
    p = VmxPlugin(vm)
    p.kvmmu_noncoherent_dma_changed(vm, 0, 1)
    p.kvmmu_noncoherent_dma_changed(vm, 1, 2)  # not a 0->1 or 1->0 transition
    p.kvmmu_noncoherent_dma_changed(vm, 2, 1)
    p.kvmmu_noncoherent_dma_changed(vm, 1, 0)
    assert vm.zaps == ([ALL, ALL] if zaps else [])


def _write(vm: FakeVM, index: int, value: int) -> None:
    vcpu = vm.vcpus[0]
    old = vcpu.mtrr.get_msr(index) if index != MSR_IA32_CR_PAT else vcpu.pat
    if index == MSR_IA32_CR_PAT:
        vcpu.pat = value
    else:
        vcpu.mtrr.set_msr(index, value)
    VmxPlugin(vm).kvmmu_msr_written(vm, vcpu, index, old, value)


@pytest.mark.parametrize(
    ("era", "noncoh", "tdp", "zaps"),
    [
        pytest.param("4.1", 1, True, False, id="4_1_none"),
        pytest.param("4.2", 1, True, True, id="4_2_tdp_noncoh"),
        pytest.param("6.6", 0, True, False, id="6_6_coherent"),
        pytest.param("6.6", 1, False, False, id="6_6_shadow"),
        pytest.param("6.7", 1, True, True, id="6_7_honoured"),
        pytest.param("6.10", 1, True, True, id="6_10_honoured"),
        pytest.param("6.11", 1, True, False, id="6_11_removed"),
    ],
)
def test_mtrr_write_zaps_update_mtrr_per_era(era: str, noncoh: int, tdp: bool, zaps: bool) -> None:
    vm = FakeVM(era=era, noncoherent=noncoh, tdp=tdp)
    _write(vm, MSR_MTRR_DEF_TYPE, (1 << 11) | (1 << 10) | 6)
    _write(vm, 0x259, 0)
    _write(vm, mtrr_physbase(2), 0x4000_0000)
    _write(vm, mtrr_physmask(2), ((1 << 46) - 1) & ~(0x4000_0000 - 1) | (1 << 11))
    _write(vm, MSR_IA32_CR_PAT, 0x0007040600070406)  # PAT writes never zap
    # The PHYSBASE write zaps with the old (zero) mask: up to 2^46, as var_mtrr_range does.
    expected = [ALL, (0xA0, 0xC0), (0x40000, 1 << 34), (0x40000, 0x80000)]
    assert vm.zaps == (expected if zaps else [])


def test_mtrr_write_while_disabled_zaps_nothing_but_def_type() -> None:
    vm = FakeVM(era="6.8", noncoherent=1)
    _write(vm, 0x250, 0)
    _write(vm, MSR_MTRR_DEF_TYPE, 6)  # E still clear: DEF_TYPE zaps all anyway
    assert vm.zaps == [ALL]


@pytest.mark.parametrize(
    ("era", "noncoh", "disabled", "tdp", "zaps"),
    [
        pytest.param("4.1", 1, (), True, False, id="4_1_none"),
        pytest.param("4.2", 1, ("cd_nw_cleared",), True, True, id="4_2_quirk_off"),
        pytest.param("6.6", 1, (), True, False, id="6_6_quirk_on"),
        pytest.param("6.6", 0, ("cd_nw_cleared",), True, False, id="6_6_coherent"),
        pytest.param("6.6", 1, ("cd_nw_cleared",), False, True, id="6_6_shadow_too"),
        pytest.param("6.7", 1, ("cd_nw_cleared",), True, True, id="6_7_honoured"),
        pytest.param("6.7", 1, ("cd_nw_cleared",), False, False, id="6_7_shadow_not_honoured"),
        pytest.param("6.11", 1, ("cd_nw_cleared",), True, False, id="6_11_removed"),
    ],
)
def test_cr0_cd_toggle_zaps_spec_11_2(
    era: str, noncoh: int, disabled: tuple[str, ...], tdp: bool, zaps: bool
) -> None:
    vm = FakeVM(era=era, noncoherent=noncoh, disabled=disabled, tdp=tdp)
    p = VmxPlugin(vm)
    p.kvmmu_cr0_changed(vm, vm.vcpus[0], CR0_PE_PG, CR0_PE_PG | CD)
    p.kvmmu_cr0_changed(vm, vm.vcpus[0], CR0_PE_PG | CD, CR0_PE_PG | CD | NW)  # CD unchanged
    p.kvmmu_cr0_changed(vm, vm.vcpus[0], CR0_PE_PG | CD, CR0_PE_PG)
    assert vm.zaps == ([ALL, ALL] if zaps else [])


# ------------------------------------------------------- huge-page levels


def _split_mtrrs(vm: FakeVM) -> None:
    m = vm.vcpus[0].mtrr
    m.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)
    m.set_msr(mtrr_physbase(0), 0x4020_0000)  # 2 MiB UC inside the 2nd GiB
    m.set_msr(mtrr_physmask(0), ((1 << 46) - 1) & ~(0x20_0000 - 1) | (1 << 11))


@pytest.mark.parametrize(
    ("era", "noncoh", "tdp", "level"),
    [
        pytest.param("4.1", 0, True, None, id="4_1_none"),
        pytest.param("4.2", 0, True, 2, id="4_2_every_fault"),
        pytest.param("5.19", 0, True, 2, id="5_19_every_fault"),
        pytest.param("6.0", 0, True, None, id="6_0_coherent"),
        pytest.param("6.0", 1, True, 2, id="6_0_noncoh"),
        pytest.param("6.10", 1, True, 2, id="6_10_noncoh"),
        pytest.param("6.10", 1, False, None, id="6_10_shadow"),
        pytest.param("6.11", 1, True, None, id="6_11_removed"),
    ],
)
def test_max_mapping_level_mtrr_consistency_spec_8(
    era: str, noncoh: int, tdp: bool, level: int | None
) -> None:
    vm = FakeVM(era=era, noncoherent=noncoh, tdp=tdp)
    _split_mtrrs(vm)
    assert VmxPlugin(vm).kvmmu_max_mapping_level(vm, None, 0x40000, 3) == level


def test_report_section_names_era_and_format() -> None:
    vm = FakeVM(era="6.8")
    section = VmxPlugin(vm).kvmmu_report_section(vm)
    assert section["era"] == "6.7" and section["spte_format"] == "ept"
