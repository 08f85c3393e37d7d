"""The Intel VMX vendor plugin: EPT SPTE format and EPT memory types by era."""

from __future__ import annotations

from typing import Any

from kvmmu.errors import ConfigError
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
    refuse_unsupported_quirks,
    vcpu_or_first,
    x86_pte_spte_format,
)
from kvmmu.mtrr import ALL_GFNS_END
from kvmmu.plugins.vmx.mt_mask import (
    VMX_MT_MASK_ERAS,
    ept_memtype,
    vmx_get_mt_mask_row,
    vmx_mt_mask_row,
)
from kvmmu.pml import PML_LOG_NR_ENTRIES
from kvmmu.quirks import (
    KVM_X86_QUIRK_CD_NW_CLEARED,
    KVM_X86_QUIRK_IGNORE_GUEST_PAT,
    supported_quirks,
)
from kvmmu.spte import (
    MMIO_SPTE_GEN_LAYOUT,
    MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH,
    SPTE_MMU_PRESENT_HIGH_MASK,
    SPTE_MMU_PRESENT_MASK,
    SpteFormat,
)
from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["VMX_EPT_SUPPRESS_VE_BIT", "VmxConfig", "VmxPlugin", "ept_spte_format"]

#: ``VMX_EPT_SUPPRESS_VE_BIT`` (bit 63, spec/kvm-mmu.md §4.1).
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
_R, _W, _X = 1, 2, 4
_VMX_EPT_MISCONFIG_WX_VALUE = _W | _X


class VmxConfig(BaseModel):
    """Options of the ``vmx`` plugin (``[plugins.vmx]``)."""

    model_config = ConfigDict(extra="forbid")

    #: ``enable_ept_ad_bits``: EPT accessed/dirty bits (``kvm_ad_enabled``).
    ept_ad: bool = True
    #: 5-level EPT (``VMX_EPTP_PWL_5``); otherwise 4-level.
    ept_5level: bool = False
    #: The CPU supports execute-only EPT entries (``cpu_has_vmx_ept_execute_only``).
    ept_exec_only: bool = True
    #: ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH`` (RFC "Sharing KVM TDP to IOMMU",
    #: spec/consumers.md T6 [TDP-24]): ``SPTE_MMU_PRESENT_MASK`` at bit 59,
    #: bit 11 reserved in shadow-present SPTEs, and the MMIO generation split
    #: 3-11 / 52-58 / 60-62. Needed to share the EPT with VT-d.
    mmu_present_high: bool = False
    #: Overlapping guest variable MTRRs in 4.2–6.10: follow
    #: ``kvm_mtrr_get_guest_memory_type``'s loop literally, where a UC range
    #: visited before a differing non-UC one gives WB, instead of the spec's
    #: "UC in any overlapping range wins" (spec/memtype.md §4 rule 5, §6).
    mtrr_kvm_visit_order: bool = False
    #: ``enable_pml``: page-modification logging for dirty logging
    #: (spec/kvm-mmu-2.md §7; :mod:`kvmmu.pml`). The kernel turns it on by
    #: default where the CPU has it; the model leaves it off unless asked, so
    #: dirty logging works by write-protection on both vendors by default
    #: (docs/decisions.md). Needs EPT (``tdp``), EPT A/D bits and 4.0+.
    pml: bool = False

    @model_validator(mode="after")
    def _pml_needs_ept_ad(self) -> VmxConfig:
        # vmx.c hardware_setup: !enable_ept || !enable_ept_ad_bits -> enable_pml = 0
        if self.pml and not self.ept_ad:
            raise ValueError("pml needs EPT A/D bits (ept_ad = true): enable_pml requires them")
        return self


def ept_spte_format(vm: MemtypeVM, config: VmxConfig) -> SpteFormat:
    """The EPT masks of ``kvm_mmu_set_ept_masks(has_ad, has_exec_only)``.

    spec/kvm-mmu.md §4.3, EPT column: R is ``shadow_user_mask``; X bit 2;
    no NX; A bit 8, D bit 9; host-writable bit 57, MMU-writable bit 58;
    present = R, or 0 with execute-only support; MMIO value 110b (W|X, an
    EPT misconfiguration) with mask RWX; acc-track mask RWX;
    ``shadow_memtype_mask`` 0x78 in 6.0–6.15 (removed in 6.16, 3fee4837ef40).
    ``SUPPRESS_VE`` joins the present and MMIO masks from 6.10 (the TDX
    preparation; the exact release is from memory, spec says "recent").
    The A/D masks are kept even without A/D bits (newer kernels set them
    unconditionally); ``ad_enabled`` tells the MMU whether to use them.
    ``mmu_present_high`` moves the MMU-present bit to 59, reserves bit 11 and
    uses the three-piece MMIO generation (spec/consumers.md T6 [TDP-24]).
    """
    era = vm.era
    sve = VMX_EPT_SUPPRESS_VE_BIT if era >= (6, 10) else 0
    high = config.mmu_present_high
    return SpteFormat(
        name="ept",
        present_mask=(0 if config.ept_exec_only else _R) | sve,
        user_mask=_R,
        x_mask=_X,
        nx_mask=0,
        accessed_mask=1 << 8,
        dirty_mask=1 << 9,
        host_writable_mask=1 << 57,
        mmu_writable_mask=1 << 58,
        mmio_value=_VMX_EPT_MISCONFIG_WX_VALUE,
        mmio_mask=_R | _W | _X | sve,
        mmio_access_mask=0,
        acc_track_mask=_R | _W | _X,
        memtype_mask=0x78 if (6, 0) <= era < (6, 16) else 0,
        ad_enabled=config.ept_ad,
        root_level=5 if config.ept_5level else 4,
        mmu_present_mask=SPTE_MMU_PRESENT_HIGH_MASK if high else SPTE_MMU_PRESENT_MASK,
        mmio_gen_layout=MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH if high else MMIO_SPTE_GEN_LAYOUT,
        rsvd_mask=SPTE_MMU_PRESENT_MASK if high else 0,
    )


class VmxPlugin:
    """Intel VMX with EPT: EPT SPTEs and vmx_get_mt_mask per kernel era.

    With ``tdp`` off the VM runs on shadow paging: ordinary x86 PTE SPTEs
    with PAT index 0 and no ``get_mt_mask``.
    """

    name = "vmx"
    kind = "vendor"
    #: Era boundaries reported for this vendor (the rows of spec/memtype.md §7).
    ERAS = VMX_MT_MASK_ERAS
    #: Quirks ``vmx_hardware_setup`` drops from ``supported_quirks`` on a host
    #: without self-snoop, so they cannot be disabled there (spec/memtype.md §7).
    QUIRKS_REQUIRING_SELF_SNOOP = KVM_X86_QUIRK_IGNORE_GUEST_PAT
    #: ``vmx_hardware_setup`` clears only ``IGNORE_GUEST_PAT`` from
    #: ``inapplicable_quirks``: from 6.16 ``CD_NW_CLEARED`` starts disabled
    #: on VMX (spec/memtype.md §11.4; it has no VMX effect from 6.11).
    APPLICABLE_CONDITIONAL_QUIRKS = KVM_X86_QUIRK_IGNORE_GUEST_PAT

    def __init__(self, vm: Any, config: VmxConfig | None = None) -> None:
        self.vm: MemtypeVM = vm
        self.config = config if config is not None else VmxConfig()
        check_vmx_quirks(vm)
        if self.config.pml and (not vm.config.tdp or vm.era < (4, 0)):
            # enable_pml needs EPT (vmx.c hardware_setup); PML support came with
            # Kai Huang's 2015 series for 4.0 (the release is from memory).
            got = "tdp = false" if not vm.config.tdp else f"era {vm.era}"
            raise ConfigError(
                [("plugins.vmx.pml", f"PML needs EPT (tdp = true) and a 4.0+ era; got {got}")]
            )
        # A VM's kernel era never changes: resolve it once, not on every fault
        # (era_of re-parsed the version on each get_mt_mask call).
        #: The spec/memtype.md §7 row of ``vm.era``.
        self._mt_row = vmx_mt_mask_row(vm.era)
        #: Whether ``common_max_mapping_level`` can cap at all in this era
        #: (4.2-6.10, spec/memtype.md §8); outside it every call returns None.
        self._mtrr_cap_era = (4, 2) <= vm.era < (6, 11)

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[BaseModel]:
        return VmxConfig

    # ------------------------------------------------------------ format

    @hookimpl
    def kvmmu_spte_format(self, vm: MemtypeVM) -> SpteFormat:
        """EPT masks with TDP, else the shadow-paging x86 PTE masks."""
        if not vm.config.tdp:
            return x86_pte_spte_format("shadow", host_maxphyaddr=vm.config.host_maxphyaddr)
        return ept_spte_format(vm, self.config)

    # ---------------------------------------------------------- memtypes

    @hookimpl
    def kvmmu_get_mt_mask(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu | None, gfn: int, is_mmio: bool
    ) -> int | None:
        """``vmx_get_mt_mask`` of ``vm.era`` (spec/memtype.md §7).

        ``None`` without EPT: ``make_spte`` folds a memtype in only with
        ``tdp_enabled`` (≤ 5.19), a non-zero ``shadow_memtype_mask``
        (6.0–6.15), or a non-NULL ``get_mt_mask`` (6.16+, NULL without EPT).
        """
        if not vm.config.tdp:
            return None
        v = vcpu_or_first(vm, vcpu)
        return vmx_get_mt_mask_row(
            self._mt_row,
            is_mmio=is_mmio,
            noncoherent_dma=vm.noncoherent_dma_count > 0,
            guest_cd=bool(v.cr0 & CR0_CD),
            cd_nw_cleared=vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED),
            ignore_guest_pat=vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT),
            self_snoop=vm.config.host_self_snoop,
            guest_mtrr_type=lambda: v.mtrr.guest_memory_type(
                gfn, vm.era, kvm_visit_order=self.config.mtrr_kvm_visit_order
            ),
        )

    @hookimpl
    def kvmmu_effective_memtype(
        self,
        vm: MemtypeVM,
        vcpu: MemtypeVcpu,
        spte: int,
        guest_pat_type: MemType | None,
        hpa: int,
    ) -> MemType:
        """SDM Vol 3B §24.2.5.2 (spec/memtype.md §5, §13).

        Hardware CR0.CD -> UC (never on VMX: ``KVM_VM_CR0_ALWAYS_OFF``);
        IPAT -> the EPT memtype; otherwise Table 11-7 with the EPT memtype
        in the MTRR role and the guest PAT type (WB with guest paging off,
        unverified in the spec). Shadow paging: the SPTE selects host PAT0
        (WB), so the host MTRR type of ``hpa`` decides and guest PAT, MTRRs
        and CR0.CD have no effect (spec/kvm-mmu.md §4.2).
        """
        if self.kvmmu_hardware_cr0(vm, vcpu, vcpu.cr0) & CR0_CD:
            return MemType.UC
        if not vm.config.tdp:
            return effective_type(host_mtrr_type(vm, hpa), MemType.WB)
        raw, ipat = ept_memtype(spte)
        if raw not in (0, 1, 4, 5, 6):
            raise ValueError(f"EPT misconfiguration: leaf memtype {raw} in SPTE {spte:#x}")
        mt = MemType(raw)
        if ipat:
            return mt
        return effective_type(mt, guest_pat_type if guest_pat_type is not None else MemType.WB)

    @hookimpl
    def kvmmu_hardware_cr0(self, vm: MemtypeVM, vcpu: MemtypeVcpu, cr0: int) -> int:
        """``KVM_VM_CR0_ALWAYS_OFF`` = NW | CD: never set in hardware (spec §11.3)."""
        return cr0 & ~(CR0_CD | CR0_NW)

    @hookimpl
    def kvmmu_pae_pdptes_in_registers(self, vm: MemtypeVM) -> bool:
        """EPT: the CPU uses the VMCS ``GUEST_PDPTRn`` fields (``ept_load_pdptrs``)."""
        return bool(vm.config.tdp)

    @hookimpl
    def kvmmu_cpu_dirty_log_size(self, vm: MemtypeVM) -> int | None:
        """``vmx_x86_ops.cpu_dirty_log_size``: ``PML_LOG_NR_ENTRIES`` with PML."""
        return PML_LOG_NR_ENTRIES if self.config.pml else None

    @hookimpl
    def kvmmu_max_mapping_level(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu | None, gfn: int, max_level: int
    ) -> int | None:
        """MTRR-consistent huge pages: 4.2–5.19 always, 6.0–6.10 with noncoherent DMA."""
        if not self._mtrr_cap_era:
            return None
        return common_max_mapping_level(vm, vcpu, gfn, max_level, ept=vm.config.tdp)

    # -------------------------------------------------------------- zaps

    @hookimpl
    def kvmmu_noncoherent_dma_changed(self, vm: MemtypeVM, old_count: int, new_count: int) -> None:
        """``kvm_noncoherent_dma_assignment_start_or_stop`` (6.7+, 68c320298404).

        On the 0->1 and 1->0 transitions zap every gfn if
        ``kvm_mmu_may_ignore_guest_pat``: EPT in 6.7–6.15, the per-VM
        ``IGNORE_GUEST_PAT`` quirk from 6.16 (spec/memtype.md §11.1; M4).
        6.11 as released (377b2f359d1f, reverted by 9d70f3fec144) tested
        ``!X86_FEATURE_SELFSNOOP && shadow_memtype_mask``: with self-snoop the
        guest PAT was always honoured, so registration did not zap.
        """
        if vm.era < (6, 7) or not _first_or_last(old_count, new_count):
            return
        if vm.era >= (6, 16):
            may_ignore = vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
        elif self._mt_row == "6.11":
            may_ignore = vm.config.tdp and not vm.config.host_self_snoop
        else:
            may_ignore = vm.config.tdp
        if may_ignore:
            vm.zap_gfn_range(0, ALL_GFNS_END)

    @hookimpl
    def kvmmu_cr0_changed(self, vm: MemtypeVM, vcpu: MemtypeVcpu, old: int, new: int) -> None:
        """CR0.CD toggle zap of ``kvm_post_set_cr0`` (4.2–6.10, spec §11.2)."""
        common_cr0_changed(vm, old, new, ept=vm.config.tdp)

    @hookimpl
    def kvmmu_msr_written(
        self, vm: MemtypeVM, vcpu: MemtypeVcpu, index: int, old: int, new: int
    ) -> None:
        """``update_mtrr`` zaps after MTRR writes (4.2–6.10, spec §4, §11.2)."""
        common_msr_written(vm, vcpu, index, ept=vm.config.tdp)

    # ------------------------------------------------------------ report

    @hookimpl
    def kvmmu_report_section(self, vm: MemtypeVM) -> dict[str, Any]:
        fmt = self.kvmmu_spte_format(vm)
        return {
            "vendor": "vmx",
            "era": self._mt_row,
            "spte_format": fmt.name,
            "memtype_mask": fmt.memtype_mask,
            "get_mt_mask": bool(vm.config.tdp),
            "ept_ad": self.config.ept_ad,
            "root_level": fmt.root_level,
        }


def _first_or_last(old_count: int, new_count: int) -> bool:
    """``atomic_inc_return == 1`` or ``atomic_dec_return == 0``."""
    return (old_count == 0 and new_count == 1) or (old_count == 1 and new_count == 0)


def check_vmx_quirks(vm: MemtypeVM) -> None:
    """Refuse disabling a quirk VMX does not support on this host and era.

    ``supported_quirks`` lacks ``IGNORE_GUEST_PAT`` from 6.16 when the host
    CPU has no self-snoop (consumers.md M5; spec/memtype.md §7): KVM fails
    ``KVM_CAP_DISABLE_QUIRKS2`` with EINVAL.
    """
    refuse_unsupported_quirks(
        vm,
        supported_quirks(vm.era, self_snoop=vm.config.host_self_snoop, tdp=vm.config.tdp),
    )
