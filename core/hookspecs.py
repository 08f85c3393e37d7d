"""Hook specifications: every point where plugins join the core.

Every hook is named ``kvmmu_*``. A hookimpl may accept any subset of a hook's
arguments (pluggy passes arguments by name). Unless a hook says
``firstresult``, pluggy calls every implementation and returns the list of
their non-``None`` results.

Call order. pluggy calls the most recently registered plugin first (LIFO), which is
exactly KVM's page-track notifier order: ``hlist_add_head_rcu`` puts a new
notifier at the head of ``track_notifier_list`` and ``__kvm_page_track_write``
walks it from the head (``arch/x86/kvm/mmu/page_track.c``; spec/kvm-mmu.md
§2.1–2.2). The vendor plugin is registered first, so consumers always run
before the vendor on non-firstresult hooks.

Hooks that act on many gfns take numpy arrays (``np.ndarray`` of ``uint64``).

The core never calls ``pm.hook.x`` directly; it goes through
:class:`kvmmu.plugin_host.Hooks`, which names the plugin and the hook in any
error a plugin raises (:class:`kvmmu.errors.PluginError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    import numpy as np
    from kvmmu.memslot import Memslot, MemslotChange
    from kvmmu.memtype import MemType
    from kvmmu.spte import SpteFormat
    from kvmmu.vcpu import VCpu
    from kvmmu.vm import VM
    from pydantic import BaseModel

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "kvmmu"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# Configuration and command line (called on the plugin class, before any VM)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvmmu_config_model() -> type[BaseModel] | None:
    """Return the pydantic model of this plugin's config section.

    Called by the plugin host on the plugin *class*, once per enabled plugin,
    right after the VM config is loaded and before the VM exists (so it must
    be a ``staticmethod``). The model must use ``extra="forbid"``. The
    validated instance is passed to the plugin's constructor as ``config``.
    ``None`` (or no implementation) means the plugin takes no options and a
    non-empty section for it is an error.

    firstresult.
    """


@hookspec
def kvmmu_cli_commands(cli: click.Group) -> None:
    """Add click commands to the ``kvmmu`` command group.

    Called on the plugin class (a ``staticmethod``) when the CLI lists or
    resolves commands; plugins are imported for this only then. A command
    name that already exists is a plugin error.
    """


# --------------------------------------------------------------------------
# Vendor: SPTE format, memory types, hardware CR0, MTRR-related levels
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvmmu_spte_format(vm: VM) -> SpteFormat:
    """Return the SPTE format and TDP capabilities of this vendor.

    Called once when the VM is created (``kvm_mmu_set_ept_masks`` /
    ``kvm_mmu_reset_all_pte_masks``, ``arch/x86/kvm/mmu/spte.c``;
    spec/kvm-mmu.md §4.3). With ``vm.config.tdp`` false the vendor returns
    the shadow-paging (ordinary x86 PTE) format.

    firstresult: only the vendor implements it.
    """


@hookspec(firstresult=True)
def kvmmu_get_mt_mask(vm: VM, vcpu: VCpu | None, gfn: int, is_mmio: bool) -> int | None:
    """Return the memory-type bits ORed into a leaf SPTE for ``gfn``.

    Called by ``make_spte`` for every leaf it builds
    (``arch/x86/kvm/mmu/spte.c: make_spte``; spec/kvm-mmu.md §4.6). ``vcpu``
    is ``None`` for faults without a vCPU (pre-fault, IOMMU page requests):
    the vendor then uses vCPU 0's state, as KVM does for such paths. For EPT
    this is ``(memtype << 3) | IPAT`` per era (spec/memtype.md §7); a vendor
    or era without ``get_mt_mask`` returns ``None`` (nothing is folded in).

    firstresult: only the vendor implements it.
    """


@hookspec(firstresult=True)
def kvmmu_effective_memtype(
    vm: VM,
    vcpu: VCpu,
    spte: int,
    guest_pat_type: MemType | None,
    hpa: int,
) -> MemType:
    """Return the effective memory type of a guest access.

    Called by ``vcpu.access`` after translation. ``spte`` is the leaf SPTE
    (TDP or shadow) that mapped the access; ``guest_pat_type`` is the guest
    PAT entry the guest's leaf PAT/PCD/PWT bits select, or ``None`` when guest
    paging is off; ``hpa`` is the host physical address reached (its host
    memory type, MMIO or RAM, is ``vm.host.memtype_of(hpa)``). VMX applies SDM
    Vol 3B §24.2.5.2 (CR0.CD -> UC, IPAT -> EPT type, else Table 11-7 with the
    EPT type as the MTRR); SVM combines guest PAT with the host side
    (spec/memtype.md §9).

    firstresult: only the vendor implements it.
    """


@hookspec(firstresult=True)
def kvmmu_hardware_cr0(vm: VM, vcpu: VCpu, cr0: int) -> int:
    """Return the CR0 value the hardware runs the guest with.

    Called on every guest CR0 write. VMX never sets CD/NW in hardware
    (``KVM_VM_CR0_ALWAYS_OFF``); SVM clears them only with the
    ``CD_NW_CLEARED`` quirk (spec/memtype.md §11.3).

    firstresult: only the vendor implements it.
    """


@hookspec(firstresult=True)
def kvmmu_max_mapping_level(vm: VM, vcpu: VCpu | None, gfn: int, max_level: int) -> int | None:
    """Return a lowered ``max_level`` for a TDP fault on ``gfn``, or ``None``.

    Called by the TDP fault path before the huge-page level is chosen. VMX
    uses it, in the eras that honoured guest MTRRs, to lower the level until
    ``kvm_mtrr_check_gfn_range_consistency`` holds (spec/kvm-mmu.md §3.4 step
    1; spec/memtype.md §8). Levels: 1 = 4K, 2 = 2M, 3 = 1G.

    firstresult.
    """


@hookspec(firstresult=True)
def kvmmu_pae_pdptes_in_registers(vm: VM) -> bool | None:
    """Return whether the CPU walks a PAE guest's tables from the four PDPTEs
    loaded at CR3 load rather than from the PDPT in memory.

    Called once, when the VM is created (the answer is fixed for the VM).
    VMX with EPT keeps them in the VMCS (``GUEST_PDPTRn``, loaded from
    ``mmu->pdptrs`` by ``ept_load_pdptrs``; SDM Vol 3A §4.4.1); SVM with NPT
    reads the PDPT from memory. Shadow paging always uses KVM's cached copies.

    firstresult: only the vendor implements it; None means False.
    """


@hookspec(firstresult=True)
def kvmmu_cpu_dirty_log_size(vm: VM) -> int | None:
    """Return ``kvm_x86_ops.cpu_dirty_log_size``: the entries of the CPU's
    dirty-page log, or ``None`` (0) when the CPU has none.

    Called once, when the VM's TDP MMU is created. VMX with PML
    (``enable_pml``: EPT with A/D bits, 4.0+) returns 512
    (``PML_LOG_NR_ENTRIES``); dirty logging then clears D instead of W on 4K
    SPTEs and the vCPU logs the gpa of each write that sets D
    (spec/kvm-mmu-2.md §7.1–§7.3; :mod:`kvmmu.pml`).

    firstresult: only the vendor implements it.
    """


@hookspec
def kvmmu_noncoherent_dma_changed(vm: VM, old_count: int, new_count: int) -> None:
    """Noncoherent DMA was registered or unregistered.

    Called after ``vm.noncoherent_dma_count`` changed from ``old_count`` to
    ``new_count`` (``kvm_arch_register_noncoherent_dma`` /
    ``..._unregister_...``). The vendor zaps what its era zaps on the 0->1 and
    1->0 transitions (spec/memtype.md §11.1–11.2).
    """


@hookspec
def kvmmu_cr0_changed(vm: VM, vcpu: VCpu, old: int, new: int) -> None:
    """The guest wrote CR0 (guest-visible values ``old`` -> ``new``).

    The vendor zaps when its era zaps on a CR0.CD toggle (spec/memtype.md
    §11.2).
    """


@hookspec
def kvmmu_msr_written(vm: VM, vcpu: VCpu, index: int, old: int, new: int) -> None:
    """The guest wrote MSR ``index`` (PAT 0x277, MTRRs 0x200–0x2FF, ...).

    Called after the value was accepted. The vendor zaps what its era zaps on
    MTRR writes (spec/memtype.md §11.2); nothing zaps on PAT writes.
    """


# --------------------------------------------------------------------------
# VM and vCPU lifecycle
# --------------------------------------------------------------------------


@hookspec
def kvmmu_vm_init(vm: VM) -> None:
    """The VM's memory, MMU and vCPUs exist; the plugin may set up devices.

    Called once, after every configured plugin is registered, oldest plugin
    last (LIFO). A plugin registered at run time gets no ``vm_init``.
    """


@hookspec
def kvmmu_vm_destroy(vm: VM) -> None:
    """The VM is being torn down (``vm.destroy()``); release everything."""


@hookspec
def kvmmu_vcpu_create(vm: VM, vcpu: VCpu) -> None:
    """A vCPU was created (``kvm_arch_vcpu_create``)."""


# --------------------------------------------------------------------------
# Memslots
# --------------------------------------------------------------------------


@hookspec
def kvmmu_memslot_prepare(
    vm: VM, old: Memslot | None, new: Memslot | None, change: MemslotChange
) -> None:
    """A validated memslot change is about to be committed; raise to veto.

    Called after every check of ``kvm_set_memory_region`` passed and before
    anything changed (the ``kvm_arch_prepare_memory_region`` point,
    spec/kvm-mmu.md §1.5). Raise :class:`kvmmu.KvmError` to refuse it with
    an errno (KVMGT refuses MOVE with ``EINVAL``); the model is unchanged.
    """


@hookspec
def kvmmu_memslot_commit(
    vm: VM, old: Memslot | None, new: Memslot | None, change: MemslotChange
) -> None:
    """A memslot change was committed (``kvm_arch_commit_memory_region``).

    The SPTEs of a deleted or moved slot are already zapped and the memslot
    generation has moved.
    """


# --------------------------------------------------------------------------
# Page tracking (6.6+ notifier shape)
# --------------------------------------------------------------------------


@hookspec
def kvmmu_track_write(vm: VM, gpa: int, new: bytes) -> None:
    """An emulated guest write to a write-tracked page has landed.

    Called by ``kvm_page_track_write`` after ``new`` is already in guest
    memory, newest notifier first (``arch/x86/kvm/mmu/page_track.c:
    __kvm_page_track_write``; spec/kvm-mmu.md §2.2, §2.3 item 5). ``gpa`` is
    the first byte written; ``len(new)`` is the KVM ``bytes`` argument. A
    write that crosses a page is delivered as two calls. KVM's own shadow-MMU
    handling (``kvm_mmu_track_write``) runs after every notifier.
    """


@hookspec
def kvmmu_track_remove_region(vm: VM, gfn: int, nr_pages: int) -> None:
    """A memslot covering ``[gfn, gfn + nr_pages)`` is being deleted.

    ``kvm_page_track_delete_slot`` (6.6+); a notifier drops everything it
    tracks in the range. Not called for MOVE (spec/kvm-mmu.md §2.5).
    """


# --------------------------------------------------------------------------
# TLB flushes and zaps (what the IOMMU uses to keep its IOTLB coherent)
# --------------------------------------------------------------------------


@hookspec
def kvmmu_flush_remote_tlbs_range(vm: VM, gfn: int, nr_pages: int) -> None:
    """SPTEs covering ``[gfn, gfn + nr_pages)`` were zapped or write-protected.

    Called after the SPTE change, with exactly the range it covered
    (``kvm_flush_remote_tlbs_range``). An IOMMU sharing the TDP tables
    invalidates its IOTLB for that range here (spec/consumers.md T5).
    """


@hookspec
def kvmmu_flush_remote_tlbs_gfns(vm: VM, gfns: np.ndarray) -> None:
    """Batch form of :func:`kvmmu_flush_remote_tlbs_range` for scattered gfns.

    ``gfns`` is a sorted ``uint64`` array of 4K gfns whose SPTEs changed
    (dirty-log get-and-clear, write-protecting a slot).
    """


@hookspec
def kvmmu_zap_all_fast(vm: VM, new_valid_gen: int) -> None:
    """``kvm_mmu_zap_all_fast`` flipped ``mmu_valid_gen`` to ``new_valid_gen``.

    Called after the roots were marked invalid and before they are freed. A
    consumer holding an exported root zaps its leaves synchronously here
    (spec/consumers.md T4).
    """


# --------------------------------------------------------------------------
# Emulated MMIO (device BARs not backed by RAM)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvmmu_mmio_read(vm: VM, gpa: int, size: int) -> bytes | None:
    """Return the bytes a device returns for an emulated MMIO read, or ``None``.

    Called for a guest read that exits to MMIO emulation (no memslot).
    firstresult: the first device that claims ``gpa`` answers.
    """


@hookspec(firstresult=True)
def kvmmu_mmio_write(vm: VM, gpa: int, data: bytes) -> bool | None:
    """Handle an emulated MMIO write; return ``True`` if a device claimed it.

    firstresult.
    """


# --------------------------------------------------------------------------
# Checks and reports
# --------------------------------------------------------------------------


@hookspec
def kvmmu_check_invariants(vm: VM) -> list[str]:
    """Return the violated invariants this plugin checks, as messages.

    Called by ``vm.check_invariants()`` after the core's own checks; an empty
    list means all hold. Messages name the plugin's object and the rule
    (``"kvmgt: W6 shadow entry 0x1234 ..."``).
    """


@hookspec
def kvmmu_report_section(vm: VM) -> dict[str, Any] | None:
    """Return this plugin's section of a run report (JSON-serialisable).

    Called by ``kvmmu run`` and ``kvmmu compare``; the section appears under
    ``plugins.<name>`` in the JSON report.
    """


# --------------------------------------------------------------------------
# Scenarios (devices of consumer plugins)
# --------------------------------------------------------------------------


@hookspec
def kvmmu_scenario_devices(vm: VM) -> list[str]:
    """Return the names of the devices this plugin created for the VM.

    Called before a scenario's workload runs, to check that every step names
    a device that exists (a scenario error otherwise, nothing run).
    """


@hookspec(firstresult=True)
def kvmmu_scenario_op(
    vm: VM, device: str, action: str, args: dict[str, Any]
) -> dict[str, Any] | None:
    """Run one scenario step ``action`` on ``device``; return its result.

    Called for ``op = "device"`` steps. The plugin owning ``device`` runs it
    (a DMA, a GPU submission, a guest PPGTT edit, a blob map ...) and returns
    a JSON-friendly result; other plugins return ``None``. An unknown action
    raises :class:`kvmmu.errors.ConfigError` naming the allowed ones.

    firstresult.
    """
