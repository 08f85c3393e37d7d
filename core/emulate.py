"""Retry instead of emulate: ``EMULTYPE_ALLOW_RETRY_PF`` (spec/kvm-mmu.md §2.3 item 6, §3.2).

When the fault path says EMULATE for a write to a write-protected gfn, KVM
may *unprotect* the gfn (zap the shadow pages that keep it read-only) and
re-enter the guest so the CPU runs the instruction itself, instead of
emulating it. That only helps when the page is protected because KVM
shadows it; a gfn an external user (KVMGT) write-tracks stays protected, and
the retried instruction faults again.

:func:`retry_instead_of_emulate` is the decision, taken where the model's
fault loops see ``RET_PF_EMULATE`` (``kvmmu.vcpu`` for TDP, ``ShadowMmu.access``
for shadow paging). True means "resume the guest": the loop re-executes the
access. Per era (:data:`RETRY_ERAS`):

* before 3.2: no retry path (the stored ~3.1 ``arch/x86/kvm/x86.c`` has only
  ``reexecute_instruction``, for emulation *failure*, which the model does
  not produce);
* 3.2-6.11: ``kvm_mmu_page_fault`` sets ``EMULTYPE_ALLOW_RETRY_PF`` on any
  EMULATE whose address is not in the MMIO cache; ``retry_instruction``
  (x86.c) then always retries once per (rip, address) -- even when
  ``kvm_mmu_unprotect_page`` found nothing to zap (KVMGT, TDP, a write to a
  READONLY memslot): one extra fault round trip before the emulation;
* 6.12+: the fault says ``RET_PF_WRITE_PROTECTED`` (only for a write to a
  write-protected gfn), ``kvm_mmu_write_protect_fault`` (mmu.c) applies the
  (rip, address) guard and ``kvm_mmu_unprotect_gfn_and_retry`` retries only
  if a shadow page was actually zapped (series "KVM: x86: Fix multiple #PF RO
  infinite loop bugs", Aug 2024, merged for 6.12).

The model's access is one instruction with no rip. The retry guard
(``vcpu->arch.last_retry_eip`` / ``last_retry_addr``) compares
``vcpu.access(..., rip=)`` when given, else a fresh identity per access, and
the fault address (cr2 under shadow paging, the gpa under TDP). The decoder's
``PageTable`` tag (``x86_page_table_writing_insn``) is :data:`INSNS` by name;
a plain MOV is tagged, so the default access is never retried.
Decisions: docs/decisions.md "Retry instead of emulate".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from kvmmu.era import KernelVersion

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu

__all__ = ["INSNS", "RETRY_ERAS", "Insn", "is_page_table_writing_insn", "retry_instead_of_emulate"]

#: Instructions an access may name, and whether KVM's decoder tags them
#: ``PageTable`` (``arch/x86/kvm/emulate.c`` opcode tables): MOV r/m,reg
#: (0x88/0x89) and MOV r/m,imm (0xC6/0xC7, group11) and XCHG (0x86/0x87) are
#: tagged; STOS (0xAA/0xAB), MOVS (0xA4/0xA5) and ADD are not.
INSNS: dict[str, bool] = {"mov": True, "xchg": True, "stos": False, "movs": False, "add": False}
Insn = Literal["mov", "xchg", "stos", "movs", "add"]

#: First versions of the retry eras (see the module docstring).
RETRY_ERAS = ("3.2", "6.12")
_RETRY_INSTRUCTION = KernelVersion(RETRY_ERAS[0])
_WRITE_PROTECTED = KernelVersion(RETRY_ERAS[1])


def is_page_table_writing_insn(insn: str) -> bool:
    """``x86_page_table_writing_insn`` (emulate.c): ``ctxt->d & PageTable``."""
    return INSNS[insn]


def retry_instead_of_emulate(vcpu: VCpu, addr: int, gpa: int, write: bool) -> bool:
    """After ``RET_PF_EMULATE`` for ``addr`` (cr2 or gpa): resume the guest instead?

    ``kvm_mmu_page_fault`` -> ``x86_emulate_instruction``'s retry step, per
    era. True: the gfn was unprotected (or, before 6.12, unprotect was
    tried) and the instruction is to be re-executed; ``vm.stats
    ["emulation_retries"]`` counts it.
    """
    vm = vcpu.vm
    era = vm.era
    if era < _RETRY_INSTRUCTION:
        return False
    slot = vm.memslots.gfn_to_memslot(gpa >> 12)
    # No memslot: MMIO. Either the fault came from an MMIO SPTE (goto emulate,
    # no flag) or kvm_handle_noslot_fault just cached the MMIO info, so
    # mmio_info_in_cache() is true (mmu.c: kvm_mmu_page_fault). Never retried.
    mmio = slot is None or slot.is_invalid
    rip = vcpu.insn_rip
    insn = vcpu.insn
    if era < _WRITE_PROTECTED:
        # arch/x86/kvm/x86.c: retry_instruction (called for every decoded #PF
        # emulation): remember the last (eip, addr), then reset it.
        last = (vcpu.last_retry_eip, vcpu.last_retry_addr)
        vcpu.last_retry_eip = vcpu.last_retry_addr = None
        # mmu.c: kvm_mmu_page_fault sets EMULTYPE_ALLOW_RETRY_PF when
        # !mmio_info_in_cache && !is_guest_mode (no nested guests in the model).
        if mmio or is_page_table_writing_insn(insn) or last == (rip, addr):
            return False
        vcpu.last_retry_eip, vcpu.last_retry_addr = rip, addr
        # kvm_mmu_gva_to_gpa_write gives the fault's gpa (same walk, same
        # access); kvm_mmu_unprotect_page's result is ignored: always retry.
        vm.mmu.unprotect_page(gpa >> 12)
        vm.stats["emulation_retries"] += 1
        return True
    # 6.12+: RET_PF_WRITE_PROTECTED only from page_fault_handle_page_track or a
    # write fault whose SPTE make_spte write-protected; a write to a READONLY
    # slot (KVM_PFN_ERR_RO_FAULT) and MMIO stay RET_PF_EMULATE (mmu.c).
    if mmio or not write or slot is None or slot.is_readonly:
        return False
    # mmu.c: kvm_mmu_write_protect_fault: the same rip and address as the last
    # unprotect+retry -> emulate (and keep the guard); else reset the guard.
    if (vcpu.last_retry_eip, vcpu.last_retry_addr) == (rip, addr):
        return False
    vcpu.last_retry_eip = vcpu.last_retry_addr = None
    # x86.c: x86_emulate_instruction: ALLOW_RETRY_PF && !page-table-writing insn
    # && kvm_mmu_unprotect_gfn_and_retry.
    if is_page_table_writing_insn(insn):
        return False
    # mmu.c: kvm_mmu_unprotect_gfn_and_retry: nothing to do without indirect
    # shadow pages (TDP); retry iff a shadow page was zapped, then arm the guard.
    if not vm.mmu.indirect_shadow_pages:
        return False
    if not vm.mmu.unprotect_page(gpa >> 12):
        return False
    vcpu.last_retry_eip, vcpu.last_retry_addr = rip, addr
    vm.stats["emulation_retries"] += 1
    return True
