"""Page tracking and the notifier chain (issue 6; spec/kvm-mmu.md §2).

Guest accesses run with paging off (gva == gpa) so each write is one store
through the MMU: a write to a tracked gfn faults, is emulated, lands, and
then reaches the notifiers.
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import pytest
from conftest import RAM_HVA, make_vm
from kvmmu.errors import PluginError
from kvmmu.memslot import MemslotChange

GFN = 0x10
GPA = GFN << 12


class Recorder:
    """A page-track notifier that records what it sees (and when)."""

    def __init__(self, vm: Any, log: list[tuple[str, Any]], name: str) -> None:
        self.vm, self.log, self.name = vm, log, name

    @kvmmu.hookimpl
    def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
        # the bytes have landed before any notifier runs (emulator_write_phys)
        landed = self.vm.read_guest(gpa, len(new))
        self.log.append((self.name, (gpa, new, landed == new)))

    @kvmmu.hookimpl
    def kvmmu_track_remove_region(self, gfn: int, nr_pages: int) -> None:
        self.log.append((self.name, ("remove_region", gfn, nr_pages)))


def _leaf(vm: Any, gpa: int) -> tuple[int, int] | None:
    hit: tuple[int, int] | None = vm.mmu.translate(gpa)
    return hit


def test_add_gfn_outside_every_slot_is_einval() -> None:
    vm = make_vm()
    with pytest.raises(kvmmu.KvmError) as ei:
        vm.write_track_add_gfn(0x10_0000)
    assert ei.value.errno == errno.EINVAL and "0x100000" in str(ei.value)


def test_remove_below_zero_is_refused_and_changes_nothing() -> None:
    vm = make_vm()
    with pytest.raises(kvmmu.KvmError) as ei:
        vm.write_track_remove_gfn(GFN)
    assert ei.value.errno == errno.EINVAL
    assert vm.page_track.count(GFN) == 0


def test_tracked_gfn_loses_writable_spte_at_once() -> None:
    vm = make_vm()
    vcpu = vm.vcpus[0]
    vcpu.access(GPA, "write", 8, b"\x01" * 8)
    spte, _ = _leaf(vm, GPA) or (0, 0)
    assert spte & vm.spte_format.writable_mask
    vm.write_track_add_gfn(GFN)
    spte, _ = _leaf(vm, GPA) or (0, 0)
    assert not spte & vm.spte_format.writable_mask
    assert not spte & vm.spte_format.mmu_writable_mask
    assert vm.check_invariants() == []


def test_tracked_gfn_never_writable_nor_huge_while_tracked() -> None:
    vm = make_vm(ram_size=8 << 20)
    vm.host.munmap(RAM_HVA, 8 << 20)  # back it with THP so 2M mappings are possible
    vm.host.mmap_anon(RAM_HVA, 8 << 20, page_level=2)
    vm.write_track_add_gfn(0x200)
    vcpu = vm.vcpus[0]
    r = vcpu.access(0x200000, "read")
    assert r.level == 1  # disallow_lpage: 4K only
    r2 = vcpu.access(0x400000, "read")  # an untracked 2M frame maps huge
    assert r2.level == 2
    r3 = vcpu.access(0x200008, "write", 8, b"\x02" * 8)
    assert r3.emulated
    spte, level = _leaf(vm, 0x200000) or (0, 0)
    assert level == 1 and not spte & vm.spte_format.writable_mask
    vm.write_track_remove_gfn(0x200)
    # no un-protect: write access comes back lazily on the next write fault
    assert not (_leaf(vm, 0x200000) or (0, 0))[0] & vm.spte_format.writable_mask
    r4 = vcpu.access(0x200008, "write", 8, b"\x03" * 8)
    assert not r4.emulated
    assert vm.check_invariants() == []


def test_counter_moves_per_add_and_remove() -> None:
    vm = make_vm()
    vm.write_track_add_gfn(GFN)
    vm.write_track_add_gfn(GFN)
    assert vm.page_track.count(GFN) == 2
    vm.write_track_remove_gfn(GFN)
    assert vm.page_track.count(GFN) == 1
    assert vm.page_track.is_write_tracked(vm.slot_of(GPA), GFN)


def test_notifiers_called_newest_first_after_bytes_land() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    vm.register_plugin(Recorder(vm, log, "old"), "old")
    vm.register_plugin(Recorder(vm, log, "new"), "new")
    vm.write_track_add_gfn(GFN)
    r = vm.vcpus[0].access(GPA + 8, "write", 8, b"\xaa" * 8)
    assert r.emulated
    assert log == [("new", (GPA + 8, b"\xaa" * 8, True)), ("old", (GPA + 8, b"\xaa" * 8, True))]


def test_untracked_write_is_not_notified() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    vm.register_plugin(Recorder(vm, log, "r"), "r")
    vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8)
    vm.write_guest(GPA, b"\x02" * 8)  # host-side writes never notify
    assert log == []


def test_write_crossing_a_page_is_split_into_two_notifications() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    vm.register_plugin(Recorder(vm, log, "r"), "r")
    vm.write_track_add_gfn(GFN)
    vm.write_track_add_gfn(GFN + 1)
    vm.vcpus[0].access(GPA + 0xFFC, "write", 8, b"12345678")
    assert [entry[1][:2] for entry in log] == [(GPA + 0xFFC, b"1234"), (GPA + 0x1000, b"5678")]


def test_kvm_mmu_track_write_runs_after_the_notifiers() -> None:
    vm = make_vm()
    order: list[str] = []
    vm.register_plugin(_Named(order, "notifier"), "n")
    real = vm.mmu.track_write

    def mmu_track_write(gpa: int, new: bytes) -> None:
        order.append("kvm_mmu_track_write")
        real(gpa, new)

    vm.mmu.track_write = mmu_track_write
    vm.write_track_add_gfn(GFN)
    vm.vcpus[0].access(GPA, "write", 4, b"abcd")
    assert order == ["notifier", "kvm_mmu_track_write"]


class _Named:
    def __init__(self, order: list[str], name: str) -> None:
        self.order, self.name = order, name

    @kvmmu.hookimpl
    def kvmmu_track_write(self) -> None:
        self.order.append(self.name)


def test_register_and_unregister_inside_a_callback_is_safe() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    victim = Recorder(vm, log, "victim")

    class Churn:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            log.append(("churn", None))
            if "victim" in vm.plugins.names():
                vm.unregister_plugin("victim")
                vm.register_plugin(Recorder(vm, log, "late"), "late")

    vm.register_plugin(victim, "victim")
    vm.register_plugin(Churn(), "churn")
    vm.write_track_add_gfn(GFN)
    vm.vcpus[0].access(GPA, "write", 8, b"\x05" * 8)
    # victim was unregistered during the walk: not called after that returned;
    # "late" joined during the walk: not part of this walk (SRCU snapshot).
    assert [n for n, _ in log] == ["churn"]
    log.clear()
    vm.vcpus[0].access(GPA, "write", 8, b"\x06" * 8)
    assert [n for n, _ in log] == ["late", "churn"]


def test_raising_notifier_write_landed_others_ran_vm_consistent() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []

    class Broken:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            raise RuntimeError("driver bug")

    vm.register_plugin(Recorder(vm, log, "ok"), "ok")
    vm.register_plugin(Broken(), "broken")
    vm.write_track_add_gfn(GFN)
    with pytest.raises(PluginError) as ei:
        vm.vcpus[0].access(GPA, "write", 8, b"\x07" * 8)
    assert ei.value.plugin == "broken" and ei.value.hook == "kvmmu_track_write"
    assert vm.read_guest(GPA, 8) == b"\x07" * 8
    assert log and log[0][0] == "ok"
    assert vm.check_invariants() == []


def test_slot_delete_calls_track_remove_region_and_drops_counts() -> None:
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    vm.register_plugin(Recorder(vm, log, "r"), "r")
    vm.write_track_add_gfn(GFN)
    vm.set_user_memory_region(0, 0, 0, 0, RAM_HVA)  # DELETE
    assert ("r", ("remove_region", 0, (16 << 20) >> 12)) in log
    assert vm.page_track.count(GFN) == 0
    vm.set_user_memory_region(0, 0, 0, 16 << 20, RAM_HVA)  # CREATE again
    log.clear()
    vm.vcpus[0].access(GPA, "write", 8, b"\x08" * 8)
    assert log == []  # no notification for those gfns any more
    assert vm.page_track.count(GFN) == 0


def test_slot_move_starts_with_fresh_counts() -> None:
    """MOVE resets the arch metadata, write-track counts included (§2.5)."""
    vm = make_vm()
    vm.write_track_add_gfn(GFN)
    vm.set_user_memory_region(0, 0, 64 << 20, 16 << 20, RAM_HVA)  # MOVE
    assert vm.page_track.count((64 << 20 >> 12) + GFN) == 0
    assert vm.check_invariants() == []


def test_slot_move_with_a_notifier_refused_from_6_6_and_flushed_before() -> None:
    """6.6+: kvm_arch_prepare_memory_region refuses MOVE while any external
    tracker is registered (kvm_page_track_has_external_user). Before 6.6 the
    MOVE goes through and the old API's track_flush_slot runs for it, as for a
    DELETE (spec/kvm-mmu.md §2.5): the hook gets the old slot's range."""
    vm = make_vm()
    log: list[tuple[str, Any]] = []
    vm.register_plugin(Recorder(vm, log, "r"), "r")
    with pytest.raises(kvmmu.KvmError) as ei:
        vm.set_user_memory_region(0, 0, 64 << 20, 16 << 20, RAM_HVA)
    assert ei.value.errno == errno.EINVAL and "r" in str(ei.value)
    assert vm.slot_of(0) is not None
    old = make_vm(era="6.5")
    old.register_plugin(Recorder(old, log, "r"), "r")
    old.write_track_add_gfn(GFN)
    old.set_user_memory_region(0, 0, 64 << 20, 16 << 20, RAM_HVA)  # MOVE
    assert ("r", ("remove_region", 0, (16 << 20) >> 12)) in log
    assert old.page_track.count((64 << 20 >> 12) + GFN) == 0
    assert old.check_invariants() == []


def test_kvmgt_style_veto_of_move_changes_nothing() -> None:
    vm = make_vm()

    class Veto:
        @kvmmu.hookimpl
        def kvmmu_memslot_prepare(self, change: MemslotChange) -> None:
            if change is MemslotChange.MOVE:
                raise kvmmu.KvmError(errno.EINVAL, "MOVE refused while attached")

    vm.register_plugin(Veto(), "veto")
    gen = vm.memslots.generation
    with pytest.raises(kvmmu.KvmError):
        vm.set_user_memory_region(0, 0, 64 << 20, 16 << 20, RAM_HVA)
    assert vm.memslots.generation == gen
    assert vm.slot_of(0) is not None and vm.slot_of(64 << 20) is None


def test_invariant_catches_a_tracked_gfn_left_huge_mappable() -> None:
    vm = make_vm()
    vm.write_track_add_gfn(0x200)
    assert vm.check_invariants() == []
    slot = vm.slot_of(0x200000)
    slot.lpage_info[2][slot.lpage_idx(0x200, 2)] = 0  # break the disallow count behind KVM's back
    assert any("disallow count of 0" in v for v in vm.check_invariants())
