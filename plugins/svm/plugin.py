"""The AMD SVM vendor plugin: NPT SPTE format and NPT memory types by era."""

from __future__ import annotations

from typing import Any

from kvmmu.era import era_of
from kvmmu.hookspecs import hookimpl
from kvmmu.memtype import (
    CR0_CD,
    CR0_NW,
    MemType,
    MemtypeVcpu,
    MemtypeVM,
    common_cr0_changed,
    common_max_mapping_level,
    common_msr_written,
    effective_type,
    host_mtrr_type,
    x86_pte_spte_format,
)
from kvmmu.mtrr import ALL_GFNS_END
from kvmmu.plugins.svm.combine import npt_effective_type
from kvmmu.quirks import KVM_X86_QUIRK_CD_NW_CLEARED, KVM_X86_QUIRK_IGNORE_GUEST_PAT
from kvmmu.spte import SpteFormat
from pydantic import BaseModel, ConfigDict

__all__ = ["SVM_ERAS", "SvmConfig", "SvmPlugin"]

#: Eras in which SVM memory-type behaviour differs: the CD_NW_CLEARED quirk
#: and guest-MTRR huge-page checks (4.2), ``svm_get_mt_mask`` deleted (6.0),
#: zap conditions narrowed to EPT (6.7), MTRR virtualization removed (6.11),
#: ``IGNORE_GUEST_PAT`` inapplicable (6.16).
SVM_ERAS = ("2.6.32", "4.2", "6.0", "6.7", "6.11", "6.16")
_CR0_PG = 1 << 31
_CR0_WP = 1 << 16


class SvmConfig(BaseModel):
    """Options of the ``svm`` plugin (``[plugins.svm]``)."""

    model_config = ConfigDict(extra="forbid")

    #: 5-level NPT (host with LA57); otherwise 4-level.
    npt_5level: bool = False


class SvmPlugin:
    """AMD SVM with NPT: x86-PTE SPTEs, gPAT follows the guest PAT, no EPT memtype.

    Noncoherent DMA registration does not zap on SVM with NPT: the 6.7–6.15
    condition is a non-zero ``shadow_memtype_mask`` (0 on NPT) and from 6.16
    the quirk is inapplicable (disabled at VM creation). With shadow paging
    in 6.16 the quirk is unsupported, so it stays enabled and the common
    code zaps (spec/memtype.md §9, §11.1).
    """

    name = "svm"
    kind = "vendor"
    ERAS = SVM_ERAS
    #: ``svm_hardware_setup`` clears only ``CD_NW_CLEARED`` from
    #: ``inapplicable_quirks``: from 6.16 ``IGNORE_GUEST_PAT`` starts
    #: disabled on SVM (when supported, i.e. with NPT; spec/memtype.md §9, §11.4).
    APPLICABLE_CONDITIONAL_QUIRKS = KVM_X86_QUIRK_CD_NW_CLEARED

    def __init__(self, vm: Any, config: SvmConfig | None = None) -> None:
        self.vm: MemtypeVM = vm
        self.config = config if config is not None else SvmConfig()

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[BaseModel]:
        return SvmConfig

    @hookimpl
    def kvmmu_spte_format(self, vm: MemtypeVM) -> SpteFormat:
        """``kvm_mmu_reset_all_pte_masks``: NPT and shadow paging share the x86 PTE format."""
        return x86_pte_spte_format(
            "npt" if vm.config.tdp else "shadow",
            host_maxphyaddr=vm.config.host_maxphyaddr,
            root_level=5 if self.config.npt_5level else 4,
        )

    @hookimpl
    def kvmmu_get_mt_mask(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu | None, gfn: int, is_mmio: bool
    ) -> int | None:
        """``svm_get_mt_mask`` returned 0 (≤ 5.19); deleted in 6.0 (``None``).

        spec/kvm-mmu.md §4.6: either way no memtype is folded into NPT SPTEs.
        """
        if vm.config.tdp and vm.era < (6, 0):
            return 0
        return None

    @hookimpl
    def kvmmu_effective_memtype(
        self,
        vm: MemtypeVM,
        vcpu: MemtypeVcpu,
        spte: int,
        guest_pat_type: MemType | None,
        hpa: int,
    ) -> MemType:
        """Hardware CR0.CD -> UC; NPT: gPAT with host PAT0/MTRR; shadow: host MTRR.

        AMD virtualizes CR0.CD, so a guest CD that reaches hardware (quirk
        ``CD_NW_CLEARED`` disabled) makes accesses uncached (spec §9, §11.3).
        Shadow paging ignores the guest PAT: the SPTE selects host PAT0 = WB
        (spec/kvm-mmu.md §4.2).
        """
        if self.kvmmu_hardware_cr0(vm, vcpu, vcpu.cr0) & CR0_CD:
            return MemType.UC
        host = host_mtrr_type(vm, hpa)
        if not vm.config.tdp:
            return effective_type(host, MemType.WB)
        return npt_effective_type(guest_pat_type, host)

    @hookimpl
    def kvmmu_hardware_cr0(self, vm: MemtypeVM, vcpu: MemtypeVcpu, cr0: int) -> int:
        """``svm_set_cr0`` (spec/memtype.md §11.3).

        Without NPT hardware runs with PG and WP forced on. CD and NW are
        cleared while ``KVM_X86_QUIRK_CD_NW_CLEARED`` is enabled, and always
        before the quirk existed (4.2).
        """
        hcr0 = cr0
        if not vm.config.tdp:
            hcr0 |= _CR0_PG | _CR0_WP
        if vm.era < (4, 2) or vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED):
            hcr0 &= ~(CR0_CD | CR0_NW)
        return hcr0

    @hookimpl
    def kvmmu_max_mapping_level(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu | None, gfn: int, max_level: int
    ) -> int | None:
        """Guest-MTRR huge-page check on every NPT fault in 4.2–5.19 (spec §8)."""
        return common_max_mapping_level(vm, vcpu, gfn, max_level, ept=False)

    @hookimpl
    def kvmmu_cr0_changed(self, vm: MemtypeVM, vcpu: MemtypeVcpu, old: int, new: int) -> None:
        """CR0.CD toggle zap, common x86 code: 4.2–6.6 only on SVM (spec §11.2)."""
        common_cr0_changed(vm, old, new, ept=False)

    @hookimpl
    def kvmmu_msr_written(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu, index: int, old: int, new: int
    ) -> None:
        """``update_mtrr`` zaps, common x86 code: 4.2–6.6 with NPT and noncoherent DMA."""
        common_msr_written(vm, vcpu, index, ept=False)

    @hookimpl
    def kvmmu_noncoherent_dma_changed(self, vm: MemtypeVM, old_count: int, new_count: int) -> None:
        """``kvm_noncoherent_dma_assignment_start_or_stop`` on SVM (spec §11.1).

        6.7–6.15: ``shadow_memtype_mask`` is 0 on SVM, never a zap. From 6.16
        ``kvm_mmu_may_ignore_guest_pat`` is the per-VM ``IGNORE_GUEST_PAT``
        check: disabled on SVM with NPT (inapplicable), still enabled with
        shadow paging (unsupported, so not in ``inapplicable & supported``),
        where the first and last registration zap every gfn.
        """
        if vm.era < (6, 16):
            return
        if (old_count, new_count) not in ((0, 1), (1, 0)):
            return
        if vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT):
            vm.zap_gfn_range(0, ALL_GFNS_END)

    @hookimpl
    def kvmmu_report_section(self, vm: MemtypeVM) -> dict[str, Any]:
        return {
            "vendor": "svm",
            "era": era_of(vm.era, SVM_ERAS),
            "spte_format": "npt" if vm.config.tdp else "shadow",
            "gpat": "guest PAT",
            "amd_combination_table": "unverified (docs/svm-memtype.md)",
        }
