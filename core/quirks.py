"""KVM x86 quirks (``KVM_CAP_DISABLE_QUIRKS2``), spec/memtype.md §11.4.

Quirks are on by default; userspace disables them. Config names a quirk by
the lower-case suffix of its ``KVM_X86_QUIRK_`` name (``cd_nw_cleared``).
"""

from __future__ import annotations

import errno

from kvmmu.era import KernelVersion
from kvmmu.errors import KvmError

__all__ = [
    "KVM_X86_CONDITIONAL_QUIRKS",
    "KVM_X86_QUIRK_CD_NW_CLEARED",
    "KVM_X86_QUIRK_IGNORE_GUEST_PAT",
    "KVM_X86_QUIRK_SLOT_ZAP_ALL",
    "QUIRKS",
    "apply_disable_quirks_cap",
    "initial_disabled_quirks",
    "supported_quirks",
]

KVM_X86_QUIRK_LINT0_REENABLED = 1 << 0
KVM_X86_QUIRK_CD_NW_CLEARED = 1 << 1
KVM_X86_QUIRK_LAPIC_MMIO_HOLE = 1 << 2
KVM_X86_QUIRK_OUT_7E_INC_RIP = 1 << 3
KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT = 1 << 4
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5
KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS = 1 << 6
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
KVM_X86_QUIRK_STUFF_FEATURE_MSRS = 1 << 8
KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9

#: ``KVM_X86_CONDITIONAL_QUIRKS`` (6.16): the quirks vendor code may force
#: off. ``kvm_caps.inapplicable_quirks`` starts as this set; VMX clears
#: ``IGNORE_GUEST_PAT`` from it and SVM clears ``CD_NW_CLEARED``
#: (spec/memtype.md §11.4, §9).
KVM_X86_CONDITIONAL_QUIRKS = KVM_X86_QUIRK_CD_NW_CLEARED | KVM_X86_QUIRK_IGNORE_GUEST_PAT
#: First kernel with ``KVM_CAP_DISABLE_QUIRKS2`` (2022, Oliver Upton; the
#: 5.19 release is from memory: spec/memtype.md §11.4 says only "2022").
DISABLE_QUIRKS2_FIRST = "5.19"
#: First kernel with ``supported_quirks``, ``inapplicable_quirks`` and
#: one-way disabling ("do not allow re-enabling quirks", spec §11.4).
_ONE_WAY_FIRST = "6.16"

#: name -> (bit, first kernel version that has it). The MMU-relevant ones are
#: ``cd_nw_cleared`` (4.2), ``slot_zap_all`` (6.12) and ``ignore_guest_pat``
#: (6.16); the release of the others matters only for validation.
QUIRKS: dict[str, tuple[int, str]] = {
    "lint0_reenabled": (KVM_X86_QUIRK_LINT0_REENABLED, "4.2"),
    "cd_nw_cleared": (KVM_X86_QUIRK_CD_NW_CLEARED, "4.2"),
    "lapic_mmio_hole": (KVM_X86_QUIRK_LAPIC_MMIO_HOLE, "4.7"),
    "out_7e_inc_rip": (KVM_X86_QUIRK_OUT_7E_INC_RIP, "5.2"),
    "misc_enable_no_mwait": (KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT, "5.2"),
    "fix_hypercall_insn": (KVM_X86_QUIRK_FIX_HYPERCALL_INSN, "5.19"),
    "mwait_never_ud_faults": (KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS, "6.0"),
    "slot_zap_all": (KVM_X86_QUIRK_SLOT_ZAP_ALL, "6.12"),
    "stuff_feature_msrs": (KVM_X86_QUIRK_STUFF_FEATURE_MSRS, "6.12"),
    "ignore_guest_pat": (KVM_X86_QUIRK_IGNORE_GUEST_PAT, "6.16"),
}


def supported_quirks(
    era: KernelVersion,
    *,
    self_snoop: bool,
    needs_self_snoop: int = KVM_X86_QUIRK_IGNORE_GUEST_PAT,
    tdp: bool = True,
) -> int:
    """Return ``kvm_caps.supported_quirks`` for a kernel of ``era``.

    From 6.16 VMX drops ``IGNORE_GUEST_PAT`` from the supported set when the
    host CPU lacks self-snoop, so it cannot be disabled there (spec/memtype.md
    §7, 6.16 quirk details). ``needs_self_snoop`` is the vendor's set of such
    quirks (``VmxPlugin.QUIRKS_REQUIRING_SELF_SNOOP``; none on SVM, where the
    quirk is inapplicable).
    """
    mask = 0
    for bit, first in QUIRKS.values():
        if era >= KernelVersion(first):
            mask |= bit
    if not self_snoop:
        mask &= ~needs_self_snoop
    if not tdp:
        # kvm_x86_vendor_init (6.16): "KVM always ignores guest PAT for
        # shadow paging", so the quirk cannot be disabled without TDP.
        mask &= ~KVM_X86_QUIRK_IGNORE_GUEST_PAT
    return mask


def initial_disabled_quirks(era: KernelVersion, *, applicable: int, supported: int) -> int:
    """``kvm->arch.disabled_quirks`` at ``KVM_CREATE_VM``.

    From 6.16 ``kvm_arch_init_vm`` starts from ``inapplicable_quirks &
    supported_quirks``: the conditional quirks the vendor did not mark
    ``applicable`` are disabled from the start (CD_NW_CLEARED on VMX,
    IGNORE_GUEST_PAT on SVM with NPT; spec/memtype.md §11.4, §9). Before
    6.16 no quirk starts disabled.
    """
    if era < KernelVersion(_ONE_WAY_FIRST):
        return 0
    return KVM_X86_CONDITIONAL_QUIRKS & ~applicable & supported


def apply_disable_quirks_cap(
    era: KernelVersion, disabled: int, mask: int, *, cap2: bool, supported: int
) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS[2], args[0] = mask)``; the new disabled set.

    spec/memtype.md §11.4: ``KVM_CAP_DISABLE_QUIRKS`` (4.2+) assigns
    ``disabled_quirks = mask`` unchecked, so quirks can be re-enabled.
    ``KVM_CAP_DISABLE_QUIRKS2`` fails with EINVAL on bits outside the valid
    (from 6.16: supported) quirks, then does the same. From 6.16 both OR in
    ``mask & supported_quirks``: disabling is one-way. A refused call raises
    ``KvmError(EINVAL)``.
    """
    name = "KVM_CAP_DISABLE_QUIRKS2" if cap2 else "KVM_CAP_DISABLE_QUIRKS"
    if era < KernelVersion("4.2") or (cap2 and era < KernelVersion(DISABLE_QUIRKS2_FIRST)):
        raise KvmError(errno.EINVAL, f"{name} does not exist in kernel {era}")
    if mask < 0 or mask >> 64:
        raise KvmError(errno.EINVAL, f"{name}: args[0] {mask:#x} is not a u64")
    one_way = era >= KernelVersion(_ONE_WAY_FIRST)
    valid = supported if one_way else supported_quirks(era, self_snoop=True)
    if cap2 and mask & ~valid:
        raise KvmError(
            errno.EINVAL, f"{name}: bits {mask & ~valid:#x} are not supported quirks in {era}"
        )
    if one_way:
        return disabled | (mask & supported)
    return mask
