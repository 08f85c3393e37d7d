"""The VM: host memory, memslots, page tracking, the MMU, vCPUs and plugins.

Its methods are modelled on KVM's VM ioctls and kernel entry points; each
names the one it models.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu.config import VMConfig, parse_config
from kvmmu.era import KernelVersion
from kvmmu.errors import ConfigError, KvmError
from kvmmu.hooks import Hooks
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE, HostMemory
from kvmmu.memslot import Memslot, MemslotChange, Memslots
from kvmmu.page_track import PageTrack
from kvmmu.plugin_host import PluginHost, resolve_plugins
from kvmmu.quirks import (
    KVM_X86_CONDITIONAL_QUIRKS,
    QUIRKS,
    apply_disable_quirks_cap,
    initial_disabled_quirks,
    supported_quirks,
)
from kvmmu.spte import MMIO_SPTE_GEN_MASK
from kvmmu.vcpu import VCpu

if TYPE_CHECKING:
    from kvmmu.mmu import TdpMmu
    from kvmmu.mmu.shadow import ShadowMmu

__all__ = ["VM"]


class VM:
    """One KVM VM (``KVM_CREATE_VM``) with its plugins.

    ``VM(config)`` takes a :class:`VMConfig`, a mapping with the same shape,
    or ``None`` for the defaults (VMX, TDP, the newest era, one vCPU).
    """

    def __init__(self, config: VMConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            cfg = VMConfig()
        elif isinstance(config, VMConfig):
            cfg = config
        else:
            cfg = parse_config(dict(config))
        self.config = cfg
        self.era = KernelVersion(cfg.era)
        resolved = resolve_plugins(cfg)
        vendor_cls = resolved[0].cls
        vendor_eras = getattr(vendor_cls, "ERAS", None)
        if vendor_eras and self.era < KernelVersion(vendor_eras[0]):
            raise ConfigError(
                [
                    (
                        "era",
                        f"kernel {self.era} is older than the oldest era the {cfg.vendor} "
                        f"plugin models ({vendor_eras[0]})",
                    )
                ]
            )
        self._needs_self_snoop = getattr(vendor_cls, "QUIRKS_REQUIRING_SELF_SNOOP", 0)
        self.quirks = self._quirk_mask(
            cfg,
            self._needs_self_snoop,
            getattr(vendor_cls, "APPLICABLE_CONDITIONAL_QUIRKS", KVM_X86_CONDITIONAL_QUIRKS),
        )
        self.stats: Counter[str] = Counter()
        #: (memslot id or None, effective type, SPTE memtype bits) -> accesses
        self.memtypes_seen: Counter[tuple[int | None, Any, int]] = Counter()
        self.noncoherent_dma_count = 0
        self.host = HostMemory(maxphyaddr=cfg.host_maxphyaddr)
        self.memslots = Memslots()
        self.page_track = PageTrack(self)
        self.plugins = PluginHost()
        self.hooks = Hooks(self, self.plugins)
        self.vcpus: list[VCpu] = []
        for rp in resolved:
            self.plugins.register(rp.cls(self, rp.config), rp.name)
        self.spte_format = self.hooks.spte_format()
        #: The CPU walks PAE guests from PDPTE registers (``kvmmu_pae_pdptes_in_registers``;
        #: fixed for the VM, asked once rather than on every walk).
        self.pae_pdptes_in_registers = self.hooks.pae_pdptes_in_registers()
        self.mmu = self._make_mmu()
        self.host.register_notifier(self.mmu)
        self.memslots.memslots_updated.append(self._memslots_updated)
        for i in range(cfg.vcpus):
            self.create_vcpu(i)
        self.hooks.vm_init()

    # construction -------------------------------------------------------
    @staticmethod
    def _quirk_mask(
        cfg: VMConfig, needs_self_snoop: int, applicable: int = KVM_X86_CONDITIONAL_QUIRKS
    ) -> int:
        """Quirks on by default; disabling one needs it in ``supported_quirks``.

        ``KVM_CAP_DISABLE_QUIRKS2`` refuses unsupported bits with ``EINVAL``
        (spec/memtype.md §11.4); from 6.16 ``IGNORE_GUEST_PAT`` is unsupported
        without host self-snoop or without TDP, so it cannot be disabled
        there. From 6.16 the conditional quirks the vendor does not mark
        ``applicable`` start disabled (``inapplicable_quirks``: CD_NW_CLEARED
        on VMX, IGNORE_GUEST_PAT on SVM with NPT) and cannot be re-enabled.
        """
        era = KernelVersion(cfg.era)
        present = supported_quirks(era, self_snoop=True)
        supported = supported_quirks(
            era, self_snoop=cfg.host_self_snoop, needs_self_snoop=needs_self_snoop, tdp=cfg.tdp
        )
        mask = present & ~initial_disabled_quirks(era, applicable=applicable, supported=supported)
        for name, enabled in cfg.quirks.items():
            bit = QUIRKS[name][0]
            if enabled:
                if not bit & present:
                    raise KvmError(errno.EINVAL, f"quirk {name!r} does not exist in kernel {era}")
                if not bit & mask:
                    raise KvmError(
                        errno.EINVAL,
                        f"quirk {name!r} starts disabled in kernel {era} on vendor "
                        f"{cfg.vendor!r} (inapplicable_quirks) and KVM cannot re-enable it; "
                        "leave it out of [quirks] or set it false",
                    )
                continue
            if not bit & supported:
                why = "host CPU lacks self-snoop" if bit & present else f"not in kernel {era}"
                raise KvmError(
                    errno.EINVAL,
                    f"KVM_CAP_DISABLE_QUIRKS2: quirk {name!r} cannot be disabled ({why})",
                )
            mask &= ~bit
        return mask

    def _make_mmu(self) -> TdpMmu | ShadowMmu:
        if self.config.tdp:
            from kvmmu.mmu import TdpMmu

            return TdpMmu(self)
        from kvmmu.mmu.shadow import ShadowMmu

        return ShadowMmu(self)

    def tdp_mmu(self) -> TdpMmu:
        """The VM's TDP MMU, for what only exists with TDP (an IOMMU sharing
        the tables, SPTE walks); EOPNOTSUPP naming the need under shadow paging."""
        from kvmmu.mmu import TdpMmu

        if not isinstance(self.mmu, TdpMmu):
            raise KvmError(
                errno.EOPNOTSUPP, "this needs the TDP MMU (config tdp = true); the VM shadows"
            )
        return self.mmu

    def shadow_mmu(self) -> ShadowMmu:
        """The VM's shadow MMU; EOPNOTSUPP naming the need under TDP."""
        from kvmmu.mmu.shadow import ShadowMmu

        if not isinstance(self.mmu, ShadowMmu):
            raise KvmError(
                errno.EOPNOTSUPP, "this needs shadow paging (config tdp = false); the VM uses TDP"
            )
        return self.mmu

    def _memslots_updated(self, as_id: int, gen: int) -> None:
        """``kvm_arch_memslots_updated`` -> ``kvm_mmu_invalidate_mmio_sptes``.

        When the MMIO generation (the 19 bits MMIO SPTEs carry, address-space
        bits stripped) wraps to 0, old MMIO SPTEs could match again, so every
        root is obsoleted with ``kvm_mmu_zap_all_fast`` (spec/kvm-mmu.md §3.10).
        Generic x86 code: it applies to the TDP and the shadow MMU alike.
        """
        gen &= MMIO_SPTE_GEN_MASK
        gen &= ~(self.memslots.nr_as_ids - 1)
        if gen == 0:
            self.mmu.zap_all_fast()

    def create_vcpu(self, index: int | None = None) -> VCpu:
        """``KVM_CREATE_VCPU``."""
        vcpu = VCpu(self, len(self.vcpus) if index is None else index)
        self.vcpus.append(vcpu)
        self.hooks.vcpu_create(vcpu)
        return vcpu

    def has_quirk(self, bit: int) -> bool:
        """``kvm_check_has_quirk``: the quirk is enabled (not disabled by userspace)."""
        return bool(self.quirks & bit)

    def disable_quirks(self, mask: int, *, cap2: bool = True) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2`` (or ``_QUIRKS``), ``args[0] = mask)``.

        spec/memtype.md §11.4: before 6.16 the call assigns the disabled set
        (a later call can re-enable quirks; ``_QUIRKS2`` first refuses bits
        that are not valid quirks with EINVAL); from 6.16 it ORs in ``mask &
        supported_quirks``, so disabling is one-way. Nothing is zapped: SPTEs
        built under the old quirks keep their memtype (as in the kernel).
        """
        era = self.era
        present = supported_quirks(era, self_snoop=True)
        supported = supported_quirks(
            era,
            self_snoop=self.config.host_self_snoop,
            needs_self_snoop=self._needs_self_snoop,
            tdp=self.config.tdp,
        )
        disabled = apply_disable_quirks_cap(
            era, present & ~self.quirks, mask, cap2=cap2, supported=supported
        )
        self.quirks = present & ~disabled

    def plugin(self, name: str) -> Any:
        """The registered plugin object called ``name``."""
        obj = self.plugins.get(name)
        if obj is None:
            raise KeyError(f"no plugin {name!r}; registered: {self.plugins.names()}")
        return obj

    def destroy(self) -> None:
        """Tear the VM down (``kvm_destroy_vm``): plugins release first."""
        self.hooks.vm_destroy()
        self.mmu.zap_all_fast()

    # memslots -----------------------------------------------------------
    def set_user_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (v1 struct; spec/kvm-mmu.md §1.3)."""
        self._set_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, region2=False
        )

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (6.8+; guest_memfd is not modelled)."""
        if self.era < (6, 8):
            # No such VM ioctl before 6.8: kvm_vm_ioctl hands the number to x86
            # kvm_arch_vm_ioctl, whose default is -ENOTTY (spec/kvm-mmu-2.md §8).
            raise KvmError(
                errno.ENOTTY, f"KVM_SET_USER_MEMORY_REGION2 does not exist in kernel {self.era}"
            )
        self._set_memory_region(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            region2=True,
            guest_memfd=guest_memfd,
            guest_memfd_offset=guest_memfd_offset,
        )

    def _set_memory_region(
        self,
        slot: int,
        flags: int,
        gpa: int,
        size: int,
        hva: int,
        *,
        region2: bool,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``kvm_set_memory_region`` -> ``kvm_set_memslot`` (KM-new).

        Every check runs before anything changes; a plugin may veto in
        ``kvmmu_memslot_prepare`` (``kvm_arch_prepare_memory_region``). DELETE
        and MOVE install an INVALID copy, zap the old range
        (``kvm_arch_flush_shadow_memslot``), and DELETE tells page-track
        notifiers (``kvm_page_track_delete_slot``), then the change commits and
        the generation moves (spec/kvm-mmu.md §1.4, §2.5).
        """
        prep = self.memslots.prepare(
            slot,
            flags,
            gpa,
            size,
            hva,
            region2=region2,
            guest_memfd=guest_memfd,
            guest_memfd_offset=guest_memfd_offset,
            max_gfn=self.mmu.max_gfn,
        )
        if prep.change is None:
            return
        old, new, change = prep.old, prep.new, prep.change
        if change is MemslotChange.MOVE and self.era >= (6, 6):
            users = self.page_track.external_users()
            if users:
                # x86.c kvm_arch_prepare_memory_region: no MOVE while an external
                # page tracker is attached (kvm_page_track_has_external_user;
                # spec/kvm-mmu.md §2.5, consumers.md K10). Refused before anything
                # moves (docs/decisions.md, "A rejected memslot call changes nothing").
                raise KvmError(
                    errno.EINVAL,
                    f"memslot MOVE refused: page-track notifier(s) registered: "
                    f"{', '.join(users)} (kvm_page_track_has_external_user)",
                )
        self.hooks.memslot_prepare(old, new, change)
        if change in (MemslotChange.DELETE, MemslotChange.MOVE):
            assert old is not None
            self.memslots.install_invalid(prep)
            self.mmu.flush_shadow_memslot(old)
            # kvm_page_track_delete_slot (6.6+, DELETE only); before 6.6
            # kvm_page_track_flush_slot ran for MOVE too (spec/kvm-mmu.md §2.5,
            # "Old API": track_flush_slot on move or removal), modelled by the
            # same hook with the old slot's range.
            if change is MemslotChange.DELETE or self.era < (6, 6):
                self.page_track.remove_region(old)
        committed = self.memslots.commit(prep)
        self.mmu.slot_apply_flags(old, committed, change)
        self.hooks.memslot_commit(old, committed, change)

    def get_dirty_log(self, slot: int, as_id: int = 0) -> np.ndarray:
        """``KVM_GET_DIRTY_LOG``: return the dirty gfns, clear, write-protect them.

        ``kvm_get_dirty_log_protect``: the bitmap is harvested and cleared and
        the harvested pages are write-protected again so the next write is
        logged (spec/kvm-mmu-2.md §7.3).  With manual protect
        (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``) GET only copies the bitmap:
        nothing is cleared or re-protected until :meth:`clear_dirty_log`.
        """
        gfns = self.memslots.get_dirty_log(as_id, slot, sync=self.sync_dirty_log)
        if len(gfns) and not self.memslots.manual_dirty_log_protect:
            memslot = self.memslots.id_to_memslot(as_id, slot)
            assert memslot is not None
            self._enable_log_dirty_pt_masked(memslot, gfns)
        return gfns

    def sync_dirty_log(self, slot: Memslot | None = None) -> int:
        """``kvm_arch_sync_dirty_log``: kick every vCPU so its PML log reaches
        the bitmap (``vmx_flush_pml_buffer`` on the exit); returns the gpas moved.

        Run by :meth:`get_dirty_log` and :meth:`clear_dirty_log` once their
        arguments pass the checks. Without PML the logs are always empty.
        """
        return sum(v.pml.flush() for v in self.vcpus)

    def clear_dirty_log(
        self,
        slot: int,
        first_page: int,
        num_pages: int,
        mask: np.ndarray | None = None,
        as_id: int = 0,
    ) -> np.ndarray:
        """``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``; spec/kvm-mmu-2.md §7.3).

        Clears the requested bits (``mask``: bool per page, None = all) and
        re-protects exactly the pages whose bits really were set; returns
        those gfns.  Errors (EINVAL / ENOENT) are raised before anything changes.
        """
        gfns = self.memslots.clear_dirty_log(
            as_id, slot, first_page, num_pages, mask, sync=self.sync_dirty_log
        )
        if len(gfns):
            memslot = self.memslots.id_to_memslot(as_id, slot)
            assert memslot is not None
            self._enable_log_dirty_pt_masked(memslot, gfns)
        return gfns

    def _enable_log_dirty_pt_masked(self, slot: Memslot, gfns: np.ndarray) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked``, once per 64-page bitmap word.

        With manual protect + INITIALLY_SET the huge pages were never
        write-protected (spec/kvm-mmu-2.md §7.1), so for each word: eager-split
        ``[first, last]`` to 4K (if enabled), then write-protect at >= 2M the
        gfn of the first set bit, and of the last one if it lies in another 2M
        frame.  Then the 4K SPTEs of the pages themselves (§7.3).
        """
        ms = self.memslots
        if ms.manual_dirty_log_protect and ms.dirty_log_initially_set:
            rel = np.asarray(gfns, dtype=np.int64) - slot.base_gfn
            words = rel >> 6
            split = getattr(self.mmu, "split_huge_pages_range", None)
            for w in np.unique(words).tolist():
                sel = rel[words == w]
                start = slot.base_gfn + int(sel.min())
                end = slot.base_gfn + int(sel.max())
                if self.config.eager_page_split and split is not None:
                    split(start, end + 1, 1, slot.as_id)
                self.mmu.write_protect_gfn(slot, start, 2)
                # ALIGN(start << PAGE_SHIFT, PMD_SIZE) != ALIGN(end << PAGE_SHIFT, PMD_SIZE)
                if -(-start // 512) != -(-end // 512):
                    self.mmu.write_protect_gfn(slot, end, 2)
        self.mmu.write_protect_gfns(gfns, slot.as_id)

    # guest memory, host side --------------------------------------------
    def gpa_to_hva(self, gpa: int) -> int:
        """``gfn_to_hva`` plus the offset; EFAULT outside every slot."""
        return int(self.memslots.gfn_to_hva(gpa >> PAGE_SHIFT)) + (gpa & (PAGE_SIZE - 1))

    def gfn_to_pfn(self, gfn: int, *, write: bool = False) -> int:
        """``gfn_to_pfn``: fault the host page in and return its pfn."""
        return self.host.hva_to_pfn(int(self.memslots.gfn_to_hva(gfn)), write=write)

    def read_guest(self, gpa: int, size: int) -> bytes:
        """Read guest memory as userspace would (``kvm_read_guest``); no MMU involved."""
        out = bytearray()
        for _slot, gfn, offset, length in self.memslots.translate_range(gpa, size):
            pfn = self.gfn_to_pfn(gfn)
            out += self.host.read_phys((pfn << PAGE_SHIFT) + offset, length)
        return bytes(out)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """Write guest memory from the host side: no page-track notification.

        Like userspace touching guest RAM through its mapping, the bytes land
        without KVM knowing, so no notifier runs and nothing is logged dirty.
        """
        pos = 0
        for _slot, gfn, offset, length in self.memslots.translate_range(gpa, len(data)):
            pfn = self.gfn_to_pfn(gfn, write=True)
            self.host.write_phys((pfn << PAGE_SHIFT) + offset, bytes(data[pos : pos + length]))
            pos += length

    def write_guest_kvm(self, gpa: int, data: bytes) -> None:
        """``kvm_vcpu_write_guest``: KVM writes guest memory and logs it dirty."""
        pos = 0
        for slot, gfn, offset, length in self.memslots.translate_range(gpa, len(data)):
            pfn = self.gfn_to_pfn(gfn, write=True)
            self.host.write_phys((pfn << PAGE_SHIFT) + offset, bytes(data[pos : pos + length]))
            self.memslots.mark_page_dirty(slot, gfn)
            pos += length

    # MMU entry points ---------------------------------------------------
    def pre_fault_memory(self, gpa: int, size: int) -> int:
        """``KVM_PRE_FAULT_MEMORY`` (6.10+; spec/kvm-mmu-2.md §6).

        Before 6.10 the vCPU ioctl does not exist: ``kvm_vcpu_ioctl`` passes the
        number to x86 ``kvm_arch_vcpu_ioctl``, whose default is -EINVAL, with
        TDP or shadow paging alike (§8).
        """
        if self.era < (6, 10):
            raise KvmError(
                errno.EINVAL, f"KVM_PRE_FAULT_MEMORY does not exist in kernel {self.era}"
            )
        return int(self.mmu.pre_fault_memory(gpa, size))

    def zap_gfn_range(self, start: int, end: int) -> None:
        """``kvm_zap_gfn_range(kvm, start, end)``; ``end`` is exclusive."""
        self.mmu.zap_gfn_range(start, end)

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: obsolete every root (spec/kvm-mmu.md §3.14)."""
        self.mmu.zap_all_fast()

    def write_track_add_gfn(self, gfn: int) -> None:
        """``kvm_write_track_add_gfn`` (6.6+)."""
        self.page_track.add_gfn(gfn)

    def write_track_remove_gfn(self, gfn: int) -> None:
        """``kvm_write_track_remove_gfn`` (6.6+)."""
        self.page_track.remove_gfn(gfn)

    def invalidate_hva_range(self, start: int, end: int) -> None:
        """The host invalidates ``[start, end)`` (an MMU-notifier event)."""
        self.host.invalidate_range(start, end)

    # noncoherent DMA ----------------------------------------------------
    def register_noncoherent_dma(self) -> None:
        """``kvm_arch_register_noncoherent_dma`` (spec/memtype.md §11.1)."""
        old = self.noncoherent_dma_count
        self.noncoherent_dma_count += 1
        self.hooks.noncoherent_dma_changed(old, self.noncoherent_dma_count)

    def unregister_noncoherent_dma(self) -> None:
        """``kvm_arch_unregister_noncoherent_dma``; below zero is refused."""
        if self.noncoherent_dma_count == 0:
            raise KvmError(errno.EINVAL, "unregister_noncoherent_dma: count is already 0")
        old = self.noncoherent_dma_count
        self.noncoherent_dma_count -= 1
        self.hooks.noncoherent_dma_changed(old, self.noncoherent_dma_count)

    # plugins at run time ------------------------------------------------
    def register_plugin(self, obj: object, name: str) -> None:
        """Add ``obj`` to this VM's plugin chain (newest: called first).

        Like ``kvm_page_track_register_notifier`` (``hlist_add_head_rcu``).
        """
        self.plugins.register(obj, name)

    def unregister_plugin(self, name: str) -> object:
        """Remove a plugin; it is not called after this returns (SRCU rule)."""
        if name == self.config.vendor:
            raise KvmError(errno.EINVAL, f"{name!r} is the VM's vendor and cannot be removed")
        return self.plugins.unregister(name)

    # checks -------------------------------------------------------------
    def check_invariants(self) -> list[str]:
        """Return every violated invariant (core, MMU, then plugins)."""
        self.stats["invariant_checks"] += 1
        out: list[str] = list(self.mmu.check_invariants())
        out.extend(self.page_track.check_invariants())
        out.extend(self.hooks.check_invariants())
        return out

    def note_memtype(self, gpa: int, memtype: Any, spte: int) -> None:
        """Count an access's effective type per memslot (for reports)."""
        slot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        # EPT leaves carry the memtype in bits 5:3 and IPAT in bit 6 in every
        # era (spec/kvm-mmu.md §4.1); NPT and shadow SPTEs carry none (§4.2).
        bits = spte & 0x78 if self.spte_format.name == "ept" else 0
        key = (None if slot is None else slot.id, memtype, bits)
        self.memtypes_seen[key] += 1

    def slot_of(self, gpa: int) -> Memslot | None:
        """The memslot covering ``gpa`` (address space 0), or ``None``."""
        return self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
