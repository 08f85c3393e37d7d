"""KVM x86 quirks: defaults, supported_quirks and KVM_CAP_DISABLE_QUIRKS[2].

spec/memtype.md §11.4 (quirk bits, the enable-cap semantics, 6.16's one-way
disabling, ``KVM_X86_CONDITIONAL_QUIRKS``), §7 (IGNORE_GUEST_PAT needs
self-snoop) and §9 (the quirk is inapplicable on SVM). The 6.16 details
(``inapplicable_quirks & supported_quirks`` at VM creation, no
IGNORE_GUEST_PAT without TDP) follow the 6.16 merge of ``arch/x86/kvm/x86.c``,
``vmx/vmx.c`` and ``svm/svm.c``.
"""

from __future__ import annotations

import errno

import kvmmu
import pytest
from kvmmu.errors import KvmError
from kvmmu.quirks import (
    KVM_X86_CONDITIONAL_QUIRKS,
    KVM_X86_QUIRK_CD_NW_CLEARED,
    KVM_X86_QUIRK_IGNORE_GUEST_PAT,
    KVM_X86_QUIRK_LINT0_REENABLED,
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
    QUIRKS,
)

CD_NW = KVM_X86_QUIRK_CD_NW_CLEARED
IGP = KVM_X86_QUIRK_IGNORE_GUEST_PAT


def vm(vendor: str = "vmx", era: str = "6.16", **kw: object) -> kvmmu.VM:
    return kvmmu.VM(kvmmu.VMConfig(vendor=vendor, era=era, vcpus=0, **kw))  # type: ignore[arg-type]


def test_quirk_bits_spec_11_4() -> None:
    assert {n: b for n, (b, _) in QUIRKS.items()} == {
        "lint0_reenabled": 1 << 0,
        "cd_nw_cleared": 1 << 1,
        "lapic_mmio_hole": 1 << 2,
        "out_7e_inc_rip": 1 << 3,
        "misc_enable_no_mwait": 1 << 4,
        "fix_hypercall_insn": 1 << 5,
        "mwait_never_ud_faults": 1 << 6,
        "slot_zap_all": 1 << 7,
        "stuff_feature_msrs": 1 << 8,
        "ignore_guest_pat": 1 << 9,
    }
    assert KVM_X86_CONDITIONAL_QUIRKS == CD_NW | IGP


@pytest.mark.parametrize(
    ("vendor", "era", "tdp", "cd_nw", "igp"),
    [
        pytest.param("vmx", "6.15", True, True, False, id="vmx_6_15_no_inapplicable_yet"),
        pytest.param("vmx", "6.16", True, False, True, id="vmx_6_16_cd_nw_inapplicable"),
        pytest.param("vmx", "6.16", False, False, True, id="vmx_6_16_shadow"),
        pytest.param("svm", "6.15", True, True, False, id="svm_6_15"),
        pytest.param("svm", "6.16", True, True, False, id="svm_6_16_igp_inapplicable"),
        pytest.param("svm", "6.16", False, True, True, id="svm_6_16_shadow_igp_unsupported"),
    ],
)
def test_6_16_inapplicable_quirks_start_disabled_spec_11_4(
    vendor: str, era: str, tdp: bool, cd_nw: bool, igp: bool
) -> None:
    """``disabled_quirks = inapplicable_quirks & supported_quirks`` at KVM_CREATE_VM."""
    v = vm(vendor, era, tdp=tdp)
    assert v.has_quirk(CD_NW) is cd_nw
    assert v.has_quirk(IGP) is igp
    assert v.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL)


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_6_16_ignore_guest_pat_cannot_be_disabled_without_tdp(vendor: str) -> None:
    """``kvm_x86_vendor_init``: no TDP -> IGNORE_GUEST_PAT not in supported_quirks."""
    with pytest.raises(KvmError) as e:
        vm(vendor, tdp=False, quirks={"ignore_guest_pat": False})
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        vm(vendor, tdp=False).disable_quirks(IGP)


def test_disable_quirks2_6_16_is_one_way_spec_11_4() -> None:
    """6.16: ``disabled_quirks |= args[0] & supported_quirks``."""
    v = vm("vmx")
    v.disable_quirks(IGP)
    assert not v.has_quirk(IGP)
    v.disable_quirks(0)  # cannot re-enable
    assert not v.has_quirk(IGP)
    v.disable_quirks(0, cap2=False)
    assert not v.has_quirk(IGP)
    v.disable_quirks(KVM_X86_QUIRK_LINT0_REENABLED)
    assert not v.has_quirk(IGP) and not v.has_quirk(KVM_X86_QUIRK_LINT0_REENABLED)


def test_disable_quirks2_6_16_refuses_unsupported_v1_masks_them() -> None:
    """6.16 without self-snoop: _QUIRKS2 -> EINVAL; _QUIRKS silently drops the bit."""
    v = vm("vmx", host_self_snoop=False)
    with pytest.raises(KvmError) as e:
        v.disable_quirks(IGP | KVM_X86_QUIRK_LINT0_REENABLED)
    assert e.value.errno == errno.EINVAL
    assert v.has_quirk(KVM_X86_QUIRK_LINT0_REENABLED)  # nothing changed
    v.disable_quirks(IGP | KVM_X86_QUIRK_LINT0_REENABLED | (1 << 40), cap2=False)
    assert v.has_quirk(IGP)
    assert not v.has_quirk(KVM_X86_QUIRK_LINT0_REENABLED)


def test_disable_quirks_before_6_16_assigns_and_can_reenable() -> None:
    """Before 6.16 both caps assign ``disabled_quirks = args[0]``."""
    v = vm("vmx", "6.8")
    v.disable_quirks(CD_NW)
    assert not v.has_quirk(CD_NW)
    v.disable_quirks(0)
    assert v.has_quirk(CD_NW)
    v.disable_quirks(CD_NW, cap2=False)
    v.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL, cap2=False)
    assert v.has_quirk(CD_NW) and not v.has_quirk(KVM_X86_QUIRK_SLOT_ZAP_ALL)


def test_disable_quirks2_before_6_16_refuses_invalid_v1_does_not() -> None:
    """_QUIRKS2 checks ``~KVM_X86_VALID_QUIRKS``; the old cap checks nothing."""
    v = vm("vmx", "6.8")
    with pytest.raises(KvmError) as e:
        v.disable_quirks(IGP)  # IGNORE_GUEST_PAT does not exist in 6.8
    assert e.value.errno == errno.EINVAL
    v.disable_quirks(IGP | CD_NW, cap2=False)
    assert not v.has_quirk(CD_NW)


@pytest.mark.parametrize(("era", "cap2"), [("4.1", False), ("5.18", True)])
def test_disable_quirks_caps_do_not_exist_before_their_release(era: str, cap2: bool) -> None:
    with pytest.raises(KvmError) as e:
        vm("vmx", era).disable_quirks(CD_NW, cap2=cap2)
    assert e.value.errno == errno.EINVAL


def test_6_16_enabling_a_quirk_that_starts_disabled_is_refused_not_ignored() -> None:
    """A config that asks for an inapplicable quirk on must not be silently overridden."""
    with pytest.raises(kvmmu.KvmError) as ei:
        kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era="6.16", quirks={"cd_nw_cleared": True}))
    assert ei.value.errno == errno.EINVAL and "cannot re-enable" in str(ei.value)
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era="6.15", quirks={"cd_nw_cleared": True}))
    assert vm.has_quirk(1 << 1)
