"""SVM plugin: NPT format, gPAT + host-side memory types, hardware CR0, zaps."""

from __future__ import annotations

import pytest
from kvmmu.memtype import ALL_GFNS_END, MSR_MTRR_DEF_TYPE, MemType, effective_type
from kvmmu.plugins.svm import (
    UNVERIFIED_AMD_GUEST_HOST_COMBINATION,
    SvmConfig,
    SvmPlugin,
    npt_effective_type,
)
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
RAM_HPA = 0x1234_5000


def svm_vm(**kw: object) -> FakeVM:
    vm = FakeVM(**kw)  # type: ignore[arg-type]
    vm.config.vendor = "svm"
    return vm


@pytest.mark.parametrize(("maxphy", "mmio"), [(46, (1 << 51) | 1), (52, 0)])
def test_npt_format_spec_kvm_mmu_4_3(maxphy: int, mmio: int) -> None:
    vm = svm_vm(maxphyaddr=maxphy)
    f = SvmPlugin(vm).kvmmu_spte_format(vm)
    assert f.name == "npt"
    assert (f.present_mask, f.writable_mask, f.user_mask) == (1, 2, 4)
    assert (f.accessed_mask, f.dirty_mask, f.nx_mask, f.x_mask) == (1 << 5, 1 << 6, 1 << 63, 0)
    assert (f.host_writable_mask, f.mmu_writable_mask) == (1 << 9, 1 << 10)
    assert (f.mmio_value, f.mmio_mask, f.mmio_access_mask) == (mmio, mmio, 2 | 4)
    assert f.memtype_mask == 0 and f.acc_track_mask == 0


def test_svm_config_and_5level() -> None:
    vm = svm_vm()
    assert SvmPlugin(vm, SvmConfig(npt_5level=True)).kvmmu_spte_format(vm).root_level == 5
    with pytest.raises(ValueError):
        SvmConfig(bogus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(("era", "value"), [("5.19", 0), ("6.0", None), ("6.16", None)])
def test_svm_get_mt_mask_zero_then_absent(era: str, value: int | None) -> None:
    vm = svm_vm(era=era, noncoherent=1)
    assert SvmPlugin(vm).kvmmu_get_mt_mask(vm, None, 1, True) == value


def test_svm_shadow_get_mt_mask_absent() -> None:
    vm = svm_vm(era="5.4", tdp=False)
    assert SvmPlugin(vm).kvmmu_get_mt_mask(vm, None, 1, False) is None


def _eff(vm: FakeVM, pat: MemType | None, hpa: int = RAM_HPA) -> MemType:
    return SvmPlugin(vm).kvmmu_effective_memtype(vm, vm.vcpus[0], 0, pat, hpa)


def test_svm_verified_guest_wb_gets_host_mtrr_type() -> None:
    """Host PAT0 = WB in every NPT leaf; host MTRRs give MMIO its type (spec §9)."""
    vm = svm_vm()
    assert _eff(vm, WB) is WB
    assert _eff(vm, WB, MMIO_BASE) is UC
    assert _eff(vm, None, MMIO_BASE) is UC
    vm.host.mmio_type = WC
    assert _eff(vm, WB, MMIO_BASE) is WC


def test_svm_gpat_follows_guest_pat_no_ipat_equivalent() -> None:
    """Unlike VMX without noncoherent DMA, a guest WC mapping of RAM stays WC."""
    vm = svm_vm(era="6.16")
    assert _eff(vm, WC) is WC
    assert _eff(vm, UC) is UC


def test_svm_unverified_table_is_the_only_source_for_non_wb_guest_types() -> None:
    for (g, m), t in UNVERIFIED_AMD_GUEST_HOST_COMBINATION.items():
        assert t is effective_type(m, g)
        if g is not WB:
            assert npt_effective_type(g, m) is t
    assert len(UNVERIFIED_AMD_GUEST_HOST_COMBINATION) == 6 * 5


def test_svm_guest_mtrrs_play_no_part() -> None:
    vm = svm_vm(era="5.4", noncoherent=1)
    vm.vcpus[0].mtrr.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 0)  # guest says all UC
    assert _eff(vm, WB) is WB


@pytest.mark.parametrize("pat", list(MemType))
def test_svm_shadow_paging_ignores_guest_pat(pat: MemType) -> None:
    vm = svm_vm(tdp=False)
    assert _eff(vm, pat) is WB
    assert _eff(vm, pat, MMIO_BASE) is UC


def test_hardware_cr0_svm_clears_cd_nw_only_with_quirk() -> None:
    on = svm_vm(era="6.8")
    off = svm_vm(era="6.8", disabled=("cd_nw_cleared",))
    cr0 = CR0_PE_PG | CD | NW
    assert SvmPlugin(on).kvmmu_hardware_cr0(on, on.vcpus[0], cr0) == CR0_PE_PG
    assert SvmPlugin(off).kvmmu_hardware_cr0(off, off.vcpus[0], cr0) == cr0


def test_hardware_cr0_svm_before_quirk_always_cleared_and_shadow_forces_pg_wp() -> None:
    old = svm_vm(era="4.1", disabled=("cd_nw_cleared",))
    assert SvmPlugin(old).kvmmu_hardware_cr0(old, old.vcpus[0], 1 | CD) == 1
    sh = svm_vm(era="6.8", tdp=False)
    assert SvmPlugin(sh).kvmmu_hardware_cr0(sh, sh.vcpus[0], 1) == 1 | (1 << 31) | (1 << 16)


def test_svm_guest_cd_with_quirk_disabled_is_uc() -> None:
    vm = svm_vm(era="6.16", disabled=("cd_nw_cleared",))
    vm.vcpus[0].cr0 |= CD
    assert _eff(vm, WB) is UC
    vm2 = svm_vm(era="6.16")
    vm2.vcpus[0].cr0 |= CD
    assert _eff(vm2, WB) is WB


@pytest.mark.parametrize(("era", "zaps"), [("4.2", True), ("6.6", True), ("6.7", False)])
def test_svm_cr0_cd_zap_common_code_until_6_6(era: str, zaps: bool) -> None:
    vm = svm_vm(era=era, noncoherent=1, disabled=("cd_nw_cleared",))
    SvmPlugin(vm).kvmmu_cr0_changed(vm, vm.vcpus[0], CR0_PE_PG, CR0_PE_PG | CD)
    assert vm.zaps == ([(0, ALL_GFNS_END)] if zaps else [])


@pytest.mark.parametrize(("era", "zaps"), [("4.2", True), ("6.6", True), ("6.7", False)])
def test_svm_mtrr_write_zap_common_code_until_6_6(era: str, zaps: bool) -> None:
    vm = svm_vm(era=era, noncoherent=1)
    vm.vcpus[0].mtrr.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)
    SvmPlugin(vm).kvmmu_msr_written(vm, vm.vcpus[0], MSR_MTRR_DEF_TYPE, 0, 0x806)
    assert vm.zaps == ([(0, ALL_GFNS_END)] if zaps else [])


@pytest.mark.parametrize(
    ("era", "tdp", "disabled", "zaps"),
    [
        pytest.param("6.8", True, (), False, id="6_7_npt_no_memtype_mask"),
        pytest.param("6.8", False, (), False, id="6_7_shadow_no_memtype_mask"),
        pytest.param("6.16", True, ("ignore_guest_pat",), False, id="6_16_npt_inapplicable"),
        pytest.param("6.16", False, (), True, id="6_16_shadow_quirk_stays_enabled"),
    ],
)
def test_svm_noncoherent_registration_zaps_only_6_16_shadow_paging(
    era: str, tdp: bool, disabled: tuple[str, ...], zaps: bool
) -> None:
    """6.7–6.15 need ``shadow_memtype_mask`` (0 on SVM); from 6.16 the per-VM
    IGNORE_GUEST_PAT check, which is disabled on NPT (inapplicable) but stays
    enabled with shadow paging (unsupported without TDP), spec §11.1.

    Replaces an assertion that SVM has no such hook at all, which the 6.16
    ``kvm_mmu_may_ignore_guest_pat(kvm)`` contradicts for shadow paging.
    """
    vm = svm_vm(era=era, tdp=tdp, disabled=disabled)
    plugin = SvmPlugin(vm)
    plugin.kvmmu_noncoherent_dma_changed(vm, 0, 1)
    plugin.kvmmu_noncoherent_dma_changed(vm, 1, 2)  # not a transition
    plugin.kvmmu_noncoherent_dma_changed(vm, 1, 0)
    assert vm.zaps == ([(0, ALL_GFNS_END)] * 2 if zaps else [])


@pytest.mark.parametrize(("era", "level"), [("5.19", 2), ("6.0", None)])
def test_svm_mtrr_level_cap_until_5_19(era: str, level: int | None) -> None:
    vm = svm_vm(era=era, noncoherent=1)
    m = vm.vcpus[0].mtrr
    m.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)
    m.set_msr(0x200, 0x4020_0000)
    m.set_msr(0x201, ((1 << 46) - 1) & ~(0x20_0000 - 1) | (1 << 11))
    assert SvmPlugin(vm).kvmmu_max_mapping_level(vm, None, 0x40000, 3) == level
