"""x86 memory types under KVM: encodings, PAT, MTRRs, SDM Table 11-7.

The public import path for everything memory-type related (spec/memtype.md).
The encodings, the PAT and Table 11-7 live in :mod:`kvmmu.pat`, the guest
MTRRs in :mod:`kvmmu.mtrr`; both are re-exported here.

This module also holds the memory-type code that KVM shares between vendors
in ``arch/x86/kvm/x86.c`` and ``arch/x86/kvm/mmu/mmu.c`` (the zaps on MTRR
writes and CR0.CD toggles, the MTRR-consistent huge-page level). Vendor
plugins call these with ``ept`` = "``shadow_memtype_mask`` is non-zero",
i.e. the VM uses EPT, which is what ``kvm_mmu_honors_guest_mtrrs`` tests.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from kvmmu.era import KernelVersion
from kvmmu.errors import KvmError
from kvmmu.mtrr import (
    ALL_GFNS_END,
    FIXED_MTRR_MSRS,
    KVM_NR_VAR_MTRR,
    MSR_MTRR_CAP,
    MSR_MTRR_DEF_TYPE,
    MTRR_DEF_TYPE_E,
    MTRR_DEF_TYPE_FE,
    MTRRCAP_VALUE,
    MtrrLookup,
    MtrrState,
    is_mtrr_msr,
    mtrr_physbase,
    mtrr_physmask,
)
from kvmmu.pat import (
    MSR_IA32_CR_PAT,
    PAT_DEFAULT,
    PAT_TYPE_MASK,
    MemType,
    check_pat_write,
    effective_type,
    kvm_pat_valid,
    make_pat,
    pat_entries,
    pat_index,
    pat_type,
    valid_mtrr_type,
    valid_pat_type,
)
from kvmmu.quirks import KVM_X86_QUIRK_CD_NW_CLEARED, QUIRKS
from kvmmu.spte import ACC_USER_MASK, ACC_WRITE_MASK, SpteFormat

__all__ = [
    "ALL_GFNS_END",
    "CR0_CD",
    "CR0_NW",
    "FIXED_MTRR_MSRS",
    "KVM_NR_VAR_MTRR",
    "MEMTYPE_LABELS",
    "MSR_IA32_CR_PAT",
    "MSR_MTRR_CAP",
    "MSR_MTRR_DEF_TYPE",
    "MTRRCAP_VALUE",
    "MTRR_DEF_TYPE_E",
    "MTRR_DEF_TYPE_FE",
    "PAT_DEFAULT",
    "PAT_TYPE_MASK",
    "MemType",
    "MemtypeHost",
    "MemtypeVM",
    "MemtypeVcpu",
    "MemtypeVmConfig",
    "MtrrLookup",
    "MtrrState",
    "check_pat_write",
    "common_cr0_changed",
    "common_max_mapping_level",
    "common_msr_written",
    "effective_type",
    "host_mtrr_type",
    "is_mtrr_msr",
    "kvm_pat_valid",
    "make_pat",
    "mtrr_physbase",
    "mtrr_physmask",
    "pat_entries",
    "pat_index",
    "pat_type",
    "pat_valid",
    "refuse_unsupported_quirks",
    "valid_mtrr_type",
    "valid_pat_type",
    "vcpu_or_first",
    "x86_pte_spte_format",
]

#: CR0.NW (bit 29) and CR0.CD (bit 30).
CR0_NW = 1 << 29
CR0_CD = 1 << 30

#: Alias of :func:`kvm_pat_valid` (the name ``kvmmu.vcpu`` uses).
pat_valid = kvm_pat_valid

#: Every memory type by its report label, in encoding order.
MEMTYPE_LABELS: dict[str, MemType] = {t.label: t for t in MemType}


class MemtypeVmConfig(Protocol):
    """The VM config fields the memory-type code reads."""

    @property
    def tdp(self) -> bool: ...

    @property
    def host_self_snoop(self) -> bool: ...

    @property
    def host_maxphyaddr(self) -> int: ...


class MemtypeVcpu(Protocol):
    """The vCPU state the memory-type code reads (guest-visible CR0, PAT, MTRRs)."""

    @property
    def cr0(self) -> int: ...

    @property
    def pat(self) -> int: ...

    @property
    def mtrr(self) -> MtrrState: ...

    @property
    def index(self) -> int: ...


class MemtypeHost(Protocol):
    """Host physical memory: the host MTRR type of an address."""

    def memtype_of(self, hpa: int) -> MemType: ...


class MemtypeVM(Protocol):
    """The narrow view of ``kvmmu.VM`` that vendor memory-type code uses."""

    @property
    def config(self) -> MemtypeVmConfig: ...

    @property
    def era(self) -> KernelVersion: ...

    @property
    def quirks(self) -> int: ...

    @property
    def noncoherent_dma_count(self) -> int: ...

    @property
    def vcpus(self) -> Sequence[MemtypeVcpu]: ...

    @property
    def host(self) -> MemtypeHost: ...

    def has_quirk(self, bit: int) -> bool: ...

    def zap_gfn_range(self, start: int, end: int) -> None: ...


def vcpu_or_first(vm: MemtypeVM, vcpu: MemtypeVcpu | None) -> MemtypeVcpu:
    """``vcpu``, or vCPU 0 for paths without a vCPU (hookspecs ``kvmmu_get_mt_mask``)."""
    return vcpu if vcpu is not None else vm.vcpus[0]


def host_mtrr_type(vm: MemtypeVM, hpa: int) -> MemType:
    """The host MTRR type of ``hpa`` (``vm.host.memtype_of``).

    A host type of UC- (a PAT-only type) is taken as UC, the MTRR type such a
    mapping has on a Linux host.
    """
    t = MemType(vm.host.memtype_of(hpa))
    return MemType.UC if t is MemType.UC_MINUS else t


def _honors_guest_mtrrs(vm: MemtypeVM, *, ept: bool) -> bool:
    """``kvm_mmu_honors_guest_mtrrs`` (6.0–6.10): EPT and noncoherent DMA."""
    return ept and vm.noncoherent_dma_count > 0


def common_msr_written(vm: MemtypeVM, vcpu: MemtypeVcpu, index: int, *, ept: bool) -> None:
    """``update_mtrr`` after an accepted MTRR write (``arch/x86/kvm/mtrr.c``).

    spec/memtype.md §4 "Writes" and §11.2: 4.2–6.6 zap when TDP is on and the
    VM has noncoherent DMA; 6.7–6.10 only while guest MTRRs are honoured
    (EPT and noncoherent DMA, 9a3768191d95). PAT writes never zap. No zap
    before 4.2 or from 6.11 (MTRR virtualization removed).
    """
    era = vm.era
    if era < (4, 2) or era >= (6, 11) or not is_mtrr_msr(index):
        return
    if era >= (6, 7):
        if not _honors_guest_mtrrs(vm, ept=ept):
            return
    elif not (vm.config.tdp and vm.noncoherent_dma_count > 0):
        return
    span = vcpu.mtrr.zap_range_after_write(index)
    if span is not None:
        vm.zap_gfn_range(*span)


def common_cr0_changed(vm: MemtypeVM, old: int, new: int, *, ept: bool) -> None:
    """The CR0.CD zap of ``kvm_post_set_cr0`` (``arch/x86/kvm/x86.c``).

    spec/memtype.md §11.2: when CD toggles, 4.2–6.6 zap everything if the
    VM has noncoherent DMA and ``CD_NW_CLEARED`` is disabled; 6.7–6.10
    additionally require that guest MTRRs are honoured (EPT, 7a18c7c2b69a).
    Removed in 6.11 (e1548088ff54).
    """
    era = vm.era
    if era < (4, 2) or era >= (6, 11) or not (old ^ new) & CR0_CD:
        return
    if vm.noncoherent_dma_count == 0 or vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED):
        return
    if era >= (6, 7) and not ept:
        return
    vm.zap_gfn_range(0, ALL_GFNS_END)


def common_max_mapping_level(
    vm: MemtypeVM, vcpu: MemtypeVcpu | None, gfn: int, max_level: int, *, ept: bool
) -> int | None:
    """The MTRR-consistency level cap of the TDP fault path (spec/memtype.md §8).

    4.2–5.19: on every TDP fault; 6.0–6.10: only with ``shadow_memtype_mask``
    (EPT) and noncoherent DMA (d5e90a699875); none before 4.2 or from 6.11.
    Returns ``None`` when no cap applies.
    """
    era = vm.era
    if era < (4, 2) or era >= (6, 11) or not vm.config.tdp:
        return None
    if era >= (6, 0) and not _honors_guest_mtrrs(vm, ept=ept):
        return None
    return vcpu_or_first(vm, vcpu).mtrr.max_mapping_level(gfn, max_level)


def x86_pte_spte_format(name: str, *, host_maxphyaddr: int, root_level: int = 4) -> SpteFormat:
    """The ordinary x86 PTE format of NPT and shadow-paging SPTEs.

    ``kvm_mmu_reset_all_pte_masks`` (``arch/x86/kvm/mmu/spte.c``;
    spec/kvm-mmu.md §4.2–4.3): P bit 0, U bit 2, A bit 5, D bit 6, NX bit 63,
    host-writable bit 9, MMU-writable bit 10; MMIO SPTEs are
    ``BIT(51) | P`` (value and mask) while the host MAXPHYADDR is below 52,
    otherwise MMIO caching is off (0); MMIO access mask W|U; no memtype bits
    (PAT index 0, i.e. host PAT0 = WB).
    """
    mmio = (1 << 51) | 1 if host_maxphyaddr < 52 else 0
    return SpteFormat(
        name=name,
        present_mask=1,
        user_mask=1 << 2,
        x_mask=0,
        nx_mask=1 << 63,
        accessed_mask=1 << 5,
        dirty_mask=1 << 6,
        host_writable_mask=1 << 9,
        mmu_writable_mask=1 << 10,
        mmio_value=mmio,
        mmio_mask=mmio,
        mmio_access_mask=ACC_WRITE_MASK | ACC_USER_MASK,
        acc_track_mask=0,
        memtype_mask=0,
        ad_enabled=True,
        root_level=root_level,
    )


def refuse_unsupported_quirks(vm: MemtypeVM, supported: int) -> None:
    """Refuse a VM whose config disables a quirk outside ``supported``.

    ``KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)`` fails with EINVAL when
    ``args[0]`` has bits outside ``kvm_caps.supported_quirks``
    (spec/memtype.md §11.4); from 6.16 VMX drops ``IGNORE_GUEST_PAT`` from
    that set on CPUs without self-snoop (``vmx_hardware_setup``; consumers.md
    M5). Only quirks that exist in the VM's era are considered: the disabled
    ones are those the era has and ``vm.quirks`` lacks.
    """
    existing = 0
    for bit, first in QUIRKS.values():
        if vm.era >= KernelVersion(first):
            existing |= bit
    bad = existing & ~vm.quirks & ~supported
    if bad:
        names = ", ".join(
            f"KVM_X86_QUIRK_{name.upper()}" for name, (bit, _) in QUIRKS.items() if bad & bit
        )
        raise KvmError(
            errno.EINVAL,
            f"KVM_CAP_DISABLE_QUIRKS2: cannot disable {names}: not in supported_quirks "
            f"of kernel {vm.era} on this host",
        )
