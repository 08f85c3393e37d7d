"""vCPU accesses: walk, TDP, emulation, memory type, trace (issue 5 item 6)."""

from __future__ import annotations

import errno

import kvmmu
import pytest
from conftest import RAM_HVA, make_vm
from kvmmu.guest_pt import GuestPageTables
from kvmmu.memtype import MemType


def _long_mode(vm: kvmmu.VM, **mapping: int) -> GuestPageTables:
    pt = GuestPageTables(vm, 0x100000, 0x40000)
    pt.map(0x400000, 0x400000, 0x10000, **mapping)
    vm.vcpus[0].set_sregs(**pt.long_mode_sregs())
    return pt


def test_access_reports_gpa_hpa_spte_memtype_and_traces() -> None:
    vm = make_vm()
    _long_mode(vm)
    vcpu = vm.vcpus[0]
    trace = vcpu.enable_trace()
    w = vcpu.access(0x400010, "write", 8, b"\x11" * 8)
    r = vcpu.access(0x400010, "read")
    assert w.fault is None and r.data == b"\x11" * 8
    assert r.gpa == 0x400010 and r.hpa is not None and r.hpa & 0xFFF == 0x10
    assert r.spte is not None and r.level == 1
    assert r.memtype == MemType.WB  # VMX 6.16 without noncoherent DMA: WB|IPAT
    ev = trace[-1]
    assert (ev.gva, ev.gpa, ev.hpa, ev.spte, ev.memtype, ev.outcome) == (
        0x400010,
        0x400010,
        r.hpa,
        r.spte,
        "WB",
        "ok",
    )


def test_guest_fault_injected_with_error_code() -> None:
    vm = make_vm()
    _long_mode(vm, writable=False)
    vcpu = vm.vcpus[0]
    r = vcpu.access(0x400000, "write", 4, b"abcd")  # CR0.WP=1: supervisor write faults
    assert r.fault is not None and r.fault.vector == 14
    assert r.fault.error_code == 0b011  # P | W
    r2 = vcpu.access(0x900000, "read")  # not mapped
    assert r2.fault is not None and r2.fault.error_code == 0


def test_access_crossing_a_page_is_split() -> None:
    vm = make_vm()
    _long_mode(vm)
    vcpu = vm.vcpus[0]
    vcpu.access(0x400FFC, "write", 8, b"ABCDEFGH")
    assert vm.read_guest(0x400FFC, 8) == b"ABCDEFGH"
    assert vcpu.access(0x400FFC, "read", 8).data == b"ABCDEFGH"


@pytest.mark.parametrize("tdp", [True, False])
def test_page_crossing_write_faulting_on_the_second_page_writes_nothing(tdp: bool) -> None:
    """A faulting x86 instruction commits nothing: the guest #PF on the second
    half leaves the first half's bytes unwritten, and CR2 is the second half
    (TDP and shadow paging alike)."""
    vm = make_vm(tdp=tdp)
    _long_mode(vm)  # maps gva 0x400000..0x40FFFF
    vcpu = vm.vcpus[0]
    vm.write_guest(0x40FFFC, b"\x00" * 4)
    r = vcpu.access(0x40FFFC, "write", 8, b"ABCDEFGH")
    assert r.fault is not None and r.fault.vector == 14 and r.fault.address == 0x410000
    assert vm.read_guest(0x40FFFC, 4) == b"\x00" * 4


def test_page_crossing_read_into_mmio_is_emulated_whole() -> None:
    """The second half hits no memslot: KVM emulates the instruction, reading
    the RAM half from guest memory and the MMIO half from the device (or
    all-ones, with an exit to userspace)."""
    vm = make_vm(ram_size=1 << 20)
    vm.write_guest(0xFFFFC, b"WXYZ")
    r = vm.vcpus[0].access(0xFFFFC, "read", 8)  # paging off: gva = gpa
    assert r.emulated and r.exit == "mmio"
    assert r.data == b"WXYZ" + b"\xff" * 4


def test_page_crossing_write_both_halves_native_after_faults() -> None:
    vm = make_vm()
    vcpu = vm.vcpus[0]
    r = vcpu.access(0x1FFC, "write", 8, b"ABCDEFGH")
    assert r.fault is None and not r.emulated and r.exits == 2  # one EPT violation per page
    assert vm.read_guest(0x1FFC, 8) == b"ABCDEFGH"
    assert vcpu.access(0x1FFC, "read", 8).exits == 0


@pytest.mark.parametrize("tracked", [0x400, 0x401])
def test_shadow_page_crossing_write_into_a_tracked_page_is_emulated_whole(tracked: int) -> None:
    """Shadow paging: if either half needs emulation KVM emulates the whole
    instruction, one emulator_write_phys (and notification) per half."""
    vm = make_vm(tdp=False)
    _long_mode(vm)
    log: list[tuple[int, bytes]] = []

    class Rec:
        @kvmmu.hookimpl
        def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
            log.append((gpa, new))

    vm.register_plugin(Rec(), "rec")
    vm.write_track_add_gfn(tracked)
    r = vm.vcpus[0].access(0x400FFA, "write", 8, b"ABCDEFGH")
    assert r.fault is None and r.emulated
    assert log == [(0x400FFA, b"ABCDEF"), (0x401000, b"GH")]
    assert vm.read_guest(0x400FFA, 8) == b"ABCDEFGH"
    assert vm.check_invariants() == []


def test_unclaimed_mmio_read_is_all_ones_and_exits() -> None:
    vm = make_vm()
    r = vm.vcpus[0].access(0xF000_0000, "read", 4)  # paging off, no memslot
    assert r.emulated and r.exit == "mmio" and r.data == b"\xff" * 4


def test_write_to_readonly_slot_exits_to_userspace_and_lands_nowhere() -> None:
    vm = make_vm()
    vm.host.mmap_anon(RAM_HVA + (64 << 20), 1 << 20)
    vm.set_user_memory_region(1, kvmmu.KVM_MEM_READONLY, 64 << 20, 1 << 20, RAM_HVA + (64 << 20))
    vcpu = vm.vcpus[0]
    assert vcpu.access(64 << 20, "read").data == bytes(8)
    r = vcpu.access(64 << 20, "write", 8, b"\x99" * 8)
    assert r.emulated and r.exit == "mmio"
    assert vm.read_guest(64 << 20, 8) == bytes(8)
    assert vm.check_invariants() == []


def test_bad_pat_refused_and_unchanged() -> None:
    vm = make_vm()
    vcpu = vm.vcpus[0]
    before = vcpu.get_msr(0x277)
    with pytest.raises(kvmmu.KvmError) as ei:
        vcpu.set_msr(0x277, 0x0000000000000002)  # type 2 is reserved
    assert ei.value.errno == errno.EINVAL and "PAT" in str(ei.value)
    assert vcpu.get_msr(0x277) == before


def test_guest_pat_wc_on_wc_bar_gives_wc() -> None:
    vm = make_vm()
    vm.host.map_mmio(RAM_HVA + (1 << 30), 1 << 16, hpa=0xE000_0000, memtype=MemType.WC)
    vm.set_user_memory_region(1, 0, 0xE000_0000, 1 << 16, RAM_HVA + (1 << 30))
    pt = GuestPageTables(vm, 0x100000, 0x40000)
    pt.map(0x800000, 0xE000_0000, 0x1000, pat_index=1)  # PAT1 is WT by default
    vcpu = vm.vcpus[0]
    vcpu.set_msr(0x277, 0x0007040600070106)  # PAT1 = WC, as Linux programs it
    vcpu.set_sregs(**pt.long_mode_sregs())
    r = vcpu.access(0x800000, "read")
    assert r.memtype == MemType.WC  # EPT UC (MMIO, no IPAT) + guest WC -> WC (SDM 11-7)
    assert (r.spte or 0) & 0x78 == 0  # memtype UC, IPAT clear


def test_bad_access_arguments_are_clear_errors() -> None:
    vcpu = make_vm().vcpus[0]
    with pytest.raises(ValueError, match="kind"):
        vcpu.access(0, "exec")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly 8 bytes"):
        vcpu.access(0, "write", 8, b"x")
    with pytest.raises(ValueError, match="size"):
        vcpu.access(0, "read", 0)


def test_32bit_guest_ad_update_leaves_the_neighbouring_entry_alone() -> None:
    """32-bit paging: entries are 4 bytes; setting A must not write 8 (TDP path)."""
    vm = make_vm()
    pd, pt = 0x100000, 0x101000
    vm.write_guest(pd, (pt | 0x7).to_bytes(4, "little"))  # PDE 0 -> page table
    vm.write_guest(pt + 4 * 4, (0x4000 | 0x7).to_bytes(4, "little"))  # PTE 4
    vm.write_guest(pt + 5 * 4, (0x5000 | 0x7).to_bytes(4, "little"))  # PTE 5 (neighbour)
    vcpu = vm.vcpus[0]
    vcpu.set_sregs(cr0=0x80000011, cr3=pd, cr4=0)
    r = vcpu.access(0x4000, "read", 4)
    assert r.fault is None and r.gpa == 0x4000
    assert int.from_bytes(vm.read_guest(pt + 4 * 4, 4), "little") & 0x20  # A set
    assert int.from_bytes(vm.read_guest(pt + 5 * 4, 4), "little") == 0x5007  # untouched


def test_same_value_cr3_write_reloads_the_mmu_context() -> None:
    vm = make_vm()
    calls: list[int] = []
    vm.mmu.load_pgd = lambda vcpu: calls.append(vcpu.cr3)
    vcpu = vm.vcpus[0]
    vcpu.set_sregs(cr3=0x5000)
    vcpu.set_sregs(cr3=0x5000)
    assert calls == [0x5000, 0x5000]
