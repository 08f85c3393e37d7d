"""A vCPU: control registers, MSRs, and guest accesses through the MMU.

``vcpu.access(gva, kind)`` is one guest memory access: the guest walk
(reading the guest's own page tables from guest memory), the translation
through the MMU's tables with a fault loop when the hardware would exit
(``kvm_mmu_page_fault``), emulation when the fault path says EMULATE
(``x86_emulate_instruction`` -> ``emulator_write_phys``) unless KVM
unprotects the gfn and lets the instruction run again instead
(``EMULTYPE_ALLOW_RETRY_PF``, :mod:`kvmmu.emulate`), and the vendor's
effective memory type of the bytes reached.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

from kvmmu import paging
from kvmmu.errors import GuestFault, KvmError
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE
from kvmmu.pml import PmlLog

if TYPE_CHECKING:
    from kvmmu.emulate import Insn
    from kvmmu.memtype import MemType
    from kvmmu.mmu import TdpMmu
    from kvmmu.mmu.shadow import ShadowMmu
    from kvmmu.vm import VM

__all__ = ["AccessResult", "Kind", "Resolved", "TraceEvent", "VCpu"]

Kind = Literal["read", "write", "fetch"]

#: Architectural reset values (SDM Vol 3A Table 9-1): CR0 = CD | NW | ET.
CR0_RESET = 0x60000010
CR0_CD = 1 << 30
CR0_NW = 1 << 29
MSR_IA32_CR_PAT = 0x277
#: A fault loop that has not converged after this many exits is a model bug.
MAX_EXITS = 32


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One access as the trace records it (``vm.trace``)."""

    vcpu: int
    kind: str
    gva: int
    gpa: int | None
    hpa: int | None
    spte: int | None
    memtype: str | None
    outcome: str


@dataclass(frozen=True, slots=True)
class AccessResult:
    """What one ``vcpu.access`` did.

    ``fault`` is the exception injected into the guest (``vector``,
    ``error_code``) or ``None``. ``emulated`` says the access went through
    the emulator (MMIO, a write-tracked page, a READONLY slot); ``exit`` is
    ``"mmio"`` when it reached userspace as ``KVM_EXIT_MMIO``.
    """

    data: bytes | None
    fault: GuestFault | None
    gpa: int | None
    hpa: int | None
    memtype: MemType | None
    spte: int | None = None
    level: int | None = None
    emulated: bool = False
    exit: str | None = None
    exits: int = 0


@dataclass
class Resolved:
    """Where a resolve step (:meth:`VCpu._resolve`, or the shadow MMU's
    ``resolve``) left one page of an access.

    ``result`` set: the access ended (a guest fault). ``emulate``: the fault
    path said EMULATE for ``gpa``. Otherwise the SPTE (``spte``, ``level``)
    allows the access to ``gpa``. ``exits``: VM exits taken on the way.
    """

    gpa: int | None
    exits: int
    spte: int = 0
    level: int = 0
    guest_pat: MemType | None = None
    emulate: bool = False
    result: AccessResult | None = None
    #: the shadow MMU's (shadow page, index) of the leaf SPTE
    sp: tuple[Any, int] | None = None


class VCpu:
    """One vCPU (``struct kvm_vcpu``) with the registers the MMU reads."""

    def __init__(self, vm: VM, index: int) -> None:
        from kvmmu.memtype import PAT_DEFAULT, MtrrState

        self.vm = vm
        self.index = index
        self.cr0 = CR0_RESET
        self.hw_cr0 = vm.hooks.hardware_cr0(self, CR0_RESET)
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.cpl = 0
        self.rflags_ac = False
        self.pkru = 0
        self.pat = PAT_DEFAULT
        # kvm_mtrr_valid checks reserved bits against the guest CPUID MAXPHYADDR,
        # which the model takes as the host width (no separate guest CPUID).
        self.mtrr = MtrrState(maxphyaddr=vm.config.host_maxphyaddr)
        self.msrs: dict[int, int] = {}
        self.trace: deque[TraceEvent] | None = None
        #: The PAE PDPTEs loaded at the last CR3 load (``mmu->pdptrs``).
        self.pdptrs = [0, 0, 0, 0]
        #: The vCPU's PML log (empty and never enabled without vendor PML).
        self.pml = PmlLog(self, int(getattr(vm.mmu, "cpu_dirty_log_size", 0)))
        # The instruction being run (vcpu.access's rip= and insn=) and the
        # unprotect+retry guard vcpu->arch.last_retry_eip / last_retry_addr
        # (kvmmu.emulate; None where KVM has 0).
        self.insn_rip = 0
        self.insn: str = "mov"
        self.last_retry_eip: int | None = None
        self.last_retry_addr: int | None = None
        self._insn_seq = 0

    # registers ------------------------------------------------------------
    def set_sregs(
        self,
        *,
        cr0: int | None = None,
        cr3: int | None = None,
        cr4: int | None = None,
        efer: int | None = None,
        cpl: int | None = None,
    ) -> None:
        """``KVM_SET_SREGS`` for the fields the MMU depends on.

        A CR0 change goes through the vendor's hardware-CR0 rule and the
        ``kvmmu_cr0_changed`` hook (CR0.CD zaps, spec/memtype.md §11.2); a
        paging-mode or CR3 change reloads the MMU context (``kvm_mmu_reset_context``,
        ``kvm_mmu_new_pgd``).
        """
        if cpl is not None and cpl not in (0, 1, 2, 3):
            raise ValueError(f"cpl must be 0..3, got {cpl}")
        if cr4 is not None and cr4 & paging.CR4_PKE and not self.vm.config.tdp:
            # kvm_set_cpu_caps clears X86_FEATURE_PKU without TDP, so CR4.PKE is
            # a reserved bit for the guest and kvm_is_valid_cr4 fails the ioctl.
            raise KvmError(
                errno.EINVAL,
                "CR4.PKE needs TDP: KVM hides PKU from the guest under shadow paging, "
                "so KVM_SET_SREGS refuses it (kvm_is_valid_cr4)",
            )
        old = (self.cr0, self.cr3, self.cr4, self.efer)
        if cr4 is not None:
            self.cr4 = cr4
        if efer is not None:
            self.efer = efer
        if cr3 is not None:
            self.cr3 = cr3
        if cpl is not None:
            self.cpl = cpl
        if cr0 is not None and cr0 != self.cr0:
            prev = self.cr0
            self.cr0 = cr0
            self.hw_cr0 = self.vm.hooks.hardware_cr0(self, cr0)
            self.vm.hooks.cr0_changed(self, prev, cr0)
        # Long mode is active when paging is on with EFER.LME (SDM Vol 3A §9.8.5).
        if self.cr0 & paging.CR0_PG and self.efer & paging.EFER_LME:
            self.efer |= paging.EFER_LMA
        else:
            self.efer &= ~paging.EFER_LMA
        # A CR3 write reloads even with the same value: MOV CR3 re-reads the PAE
        # PDPTEs and drops non-global translations (SDM Vol 3A §4.4.1, §4.10.4.1;
        # arch/x86/kvm/x86.c: kvm_set_cr3 -> kvm_mmu_new_pgd).
        if cr3 is not None or (self.cr0, self.cr3, self.cr4, self.efer) != old:
            self._load_pdptrs()
            reload = getattr(self.vm.mmu, "load_pgd", None)
            if reload is not None:
                reload(self)

    def set_msr(self, index: int, value: int) -> None:
        """``KVM_SET_MSRS`` / guest WRMSR for PAT and the MTRRs.

        An invalid value is refused with ``EINVAL`` and nothing changes (the
        guest would get #GP: ``kvm_pat_valid``, ``kvm_mtrr_valid``).
        """
        from kvmmu.memtype import is_mtrr_msr, kvm_pat_valid

        old = self.get_msr(index)
        if index == MSR_IA32_CR_PAT:
            if not kvm_pat_valid(value):
                raise KvmError(
                    errno.EINVAL,
                    f"PAT value {value:#018x} is invalid (each byte must be 0,1,4,5,6,7; "
                    "the guest would get #GP)",
                )
            self.pat = value
        elif is_mtrr_msr(index):
            try:
                self.mtrr.set_msr(index, value)
            except GuestFault as e:
                raise KvmError(
                    errno.EINVAL,
                    f"MTRR MSR {index:#x} value {value:#x} is invalid (the guest would get #GP)",
                ) from e
        else:
            self.msrs[index] = value
        self.vm.hooks.msr_written(self, index, old, value)

    def get_msr(self, index: int) -> int:
        """The MSR's current value (PAT, MTRRs, or any other stored one)."""
        from kvmmu.memtype import is_mtrr_msr

        if index == MSR_IA32_CR_PAT:
            return self.pat
        if is_mtrr_msr(index):
            return int(self.mtrr.get_msr(index))
        return self.msrs.get(index, 0)

    @property
    def paging_enabled(self) -> bool:
        return bool(self.cr0 & paging.CR0_PG)

    # guest walk -----------------------------------------------------------
    def walk(self, gva: int, kind: Kind) -> paging.WalkResult:
        """The guest's own walk of ``gva`` over its page tables in guest memory."""
        return paging.walk(
            self._walk_read(),
            cr0=self.cr0,
            cr3=self.cr3,
            cr4=self.cr4,
            efer=self.efer,
            cpl=self.cpl,
            access=kind,
            gva=gva,
            rflags_ac=self.rflags_ac,
            pkru=self.pkru,
            maxphyaddr=self.vm.config.host_maxphyaddr,
        )

    def _pae_paging(self) -> bool:
        """``is_pae_paging``: paging on, CR4.PAE, not long mode."""
        pg, pae = self.cr0 & paging.CR0_PG, self.cr4 & paging.CR4_PAE
        return bool(pg and pae and not self.efer & paging.EFER_LMA)

    def _load_pdptrs(self) -> None:
        """``load_pdptrs`` (x86.c) at a CR3 load or paging-mode change under PAE.

        A failed load (PDPT outside guest memory, or a present PDPTE with a
        reserved bit: :func:`kvmmu.paging.load_pdptrs`) keeps the old copies
        (MOV CR3 would #GP; KVM_SET_SREGS ignores it).
        """
        if not self._pae_paging():
            return
        new = paging.load_pdptrs(self._read_pdpte, self.cr3, self.vm.config.host_maxphyaddr)
        if new is not None:
            self.pdptrs = new

    def _read_pdpte(self, gpa: int) -> int | None:
        """One PDPTE from guest memory (``kvm_vcpu_read_guest_page``); None on failure."""
        try:
            return int.from_bytes(self.vm.read_guest(gpa, 8), "little")
        except KvmError:
            return None

    def _walk_read(self) -> Callable[[int], int]:
        """The guest-table reader for a walk: PAE with TDP on a CPU that keeps the
        PDPTEs in registers (VMX: ``GUEST_PDPTRn``) answers them from
        :attr:`pdptrs`, everything else comes from guest memory."""
        if not (self._pae_paging() and self.vm.pae_pdptes_in_registers):
            return self._read_gpte
        base = self.cr3 & 0xFFFFFFE0
        cached = self.pdptrs

        def read(gpa: int) -> int:
            if base <= gpa < base + 32 and not gpa & 7:
                return cached[(gpa - base) >> 3]
            return self._read_gpte(gpa)

        return read

    def _gpte_size(self) -> int:
        """4-byte entries under 32-bit paging (CR4.PAE clear), else 8 (SDM Vol 3A §4.3)."""
        return 8 if self.cr4 & paging.CR4_PAE else 4

    def _read_gpte(self, gpa: int) -> int:
        return int.from_bytes(self.vm.read_guest(gpa, self._gpte_size()), "little")

    def _apply_ad(self, ad_writes: dict[int, int]) -> None:
        """Write the walk's A/D updates into the guest tables, entry-sized.

        KVM's walker sets them with a cmpxchg through the host mapping
        (``FNAME(update_accessed_dirty_bits)``): the page is marked dirty and
        no page-track notifier runs. A 32-bit guest's entries are 4 bytes: an
        8-byte write would clobber the neighbouring entry.
        """
        size = self._gpte_size()
        for addr, value in ad_writes.items():
            self.vm.write_guest_kvm(addr, value.to_bytes(size, "little"))

    # accesses -------------------------------------------------------------
    def access(
        self,
        gva: int,
        kind: Kind = "read",
        size: int = 8,
        data: bytes | None = None,
        *,
        rip: int | None = None,
        insn: Insn = "mov",
    ) -> AccessResult:
        """One guest access of ``size`` bytes at ``gva`` (split at a page boundary).

        The access is one instruction: ``insn`` names it (a plain MOV by
        default; :data:`kvmmu.emulate.INSNS`), ``rip`` is its address for
        the retry guard (``last_retry_eip``); without it every access is a
        new instruction (a fresh identity no ``rip`` equals).
        """
        from kvmmu.emulate import INSNS

        if kind not in ("read", "write", "fetch"):
            raise ValueError(f"kind must be 'read', 'write' or 'fetch', got {kind!r}")
        if insn not in INSNS:
            raise ValueError(f"insn must be one of {sorted(INSNS)}, got {insn!r}")
        if not 1 <= size <= PAGE_SIZE:
            raise ValueError(f"size must be 1..{PAGE_SIZE}, got {size}")
        if kind == "write":
            if data is None or len(data) != size:
                raise ValueError(f"a write needs data of exactly {size} bytes")
        elif data is not None:
            raise ValueError("data is only for writes")
        # Only a valid access becomes the vCPU's current instruction.
        if rip is None:
            self._insn_seq += 1
            rip = -self._insn_seq
        self.insn_rip, self.insn = rip, insn
        first = min(size, PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
        if first == size:
            return self._access_page(gva, kind, size, data)
        return self._access_crossing(gva, kind, size, data, first)

    def _access_page(self, gva: int, kind: Kind, size: int, data: bytes | None) -> AccessResult:
        """One access inside a page: resolve the translation, then touch or emulate."""
        res = self._resolve(gva, kind)
        if res.result is not None:
            return res.result
        assert res.gpa is not None
        if res.emulate:
            return self._emulate_as_mmu(gva, res.gpa, kind, size, data, res.exits)
        return self._native(gva, kind, size, data, res)

    def _emulate_as_mmu(
        self, gva: int, gpa: int, kind: Kind, size: int, data: bytes | None, exits: int
    ) -> AccessResult:
        """The emulator, entered the way the vCPU's MMU enters it."""
        mmu = self.vm.mmu
        if mmu.shadow:
            return cast("ShadowMmu", mmu).emulate(self, gva, gpa, kind, size, data, exits)
        return self._emulate(gva, gpa, kind, size, data, exits)

    def _resolve(self, gva: int, kind: Kind) -> Resolved:
        """Run the guest walk and the TDP fault loop for ``gva`` until the SPTE
        allows the access, the fault path says EMULATE, or the guest faults
        (``kvm_mmu_page_fault`` per exit; nothing is read or written here)."""
        from kvmmu.emulate import retry_instead_of_emulate
        from kvmmu.memtype import pat_index, pat_type
        from kvmmu.mmu import RET_PF_EMULATE

        vm = self.vm
        if vm.mmu.shadow:
            return cast("ShadowMmu", vm.mmu).resolve(self, gva, kind)
        mmu = cast("TdpMmu", vm.mmu)
        write = kind == "write"
        fetch = kind == "fetch"
        exits = 0
        while True:
            guest_pat = None
            if self.cr0 & paging.CR0_PG:
                w = self.walk(gva, kind)
                if w.fault:
                    vm.stats["guest_page_faults"] += 1
                    fault = GuestFault(w.vector or 14, w.error_code, gva)
                    self._trace(kind, gva, None, None, None, None, "guest_fault")
                    return Resolved(
                        None, exits, result=AccessResult(None, fault, None, None, None, exits=exits)
                    )
                if w.ad_writes:
                    self._apply_ad(w.ad_writes)
                assert w.gpa is not None
                gpa = w.gpa
                guest_pat = pat_type(self.pat, pat_index(w.pat, w.pcd, w.pwt))
            else:
                gpa = gva & 0xFFFFFFFF if not self.efer & paging.EFER_LMA else gva
            hit = mmu.translate(gpa)
            if hit is not None and mmu.access_allowed(hit[0], write, fetch, self.cpl == 3):
                return Resolved(gpa, exits, spte=hit[0], level=hit[1], guest_pat=guest_pat)
            exits += 1
            # vmx_handle_exit: every exit first moves the PML log to the bitmap.
            self.pml.flush()
            if exits > MAX_EXITS:
                raise KvmError(errno.EFAULT, f"fault on gpa {gpa:#x} did not converge")
            error_code = mmu.fault_error_code(hit, write, fetch, self.cpl == 3)
            r = mmu.page_fault(self, gpa, error_code)
            if r == RET_PF_EMULATE:
                # x86_emulate_instruction may unprotect and re-enter the guest
                # instead (cr2_or_gpa is the gpa under TDP).
                if retry_instead_of_emulate(self, gpa, gpa, write):
                    continue
                return Resolved(gpa, exits, emulate=True)

    def _native(
        self, gva: int, kind: Kind, size: int, data: bytes | None, res: Resolved
    ) -> AccessResult:
        """The CPU completes the access through the SPTE ``res`` found."""
        vm = self.vm
        if vm.mmu.shadow:
            return cast("ShadowMmu", vm.mmu).complete(self, gva, kind, size, data, res)
        mmu = cast("TdpMmu", vm.mmu)
        write = kind == "write"
        gpa, spte, level = res.gpa, res.spte, res.level
        assert gpa is not None
        hpa = mmu.spte_hpa(spte, level, gpa)
        out = self._touch(hpa, size, data)
        if write and self.pml.size and not spte & mmu.fmt.dirty_mask:
            # The CPU sets D on the leaf and, with PML on, logs the gpa
            # (spec/kvm-mmu-2.md §7.2; kvmmu.pml).
            self.pml.log(gpa)
        mmu.hw_mark_accessed(gpa, write)
        memtype = vm.hooks.effective_memtype(self, spte, res.guest_pat, hpa)
        self._trace(kind, gva, gpa, hpa, spte, memtype.label, "ok")
        vm.stats["accesses"] += 1
        vm.note_memtype(gpa, memtype, spte)
        return AccessResult(out, None, gpa, hpa, memtype, spte, level, exits=res.exits)

    def _access_crossing(
        self, gva: int, kind: Kind, size: int, data: bytes | None, first: int
    ) -> AccessResult:
        """An access that crosses a page boundary, as one instruction (TDP or shadow).

        A faulting x86 instruction commits nothing, so both halves are
        translated (faults handled, the instruction re-executed) before
        either is touched. If either half's fault says EMULATE, KVM emulates
        the whole instruction: ``emulator_read_write`` splits it at the page
        and each half goes through ``emulator_write_phys`` (a write lands,
        then ``kvm_page_track_write`` runs), the untracked half included
        (arch/x86/kvm/x86.c; spec/kvm-mmu.md §2.3 item 5). The emulator finds
        a half's gpa by the guest walk alone, without faulting it in.
        """
        second = gva + first
        d1, d2 = (data[:first], data[first:]) if data is not None else (None, None)
        exits = 0
        for _ in range(MAX_EXITS):
            a = self._resolve(gva, kind)
            exits += a.exits
            if a.result is not None:
                return replace(a.result, exits=exits)
            assert a.gpa is not None
            if a.emulate:
                return self._emulate_halves(gva, kind, size, first, d1, d2, a.gpa, None, exits)
            b = self._resolve(second, kind)
            exits += b.exits
            if b.result is not None:
                return replace(b.result, exits=exits)
            if b.emulate:
                return self._emulate_halves(gva, kind, size, first, d1, d2, a.gpa, b.gpa, exits)
            if b.exits:
                continue  # the instruction re-executes: translate the first half again
            ra = self._native(gva, kind, first, d1, a)
            rb = self._native(second, kind, size - first, d2, b)
            joined = (ra.data or b"") + (rb.data or b"") if kind != "write" else None
            return replace(ra, data=joined, exits=exits)
        raise KvmError(errno.EFAULT, f"page-crossing access at gva {gva:#x} did not converge")

    def _emulate_halves(
        self,
        gva: int,
        kind: Kind,
        size: int,
        first: int,
        d1: bytes | None,
        d2: bytes | None,
        gpa1: int,
        gpa2: int | None,
        exits: int,
    ) -> AccessResult:
        """The emulator's two ``emulator_read_write_onepage`` calls, in order."""
        second = gva + first
        r1 = self._emulate_as_mmu(gva, gpa1, kind, first, d1, exits)
        if gpa2 is None:
            if self.cr0 & paging.CR0_PG:
                w = self.walk(second, kind)  # kvm_mmu_gva_to_gpa_{read,write}
                if w.fault:
                    # the first half has landed; the emulator injects #PF
                    self.vm.stats["guest_page_faults"] += 1
                    fault = GuestFault(w.vector or 14, w.error_code, second)
                    return AccessResult(None, fault, gpa1, None, None, emulated=True, exits=exits)
                if w.ad_writes:
                    self._apply_ad(w.ad_writes)
                assert w.gpa is not None
                gpa2 = w.gpa
            else:
                gpa2 = second & 0xFFFFFFFF if not self.efer & paging.EFER_LMA else second
        r2 = self._emulate_as_mmu(second, gpa2, kind, size - first, d2, 0)
        joined = (r1.data or b"") + (r2.data or b"") if kind != "write" else None
        return AccessResult(
            joined,
            None,
            gpa1,
            None,
            None,
            emulated=True,
            exit=r1.exit or r2.exit,
            exits=exits,
        )

    def _touch(self, hpa: int, size: int, data: bytes | None) -> bytes | None:
        host = self.vm.host
        if data is not None:
            host.write_phys(hpa, data)
            return None
        return host.read_phys(hpa, size)

    def _emulate(
        self, gva: int, gpa: int, kind: Kind, size: int, data: bytes | None, exits: int
    ) -> AccessResult:
        """``x86_emulate_instruction`` for one access (spec/kvm-mmu.md §2.3 item 5).

        No memslot, or a write to a READONLY slot: MMIO, offered to the
        devices and otherwise an exit to userspace (``KVM_EXIT_MMIO``; an
        unclaimed read returns all-ones, as an unbacked bus does). Otherwise
        (a write-tracked or shadowed page): ``emulator_write_phys`` writes the
        bytes into guest memory first, then ``kvm_page_track_write`` runs.
        """
        vm = self.vm
        vm.stats["emulated_accesses"] += 1
        slot = vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        write = kind == "write"
        if slot is None or slot.is_invalid or (write and slot.is_readonly):
            vm.stats["mmio_exits" if write else "mmio_reads"] += 1
            if write:
                assert data is not None
                claimed = vm.hooks.mmio_write(gpa, data)
                out = None
            else:
                got = vm.hooks.mmio_read(gpa, size)
                claimed = got is not None
                out = got if got is not None else b"\xff" * size
            self._trace(kind, gva, gpa, None, None, None, "mmio")
            return AccessResult(
                out,
                None,
                gpa,
                None,
                None,
                emulated=True,
                exit=None if claimed else "mmio",
                exits=exits,
            )
        if write:
            assert data is not None
            vm.stats["emulated_writes"] += 1
            vm.write_guest_kvm(gpa, data)
            self._trace(kind, gva, gpa, None, None, None, "emulated")
            vm.page_track.track_write(gpa, data)
            return AccessResult(None, None, gpa, None, None, emulated=True, exits=exits)
        out = vm.read_guest(gpa, size)
        self._trace(kind, gva, gpa, None, None, None, "emulated")
        return AccessResult(out, None, gpa, None, None, emulated=True, exits=exits)

    # tracing --------------------------------------------------------------
    def enable_trace(self, maxlen: int = 4096) -> deque[TraceEvent]:
        """Record a :class:`TraceEvent` per access (the last ``maxlen``)."""
        self.trace = deque(maxlen=maxlen)
        return self.trace

    def _trace(
        self,
        kind: str,
        gva: int,
        gpa: int | None,
        hpa: int | None,
        spte: int | None,
        memtype: str | None,
        outcome: str,
    ) -> None:
        if self.trace is not None:
            self.trace.append(TraceEvent(self.index, kind, gva, gpa, hpa, spte, memtype, outcome))

    def __repr__(self) -> str:
        return f"VCpu({self.index}, cr0={self.cr0:#x}, cr3={self.cr3:#x}, cr4={self.cr4:#x})"

    def state(self) -> dict[str, Any]:
        """Registers as a JSON-friendly dict."""
        return {
            "index": self.index,
            "cr0": self.cr0,
            "cr3": self.cr3,
            "cr4": self.cr4,
            "efer": self.efer,
            "cpl": self.cpl,
            "pat": self.pat,
        }
