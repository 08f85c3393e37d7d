"""Page-modification logging: Intel PML as KVM drives it (spec/kvm-mmu-2.md §7).

With PML (``enable_pml``: VMX, EPT with A/D bits, Linux 4.0+) dirty logging
keeps 4K SPTEs writable with D clear instead of write-protecting them
(``kvm_mmu_slot_apply_flags``: ``kvm_mmu_slot_leaf_clear_dirty`` plus a
write-protect of the huge SPTEs only, §7.1). A guest write that sets D on a
leaf does not exit: the CPU appends the 4K-aligned gpa to the vCPU's
512-entry log (§7.2). KVM moves the log into the dirty bitmap
(``vmx_flush_pml_buffer`` -> ``kvm_vcpu_mark_page_dirty``):

* on every VM exit (``vmx_handle_exit`` flushes first);
* on the PML-full exit, taken when a gpa is to be logged with all 512
  entries used;
* before userspace harvests the bitmap: ``kvm_arch_sync_dirty_log`` kicks
  every vCPU, which exits (``KVM_GET_DIRTY_LOG`` / ``KVM_CLEAR_DIRTY_LOG``).

The CPU logs only while the VMCS enables PML, which KVM keeps on exactly
while some memslot logs dirty pages (``kvm_mmu_update_cpu_dirty_logging`` on
``nr_memslots_dirty_logging`` 0 <-> 1). Harvested pages are re-armed by
clearing D (``kvm_mmu_clear_dirty_pt_masked``), not W.

Not modelled: L2 (``SPTE_TDP_AD_WRPROT_ONLY``), the dirty ring, and D set by
EPT accesses to guest paging structures (the model's guest walk does not go
through the EPT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu

__all__ = ["PML_LOG_NR_ENTRIES", "PmlLog"]

#: ``PML_LOG_NR_ENTRIES`` (``arch/x86/kvm/vmx/vmx.h``): entries per vCPU log.
PML_LOG_NR_ENTRIES = 512


class PmlLog:
    """One vCPU's PML buffer: the gpas logged since the last flush, in order."""

    def __init__(self, vcpu: VCpu, size: int = PML_LOG_NR_ENTRIES) -> None:
        self.vcpu = vcpu
        self.size = size
        self.gpas: list[int] = []

    def __len__(self) -> int:
        return len(self.gpas)

    def enabled(self) -> bool:
        """PML is on in the VMCS: the vendor has it and some slot logs dirty pages."""
        vm = self.vcpu.vm
        return self.size > 0 and vm.memslots.nr_memslots_dirty_logging > 0

    def log(self, gpa: int) -> None:
        """The CPU set D on a leaf: append ``gpa`` (4K aligned).

        With the log full, the write first takes the PML-full exit (which
        flushes, as every exit does), then logs into the emptied buffer.
        """
        if not self.enabled():
            return
        vm = self.vcpu.vm
        if len(self.gpas) >= self.size:
            vm.stats["pml_full_exits"] += 1
            self.flush()
        self.gpas.append(gpa & ~0xFFF)
        vm.stats["pml_logged"] += 1

    def flush(self) -> int:
        """``vmx_flush_pml_buffer``: mark every logged gfn dirty; return how many.

        ``kvm_vcpu_mark_page_dirty`` looks the gfn up in the vCPU's address
        space; a gfn whose slot no longer logs (or no longer exists) is
        dropped, as ``mark_page_dirty_in_slot`` drops it.
        """
        if not self.gpas:
            return 0
        vm = self.vcpu.vm
        memslots = vm.memslots
        gfns = np.unique(np.asarray(self.gpas, dtype=np.int64) >> 12)
        n = len(self.gpas)
        self.gpas.clear()
        slot = None
        run: list[int] = []
        for gfn in gfns.tolist():
            if slot is None or not slot.contains(gfn):
                if run:
                    memslots.mark_pages_dirty(slot, np.asarray(run, dtype=np.int64))
                    run = []
                slot = memslots.gfn_to_memslot(gfn, 0)
            if slot is not None:
                run.append(gfn)
        if run:
            memslots.mark_pages_dirty(slot, np.asarray(run, dtype=np.int64))
        vm.stats["pml_flushes"] += 1
        return n
