"""Retry instead of emulate: ``EMULTYPE_ALLOW_RETRY_PF`` (spec/kvm-mmu.md §2.3 item 6, §3.2).

A write that faults on a write-protected gfn may be re-executed after KVM
unprotects the gfn (zaps its shadow pages) instead of being emulated. Eras:
3.2-6.11 ``retry_instruction`` (always retries once per rip+address, even
when nothing was unprotected), 6.12+ ``kvm_mmu_unprotect_gfn_and_retry``
(retries only when a shadow page was zapped). Writes use ``insn="stos"``
(not tagged ``PageTable`` by KVM's decoder); a plain MOV is never retried.
"""

from __future__ import annotations

from typing import Any

import kvmmu
import pytest
from conftest import RAM_HVA
from conftest import make_vm as make_tdp_vm
from kvmmu.memslot import KVM_MEM_READONLY
from kvmmu.spte import PT_WRITABLE_MASK
from test_shadow import TABLE_WINDOW, URW, GuestTables, make_vm

OLD, NEW = "6.8", "6.16"


class Recorder:
    """A page-track notifier (an external write-tracking user such as KVMGT)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes]] = []

    @kvmmu.hookimpl
    def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
        self.seen.append((gpa, new))


def shadow_env(era: str) -> tuple[Any, GuestTables, Recorder]:
    vm = make_vm(era=era)
    gt = GuestTables(vm)
    for i in range(16):
        gt.map(0x400000 + i * 0x1000, 0x200000 + i * 0x1000)
    gt.map_tables()
    gt.start()
    rec = Recorder()
    vm.register_plugin(rec, "recorder")
    return vm, gt, rec


@pytest.mark.parametrize("era", [OLD, NEW])
def test_write_to_shadowed_page_table_is_retried_not_emulated(era: str) -> None:
    """x86_emulate_instruction: unprotect (zap the PD's sps) and re-execute;
    the write lands through a writable SPTE and no notifier sees it."""
    vm, gt, rec = shadow_env(era)
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    pd = pde >> 12
    pd_sps = [sp for sp in vm.mmu.active.values() if sp.gfn == pd]
    assert pd_sps and vm.page_track.count(pd) == 1
    new_pt = gt.alloc()
    gt.write(new_pt, 0x20A000 | URW)
    r = v.access(TABLE_WINDOW + pde, "write", 8, (new_pt | URW).to_bytes(8, "little"), insn="stos")
    assert not r.emulated and r.fault is None
    assert vm.stats["emulation_retries"] == 1 and vm.stats["emulated_writes"] == 0
    assert r.exits == 2  # the fault that asked for emulation, then the re-executed write's
    assert r.spte is not None and r.spte & PT_WRITABLE_MASK
    assert all(sp.invalid for sp in pd_sps) and vm.page_track.count(pd) == 0
    assert rec.seen == [] and vm.page_track.writes == 0
    assert gt.read(pde) == new_pt | URW
    # The zapped PD is rebuilt from the new guest entry on the next access.
    assert v.access(0x400000, "read").gpa == 0x20A000
    assert vm.check_invariants() == []


@pytest.mark.parametrize("era", [OLD, NEW])
def test_plain_mov_to_page_table_is_emulated(era: str) -> None:
    """MOV r/m is tagged PageTable (x86_page_table_writing_insn): emulated."""
    vm, gt, rec = shadow_env(era)
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    r = v.access(TABLE_WINDOW + pde, "write", 8, gt.read(pde).to_bytes(8, "little"))
    assert r.emulated and r.exits == 1
    assert vm.stats["emulation_retries"] == 0 and len(rec.seen) == 1


@pytest.mark.parametrize(("era", "exits", "retries"), [(OLD, 2, 1), (NEW, 1, 0)])
def test_externally_tracked_gfn_is_emulated_shadow(era: str, exits: int, retries: int) -> None:
    """Unprotect zaps nothing for a KVMGT-tracked data page: before 6.12
    retry_instruction retries anyway once (an extra fault round trip); 6.12+
    emulates at once. The notifier sees the write either way."""
    vm, _gt, rec = shadow_env(era)
    v = vm.vcpus[0]
    v.access(0x405000, "read")
    vm.write_track_add_gfn(0x205)
    r = v.access(0x405000, "write", 4, b"abcd", insn="stos")
    assert r.emulated and r.exits == exits
    assert vm.stats["emulation_retries"] == retries
    assert rec.seen == [(0x205000, b"abcd")] and vm.read_guest(0x205000, 4) == b"abcd"
    assert vm.page_track.count(0x205) == 1
    assert vm.check_invariants() == []


@pytest.mark.parametrize(("era", "exits", "retries"), [(OLD, 2, 1), (NEW, 1, 0)])
def test_externally_tracked_gfn_is_emulated_tdp(era: str, exits: int, retries: int) -> None:
    """TDP has no indirect shadow pages: before 6.12 the retry is one wasted
    round trip; 6.12+ (indirect_shadow_pages == 0) does not retry."""
    vm = make_tdp_vm(era=era)
    rec = Recorder()
    vm.register_plugin(rec, "recorder")
    v = vm.vcpus[0]
    v.access(0x10000, "read")
    vm.write_track_add_gfn(0x10)
    r = v.access(0x10000, "write", 4, b"abcd", insn="stos")
    assert r.emulated and r.exits == exits
    assert vm.stats["emulation_retries"] == retries
    assert rec.seen == [(0x10000, b"abcd")]
    # A plain MOV is never retried, in any era.
    r = v.access(0x10000, "write", 4, b"efgh")
    assert r.emulated and r.exits == 1 and vm.stats["emulation_retries"] == retries


@pytest.mark.parametrize("era", [OLD, NEW])
@pytest.mark.parametrize("tdp", [True, False])
def test_mmio_is_never_retried(era: str, tdp: bool) -> None:
    """No memslot: the MMIO info is cached (or the MMIO SPTE path skips the
    flag), so EMULTYPE_ALLOW_RETRY_PF is never set."""
    if tdp:
        vm = make_tdp_vm(era=era)
        v, gva = vm.vcpus[0], 0x4000000
    else:
        vm, gt, _rec = shadow_env(era)
        gt.map(0x600000, 0x4000000)
        v, gva = vm.vcpus[0], 0x600000
    for _ in range(2):  # first fault (no SPTE), then through the MMIO SPTE
        r = v.access(gva, "write", 4, b"mmio", insn="stos")
        assert r.emulated and r.exit == "mmio" and r.exits == 1
    assert vm.stats["emulation_retries"] == 0


@pytest.mark.parametrize(("era", "exits", "retries"), [(OLD, 2, 1), (NEW, 1, 0)])
def test_write_to_readonly_slot(era: str, exits: int, retries: int) -> None:
    """KVM_PFN_ERR_RO_FAULT is not MMIO-cached: before 6.12 it gets the flag
    and one retry; 6.12+ returns RET_PF_EMULATE, not WRITE_PROTECTED."""
    vm = make_tdp_vm(era=era)
    vm.host.mmap_anon(RAM_HVA + (64 << 20), 1 << 20)
    vm.set_user_memory_region(1, KVM_MEM_READONLY, 0x8000000, 1 << 20, RAM_HVA + (64 << 20))
    r = vm.vcpus[0].access(0x8000000, "write", 4, b"rom!", insn="stos")
    assert r.emulated and r.exit == "mmio" and r.exits == exits
    assert vm.stats["emulation_retries"] == retries


@pytest.mark.parametrize(("era", "second_retries"), [(OLD, 2), (NEW, 1)])
def test_retry_once_per_rip_and_address(era: str, second_retries: int) -> None:
    """A write to the root table (PML4): unprotect zaps the root, the reload
    shadows the PML4 again and the write faults again on the same rip and
    address -> emulated (last_retry_eip/addr). Before 6.12 the emulation
    resets the guard (retry_instruction), so the same instruction retries
    again next time; 6.12+ keeps it (kvm_mmu_write_protect_fault)."""
    vm, gt, rec = shadow_env(era)
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pml4e = gt.cr3 + 300 * 8  # an unused entry
    gva = TABLE_WINDOW + pml4e
    r = v.access(gva, "write", 8, bytes(8), insn="stos", rip=0x1000)
    assert r.emulated and r.exits == 2 and vm.stats["emulation_retries"] == 1
    assert len(rec.seen) == 1
    r = v.access(gva, "write", 8, bytes(8), insn="stos", rip=0x1000)
    assert r.emulated and vm.stats["emulation_retries"] == second_retries
    # Another instruction (another rip) may retry again.
    r = v.access(gva, "write", 8, bytes(8), insn="stos", rip=0x2000)
    assert r.emulated and vm.stats["emulation_retries"] == second_retries + 1
    assert v.access(0x400000, "read").gpa == 0x200000
    assert vm.check_invariants() == []


def test_no_retry_before_retry_instruction_existed() -> None:
    """The ~3.1 x86.c has no retry_instruction: the write is emulated."""
    vm, gt, rec = shadow_env("3.1")
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    r = v.access(TABLE_WINDOW + pde, "write", 8, gt.read(pde).to_bytes(8, "little"), insn="stos")
    assert r.emulated and vm.stats["emulation_retries"] == 0 and len(rec.seen) == 1


def test_insn_must_be_known() -> None:
    vm = make_tdp_vm()
    with pytest.raises(ValueError, match="insn must be one of"):
        vm.vcpus[0].access(0x1000, "write", 1, b"x", insn="cmpxchg")  # type: ignore[arg-type]


def test_refused_access_does_not_become_the_current_instruction() -> None:
    """Bad input changes nothing: an access refused for its size or data is
    not the instruction the retry guard (last_retry_eip) compares next."""
    vm = make_tdp_vm()
    v = vm.vcpus[0]
    v.access(0x1000, "write", 1, b"x", insn="stos", rip=0x1000)
    with pytest.raises(ValueError, match="exactly 8 bytes"):
        v.access(0x1000, "write", 8, b"x", insn="xchg", rip=0x2000)
    with pytest.raises(ValueError, match="size must be"):
        v.access(0x1000, "read", 0)
    assert (v.insn_rip, v.insn) == (0x1000, "stos")
