"""KVM x86 quirks (``KVM_CAP_DISABLE_QUIRKS2``), spec/memtype.md §11.4.

Quirks are on by default; userspace disables them. Config names a quirk by
the lower-case suffix of its ``KVM_X86_QUIRK_`` name (``cd_nw_cleared``).
"""

from __future__ import annotations

from kvmmu.era import KernelVersion

__all__ = [
    "KVM_X86_QUIRK_CD_NW_CLEARED",
    "KVM_X86_QUIRK_IGNORE_GUEST_PAT",
    "KVM_X86_QUIRK_SLOT_ZAP_ALL",
    "QUIRKS",
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
    era: KernelVersion, *, self_snoop: bool, needs_self_snoop: int = KVM_X86_QUIRK_IGNORE_GUEST_PAT
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
    return mask
