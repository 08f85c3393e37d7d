"""Black-box tests of the kernel-era boundaries (spec/kvm-mmu-2.md §8).

For every non-memtype row of the §8 timeline that the model claims to model,
the last version before the change and the first version of it are run side
by side, on both vendors where the row applies. Memory-type rows
(``vmx_get_mt_mask``, MTRR/CD zaps, 6.7/6.11/6.12 memtype) are covered by
tests/test_blackbox_memtype.py and are not repeated here. Also: how an era is
named and validated (malformed versions, patch versions, ``-rc``, reports).

Public API only: ``kvmmu.VM`` / ``kvmmu.VMConfig``, ``vm.mmu.page_fault`` /
``vm.mmu.translate``, ``vm.pre_fault_memory``, ``vm.set_user_memory_region``,
``vm.disable_quirks``, the ``kvmmu`` CLI.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import kvmmu
import pytest
from click.testing import CliRunner
from kvmmu.cli import cli
from kvmmu.errors import ConfigError, KvmError
from kvmmu.mmu import PFERR_USER_MASK, PFERR_WRITE_MASK
from kvmmu.quirks import KVM_X86_QUIRK_CD_NW_CLEARED, KVM_X86_QUIRK_SLOT_ZAP_ALL
from pydantic import ValidationError

HVA = 0x7F00_0000_0000
HVA1 = HVA + (1 << 32)
W = PFERR_WRITE_MASK | PFERR_USER_MASK
VENDORS = ["vmx", "svm"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scenarios"


def _vm(vendor: str, era: str, size: int = 8 << 20, page_level: int = 1, **cfg: Any) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era=era, **cfg))
    vm.host.mmap_anon(HVA, size, page_level=page_level)
    vm.set_user_memory_region(0, 0, 0, size, HVA)
    return vm


def _fault(vm: Any, *gfns: int) -> None:
    for g in gfns:
        vm.mmu.page_fault(vm.vcpus[0], g << 12, W)


# ----------------------------------------------------------------- era names
@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("6.6.30", (6, 6, 30)),
        ("v6.8", (6, 8)),
        ("6.11-rc1", (6, 11)),
        (" 6.10 ", (6, 10)),
        ("2.6.32", (2, 6, 32)),
    ],
)
def test_version_forms_accepted(text: str, parts: tuple[int, ...]) -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era=text, vcpus=0))
    assert vm.era == parts


@pytest.mark.parametrize("text", ["6", "6.x", "", "six", "6.8.1.2", "6..8", "6.8-rc", "-6.8"])
def test_malformed_version_refused_at_config(text: str) -> None:
    with pytest.raises(ValidationError, match="not a kernel version"):
        kvmmu.VMConfig(era=text)


def test_numeric_not_lexical_ordering() -> None:
    """6.10 is after 6.9 and 6.1 (a string compare would put it between)."""
    v = kvmmu.VM(kvmmu.VMConfig(era="6.10", vcpus=0)).era
    assert v > (6, 9) and v > (6, 1) and v < (6, 11)
    assert kvmmu.VM(kvmmu.VMConfig(era="6.9", vcpus=0)).era < (6, 10)


def test_patch_version_behaves_as_its_release() -> None:
    """6.12.4 is a 6.12 kernel: the slot_zap_all quirk exists (6.12 row) and
    ``KVM_PRE_FAULT_MEMORY`` is there; 6.11.11 is a 6.11 kernel without the quirk."""
    kvmmu.VM(kvmmu.VMConfig(era="6.12.4", quirks={"slot_zap_all": False}, vcpus=0))
    with pytest.raises(KvmError) as e:
        kvmmu.VM(kvmmu.VMConfig(era="6.11.11", quirks={"slot_zap_all": False}, vcpus=0))
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("era", "name"), [("6.6.30", "6.6"), ("6.5.13", "5.19"), ("6.11-rc3", "6.11")]
)
def test_run_report_names_the_era_by_its_first_version(era: str, name: str) -> None:
    """docs/decisions.md "Eras": reports name the era by its first version and
    keep the version asked for as ``kernel``."""
    res = CliRunner().invoke(
        cli, ["run", str(EXAMPLES / "small.toml"), "--vendor", "vmx", "--era", era, "--json"]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["era"] == name  # vendor (memtype) and core boundaries together
    assert rep["kernel"] == era.split("-")[0]


def test_run_with_malformed_era_is_a_config_error() -> None:
    res = CliRunner().invoke(cli, ["run", str(EXAMPLES / "small.toml"), "--era", "6.x"])
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError), res.exception
    assert "not a kernel version" in str(res.exception)


def test_run_with_era_older_than_modelled_is_a_config_error() -> None:
    res = CliRunner().invoke(
        cli, ["run", str(EXAMPLES / "small.toml"), "--vendor", "svm", "--era", "2.6.31"]
    )
    assert res.exit_code != 0
    assert isinstance(res.exception, ConfigError), res.exception
    assert "older than the oldest era" in str(res.exception)


@pytest.mark.parametrize(
    ("vendor", "before", "first"), [("vmx", "6.12", "6.13"), ("svm", "6.11", "6.12")]
)
def test_report_era_differs_across_a_core_boundary(vendor: str, before: str, first: str) -> None:
    names = []
    for era in (before, first):
        res = CliRunner().invoke(
            cli,
            ["run", str(EXAMPLES / "small.toml"), "--vendor", vendor, "--era", era, "--json"],
        )
        assert res.exit_code == 0, res.output
        names.append(json.loads(res.output)["era"])
    assert names[0] != names[1]


# ------------------------------------------- 5.14/5.15: TDP MMU on by default
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("era", "tdp_mmu"), [("5.14", False), ("5.15", True), ("5.14.21", False)])
def test_tdp_mmu_default_from_5_15(vendor: str, era: str, tdp_mmu: bool) -> None:
    """§8 "5.10 TDP MMU introduced (default on from ~5.15)": checked upstream -
    "KVM: x86: enable TDP MMU by default" (Paolo Bonzini) was posted/queued on
    kvm@ on 26 Jul 2021, after the 5.14 merge window, so 5.15 is the first
    release with ``tdp_mmu_enabled = true``. Observable: the legacy direct MMU
    prefetches the 8-aligned neighbours of a faulting gfn (``direct_pte_prefetch``,
    kvm-mmu.md §3.9); the TDP MMU does not."""
    vm = _vm(vendor, era)
    assert vm.mmu.tdp_mmu_enabled is tdp_mmu
    for g in range(0x10, 0x18):
        vm.gfn_to_pfn(g, write=True)  # host pages present, so prefetch can map them
    _fault(vm, 0x13)
    assert vm.mmu.translate(0x13 << 12) is not None
    assert (vm.mmu.translate(0x14 << 12) is not None) is (not tdp_mmu)


# ------------------------------ 6.11/6.12: memslot zap and the slot_zap_all quirk
def _two_slots(vendor: str, era: str, **cfg: Any) -> Any:
    vm = _vm(vendor, era, **cfg)
    vm.host.mmap_anon(HVA1, 1 << 20)
    vm.set_user_memory_region(1, 0, 1 << 32, 1 << 20, HVA1)
    _fault(vm, 3, (1 << 20) + 1)
    assert vm.mmu.translate(0x3000) is not None
    return vm


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(
    ("era", "quirks", "other_slot_zapped"),
    [
        ("6.11", {}, True),  # always kvm_mmu_zap_all_fast
        ("6.12", {}, True),  # quirk on by default: still zap all
        ("6.12", {"slot_zap_all": False}, False),  # only the deleted slot
        ("6.16", {"slot_zap_all": False}, False),
    ],
)
def test_slot_delete_zap_scope_by_era(
    vendor: str, era: str, quirks: dict[str, bool], other_slot_zapped: bool
) -> None:
    """§8 6.12 / kvm-mmu.md §3.14: ``kvm_arch_flush_shadow_memslot`` zaps every
    root before 6.12; from 6.12 only with ``KVM_X86_QUIRK_SLOT_ZAP_ALL``."""
    vm = _two_slots(vendor, era, quirks=quirks)
    vm.set_user_memory_region(1, 0, 1 << 32, 0, HVA1)  # DELETE slot 1
    assert (vm.mmu.translate(0x3000) is None) is other_slot_zapped
    assert vm.mmu.translate((1 << 32) + 0x1000) is None


@pytest.mark.parametrize("vendor", VENDORS)
def test_slot_zap_all_quirk_does_not_exist_in_6_11(vendor: str) -> None:
    with pytest.raises(KvmError) as e:
        kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="6.11", quirks={"slot_zap_all": False}))
    assert e.value.errno == errno.EINVAL
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="6.11", vcpus=0))
    with pytest.raises(KvmError) as e:  # KVM_CAP_DISABLE_QUIRKS2 checks KVM_X86_VALID_QUIRKS
        vm.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL)
    assert e.value.errno == errno.EINVAL
    vm12 = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="6.12", vcpus=0))
    vm12.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL)
    assert not vm12.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL)


# --------------------------------- 6.12/6.13: huge pages recovered in place
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("era", "in_place"), [("6.12", False), ("6.13", True), ("6.12.9", False)])
def test_dirty_log_disable_recovers_huge_in_place_from_6_13(
    vendor: str, era: str, in_place: bool
) -> None:
    """§5.3/§8 "~6.13 in-place huge-page recovery after dirty logging" (marked
    unverified): the 6.13 KVM x86 MMU pull ("Recover huge pages in-place in the
    TDP MMU when dirty page logging is toggled off, instead of zapping them",
    David Matlack's ``kvm_mmu_recover_huge_pages`` series) matches. Before, the
    4K leaves are zapped (``kvm_mmu_zap_collapsible_sptes``) and refault huge."""
    vm = _vm(vendor, era, page_level=2)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    _fault(vm, 0x200, 0x201)
    assert vm.mmu.translate(0x201 << 12)[1] == 1
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)  # logging off
    got = vm.mmu.translate(0x201 << 12)
    if in_place:
        assert got is not None and got[1] == 2
    else:
        assert got is None
        _fault(vm, 0x201)
        assert vm.mmu.translate(0x201 << 12)[1] == 2
    assert vm.check_invariants() == []


# ------------------------------------------ 6.9/6.10: KVM_PRE_FAULT_MEMORY
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("era", ["6.10", "6.10.3", "6.16"])
def test_pre_fault_memory_available_from_6_10(vendor: str, era: str) -> None:
    vm = _vm(vendor, era)
    assert vm.pre_fault_memory(0x5000, 4096) == 4096
    assert vm.mmu.translate(0x5000) is not None


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("era", ["6.9", "6.9.12", "5.15"])
def test_pre_fault_memory_does_not_exist_before_6_10(vendor: str, era: str) -> None:
    """§6/§8: ``KVM_PRE_FAULT_MEMORY`` is 6.10+. Before, the vCPU ioctl is
    unknown: ``kvm_vcpu_ioctl`` hands it to x86 ``kvm_arch_vcpu_ioctl``, whose
    default case returns -EINVAL; nothing is mapped."""
    vm = _vm(vendor, era)
    with pytest.raises(KvmError) as e:
        vm.pre_fault_memory(0x5000, 4096)
    assert e.value.errno == errno.EINVAL
    assert vm.mmu.translate(0x5000) is None


def test_pre_fault_memory_shadow_before_6_10_is_unknown_ioctl() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era="6.9", tdp=False))
    with pytest.raises(KvmError) as e:
        vm.pre_fault_memory(0, 4096)
    assert e.value.errno == errno.EINVAL


def test_pre_fault_memory_shadow_from_6_10_is_eopnotsupp() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era="6.10", tdp=False))
    with pytest.raises(KvmError) as e:
        vm.pre_fault_memory(0, 4096)
    assert e.value.errno == errno.EOPNOTSUPP


# ------------------------------ 6.5/6.6: page-track rework, MOVE with KVMGT
KVMGT_HVA = 0x1000_0000
KVMGT_RAM = 64 << 20


def _kvmgt_vm(era: str) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era=era, plugins={"enabled": ["kvmgt"]}))
    vm.host.mmap_anon(KVMGT_HVA, KVMGT_RAM)
    vm.set_user_memory_region(0, 0, 0, KVMGT_RAM, KVMGT_HVA)
    vm.host.mmap_anon(0x2000_0000, 4 << 20)
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)
    return vm


def test_memslot_move_refused_with_kvmgt_from_6_6() -> None:
    """kvm-mmu.md §2.2/§2.5, §8 6.6: "KVM: x86: Reject memslot MOVE operations if
    KVMGT is attached" is part of the 6.6 page-track rework."""
    vm = _kvmgt_vm("6.6")
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(1, 0, 80 << 20, 4 << 20, 0x2000_0000)
    assert e.value.errno == errno.EINVAL
    assert vm.slot_of(64 << 20) is not None and vm.slot_of(80 << 20) is None


@pytest.mark.parametrize("era", ["6.5", "6.5.13", "6.1"])
def test_memslot_move_allowed_with_kvmgt_before_6_6(era: str) -> None:
    """Before 6.6 a MOVE went through with KVMGT attached: KVM called
    ``track_flush_slot`` (kvm-mmu.md §2.1, §2.5) and KVMGT dropped its protect
    entries for the old slot; the new slot starts with no tracked gfn."""
    vm = _kvmgt_vm(era)
    gfn = (64 << 20 >> 12) + 5
    ptable = vm.plugin("kvmgt").vgpu.ptable
    ptable.add(gfn)  # intel_gvt_page_track_add: KVM write-tracks the gfn
    assert vm.page_track.count(gfn) == 1
    vm.set_user_memory_region(1, 0, 80 << 20, 4 << 20, 0x2000_0000)
    assert vm.slot_of(64 << 20) is None and vm.slot_of(80 << 20) is not None
    assert gfn not in ptable.gfns  # kvmgt_page_track_flush_slot dropped it
    new_gfn = gfn + ((16 << 20) >> 12)
    assert vm.page_track.count(new_gfn) == 0  # MOVE resets the write-track counts
    assert vm.check_invariants() == []


# ------------------------------------------ 4.1/4.2, 5.18/5.19, 6.15/6.16: quirks
@pytest.mark.parametrize("vendor", VENDORS)
def test_cd_nw_cleared_quirk_exists_from_4_2(vendor: str) -> None:
    """§8 4.2: ``KVM_CAP_DISABLE_QUIRKS`` with ``KVM_X86_QUIRK_CD_NW_CLEARED``."""
    with pytest.raises(KvmError) as e:
        kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="4.1", quirks={"cd_nw_cleared": False}))
    assert e.value.errno == errno.EINVAL
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="4.2", quirks={"cd_nw_cleared": False}))
    assert not vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)


@pytest.mark.parametrize("vendor", VENDORS)
def test_disable_quirks2_cap_from_5_19(vendor: str) -> None:
    """§8 ~5.19/6.0: ``KVM_CAP_DISABLE_QUIRKS2``; the old cap works before it."""
    old = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="5.18", vcpus=0))
    with pytest.raises(KvmError) as e:
        old.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED, cap2=True)
    assert e.value.errno == errno.EINVAL
    old.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED, cap2=False)
    assert not old.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)
    new = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="5.19", vcpus=0))
    new.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED, cap2=True)
    assert not new.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("era", "reenabled"), [("6.15", True), ("6.15.11", True), ("6.16", False)])
def test_quirks_cannot_be_reenabled_from_6_16(vendor: str, era: str, reenabled: bool) -> None:
    """§8 6.16 "quirks cannot be re-enabled": the cap ORs the mask in."""
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era=era, vcpus=0))
    vm.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL)
    assert not vm.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL)
    vm.disable_quirks(0)
    assert vm.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL) is reenabled


# ------------------------------------------ 6.7/6.8: KVM_SET_USER_MEMORY_REGION2
@pytest.mark.parametrize("vendor", VENDORS)
def test_set_user_memory_region2_available_from_6_8(vendor: str) -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="6.8"))
    vm.host.mmap_anon(HVA, 8 << 20)
    vm.set_user_memory_region2(0, 0, 0, 8 << 20, HVA)
    assert vm.slot_of(0) is not None


@pytest.mark.parametrize("vendor", VENDORS)
def test_set_user_memory_region2_does_not_exist_before_6_8(vendor: str) -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era="6.7"))
    vm.host.mmap_anon(HVA, 8 << 20)
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region2(0, 0, 0, 8 << 20, HVA)
    assert e.value.errno == errno.ENOTTY
    assert vm.slot_of(0) is None
