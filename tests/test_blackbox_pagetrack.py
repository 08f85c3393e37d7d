"""Black-box tests: the page-track notifier chain, emulation and the race seeds.

Rules from spec/kvm-mmu.md §2.1-2.5 (checked against
``arch/x86/kvm/mmu/page_track.c`` and ``arch/x86/kvm/x86.c``) and seed 004
(the 2010 walk/fetch race), driven only through the public API: VMs, vCPU
accesses, plugins and ``kvmmu.explore``. Guest paging is off unless a test
says otherwise, so a gva is its gpa.
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import pytest
from conftest import RAM_HVA, FlushRecorder, make_vm
from kvmmu.explore import explore, explore_model
from kvmmu.explore_scenarios import builtin_scenario_dict, scenario_from_dict

GFN = 0x10
GPA = GFN << 12


class Rec:
    """A notifier: records (name, gpa, new, what guest memory holds at the call)."""

    def __init__(self, vm: Any, log: list[Any], name: str) -> None:
        self.vm, self.log, self.name = vm, log, name

    @kvmmu.hookimpl
    def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
        self.log.append((self.name, gpa, bytes(new), self.vm.read_guest(gpa, len(new))))

    @kvmmu.hookimpl
    def kvmmu_track_remove_region(self, gfn: int, nr_pages: int) -> None:
        self.log.append((self.name, "remove_region", gfn, nr_pages))


def names(log: list[Any]) -> list[str]:
    return [e[0] for e in log]


def writable(vm: Any, gpa: int) -> bool:
    hit = vm.mmu.translate(gpa)
    return hit is not None and bool(hit[0] & vm.spte_format.writable_mask)


# ------------------------------------------------------------ §2.1/§2.2 chain
def test_three_notifiers_newest_first_and_reregister_moves_to_head() -> None:
    """hlist_add_head_rcu: the newest node is walked first; re-adding goes to the head."""
    vm = make_vm()
    log: list[Any] = []
    for n in "abc":
        vm.register_plugin(Rec(vm, log, n), n)
    vm.unregister_plugin("a")
    vm.register_plugin(Rec(vm, log, "a"), "a")
    vm.write_track_add_gfn(GFN)
    vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8)
    assert names(log) == ["a", "c", "b"]


def test_notifier_unregistering_itself_in_its_callback() -> None:
    """The walk goes on to the older nodes; the node is never called again."""
    vm = make_vm()
    log: list[Any] = []

    class Once:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            log.append(("once",))
            vm.unregister_plugin("once")

    vm.register_plugin(Rec(vm, log, "old"), "old")
    vm.register_plugin(Once(), "once")
    vm.write_track_add_gfn(GFN)
    vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8)
    vm.vcpus[0].access(GPA, "write", 8, b"\x02" * 8)
    assert names(log) == ["once", "old", "old"]


def test_unregistered_node_not_called_even_if_its_name_is_reused() -> None:
    vm = make_vm()
    log: list[Any] = []
    first = Rec(vm, log, "first-object")

    class Swap:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            if vm.plugins.get("old") is first:
                vm.unregister_plugin("old")
                vm.register_plugin(Rec(vm, log, "second-object"), "old")

    vm.register_plugin(first, "old")
    vm.register_plugin(Swap(), "swap")
    vm.write_track_add_gfn(GFN)
    vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8)
    assert names(log) == []  # neither the removed node nor the new head


def test_notifier_raising_kvmerror_still_lets_older_nodes_and_kvm_run() -> None:
    vm = make_vm(tdp=False)
    log: list[Any] = []

    class Bad:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            raise kvmmu.KvmError(errno.EIO, "driver refused")

    vm.register_plugin(Rec(vm, log, "old"), "old")
    vm.register_plugin(Bad(), "bad")
    vm.write_track_add_gfn(GFN)
    with pytest.raises(kvmmu.PluginError) as ei:
        vm.vcpus[0].access(GPA, "write", 4, b"wxyz")
    assert ei.value.plugin == "bad" and ei.value.hook == "kvmmu_track_write"
    assert log == [("old", GPA, b"wxyz", b"wxyz")]
    assert vm.read_guest(GPA, 4) == b"wxyz"
    assert vm.check_invariants() == []


# ----------------------------------------------------- §2.3 item 5: emulation
@pytest.mark.parametrize("tdp", [True, False])
def test_each_write_size_passes_exact_gpa_and_new_after_the_bytes_land(tdp: bool) -> None:
    vm = make_vm(tdp=tdp)
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "r"), "r")
    vm.write_track_add_gfn(GFN)
    want = []
    for n, off in ((1, 0x101), (2, 0x202), (4, 0x304), (8, 0x408)):
        data = bytes(range(0x40 + n, 0x40 + 2 * n))
        r = vm.vcpus[0].access(GPA + off, "write", n, data)
        assert r.emulated
        want.append(("r", GPA + off, data, data))
    assert log == want
    assert vm.page_track.writes == 4


@pytest.mark.parametrize("tracked", [GFN, GFN + 1])
def test_page_crossing_write_with_one_tracked_page_notifies_both_halves(tracked: int) -> None:
    vm = make_vm()
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "r"), "r")
    vm.write_track_add_gfn(tracked)
    vm.vcpus[0].access(GPA + 0xFFA, "write", 8, b"ABCDEFGH")
    assert [e[1:3] for e in log] == [(GPA + 0xFFA, b"ABCDEF"), (GPA + 0x1000, b"GH")]


def test_guest_paging_notifier_gets_the_gpa_not_the_gva() -> None:
    vm = make_vm()
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "r"), "r")
    # 32-bit paging, 4 MiB page (PSE): gva 0x40_0000 -> gpa 0.
    vm.write_guest(0x1000 + 4, (0x0 | 0x83 | 0x4).to_bytes(4, "little"))
    vm.vcpus[0].set_sregs(cr0=0x8000_0011, cr3=0x1000, cr4=0x10)
    vm.write_track_add_gfn(GFN)
    r = vm.vcpus[0].access(0x40_0000 + GPA + 0x10, "write", 4, b"\xde\xad\xbe\xef")
    assert r.emulated and log == [("r", GPA + 0x10, b"\xde\xad\xbe\xef", b"\xde\xad\xbe\xef")]


def test_tracked_gfn_in_readonly_slot_write_exits_to_mmio_without_notifying() -> None:
    """A READONLY slot: kvm_vcpu_write_guest fails, so no kvm_page_track_write."""
    vm = kvmmu.VM(kvmmu.VMConfig())
    vm.host.mmap_anon(RAM_HVA, 1 << 20)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_READONLY, 0, 1 << 20, RAM_HVA)
    vm.write_guest(GPA, b"12345678")
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "r"), "r")
    vm.write_track_add_gfn(GFN)
    w = vm.vcpus[0].access(GPA, "write", 8, b"\x02" * 8)
    assert w.exit == "mmio" and log == [] and vm.page_track.writes == 0
    r = vm.vcpus[0].access(GPA, "read", 8)
    assert r.data == b"12345678" and not r.emulated
    assert vm.check_invariants() == []


# ------------------------------------------------- §2.3 items 1-4: protection
def test_add_write_protects_and_flushes_only_when_something_changed() -> None:
    vm = make_vm()
    fr = FlushRecorder()
    vm.register_plugin(fr, "flush")
    vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8)
    assert writable(vm, GPA)
    fr.ranges.clear()
    vm.write_track_add_gfn(GFN)
    assert not writable(vm, GPA)
    assert any(g <= GFN < g + n for g, n in fr.ranges)
    fr.ranges.clear()
    vm.write_track_add_gfn(GFN)  # already read-only: nothing changed, no flush
    vm.write_track_add_gfn(GFN + 0x20)  # never mapped: no flush
    assert fr.ranges == []
    assert vm.page_track.count(GFN) == 2


def test_add_on_a_huge_mapping_protects_it_and_neighbours_refault_at_4k() -> None:
    vm = make_vm(ram_size=8 << 20)
    vm.host.munmap(RAM_HVA, 8 << 20)
    vm.host.mmap_anon(RAM_HVA, 8 << 20, page_level=2)
    fr = FlushRecorder()
    vm.register_plugin(fr, "flush")
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "r"), "r")
    v = vm.vcpus[0]
    assert v.access(0x200000, "write", 8, b"\x01" * 8).level == 2
    fr.ranges.clear()
    vm.write_track_add_gfn(0x201)
    assert not writable(vm, 0x201000)  # the huge SPTE lost W at once (item 1)
    assert any(g <= 0x201 < g + n for g, n in fr.ranges)
    a = v.access(0x200008, "write", 8, b"\x02" * 8)  # untracked neighbour
    assert not a.emulated and a.level == 1  # item 3: 4K only now
    b = v.access(0x201008, "write", 8, b"\x03" * 8)
    assert b.emulated and log == [("r", 0x201008, b"\x03" * 8, b"\x03" * 8)]
    c = v.access(0x201010, "read", 8)
    assert not c.emulated and c.level == 1
    assert vm.check_invariants() == []


@pytest.mark.parametrize("tdp", [True, False])
def test_not_present_read_maps_read_only_then_write_emulates(tdp: bool) -> None:
    vm = make_vm(tdp=tdp)
    vm.write_track_add_gfn(GFN)
    r = vm.vcpus[0].access(GPA, "read", 8)
    assert not r.emulated  # item 4: a not-present fault is handled normally
    assert r.spte is not None and not r.spte & vm.spte_format.writable_mask
    assert vm.vcpus[0].access(GPA, "write", 8, b"\x05" * 8).emulated


def test_remove_does_not_unprotect_and_counts_must_reach_zero() -> None:
    vm = make_vm()
    v = vm.vcpus[0]
    v.access(GPA, "write", 8, b"\x01" * 8)
    vm.write_track_add_gfn(GFN)
    vm.write_track_add_gfn(GFN)
    vm.write_track_remove_gfn(GFN)
    assert not writable(vm, GPA)
    assert v.access(GPA, "write", 8, b"\x02" * 8).emulated  # still tracked (count 1)
    vm.write_track_remove_gfn(GFN)
    assert not writable(vm, GPA)  # no un-protect on remove
    assert not v.access(GPA, "write", 8, b"\x03" * 8).emulated  # lazily writable
    assert writable(vm, GPA)
    assert vm.check_invariants() == []


def test_pre_fault_of_a_tracked_gfn_maps_it_read_only() -> None:
    vm = make_vm()
    vm.write_track_add_gfn(GFN)
    assert vm.pre_fault_memory(GPA, 0x2000) == 0x2000
    assert vm.mmu.translate(GPA) is not None and not writable(vm, GPA)
    assert vm.mmu.translate(GPA + 0x1000) is not None  # the untracked neighbour too
    assert vm.vcpus[0].access(GPA, "write", 8, b"\x01" * 8).emulated
    assert vm.check_invariants() == []


# ------------------------------------------------------- §2.5 DELETE and MOVE
def test_delete_calls_remove_region_with_base_and_npages_newest_first() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig())
    hva = RAM_HVA + (1 << 30)
    vm.host.mmap_anon(hva, 0x123000)
    vm.set_user_memory_region(3, 0, 0x4000_0000, 0x123000, hva)
    log: list[Any] = []
    vm.register_plugin(Rec(vm, log, "a"), "a")
    vm.register_plugin(Rec(vm, log, "b"), "b")
    # no gfn tracked: kvm_page_track_delete_slot still walks every node
    vm.set_user_memory_region(3, 0, 0x4000_0000, 0, hva)
    assert log == [("b", "remove_region", 0x40000, 0x123), ("a", "remove_region", 0x40000, 0x123)]


def test_remove_region_notifier_may_still_untrack_gfns_of_the_deleted_slot() -> None:
    """gfn_to_memslot finds the INVALID copy during the delete: not -EINVAL."""
    vm = make_vm()
    res: list[Any] = []

    class Untrack:
        @kvmmu.hookimpl
        def kvmmu_track_remove_region(self, gfn: int, nr_pages: int) -> None:
            vm.write_track_remove_gfn(GFN)
            res.append(vm.page_track.is_write_tracked(vm.slot_of(GPA), GFN))

    vm.write_track_add_gfn(GFN)
    vm.register_plugin(Untrack(), "u")
    vm.set_user_memory_region(0, 0, 0, 0, RAM_HVA)
    assert res == [False]
    with pytest.raises(kvmmu.KvmError) as ei:  # after the delete: no slot
        vm.write_track_remove_gfn(GFN)
    assert ei.value.errno == errno.EINVAL


def test_flags_only_keeps_tracking_move_drops_it_and_huge_pages_come_back() -> None:
    vm = make_vm(ram_size=4 << 20)
    vm.write_track_add_gfn(0x200)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 << 20, RAM_HVA)
    vm.set_user_memory_region(0, 0, 0, 4 << 20, RAM_HVA)
    assert vm.page_track.count(0x200) == 1  # FLAGS_ONLY: arch carried over
    assert vm.vcpus[0].access(0x200000, "write", 8, b"\x01" * 8).emulated
    vm.set_user_memory_region(0, 0, 64 << 20, 4 << 20, RAM_HVA)  # MOVE, no notifier
    new_gfn = (64 << 20 >> 12) + 0x200
    assert vm.page_track.count(new_gfn) == 0
    slot = vm.slot_of(64 << 20)
    assert int(slot.lpage_info[2].max()) == 0  # fresh disallow counts
    r = vm.vcpus[0].access((64 << 20) + 0x200000, "write", 8, b"\x02" * 8)
    assert not r.emulated
    assert vm.check_invariants() == []


def test_move_is_refused_while_any_notifier_is_registered() -> None:
    vm = make_vm()
    vm.register_plugin(Rec(vm, [], "r"), "r")
    with pytest.raises(kvmmu.KvmError) as ei:
        vm.set_user_memory_region(0, 0, 64 << 20, 16 << 20, RAM_HVA)
    assert ei.value.errno == errno.EINVAL
    assert vm.slot_of(0) is not None


# ------------------------------------------------------------- the explorer
def test_race_2010_buggy_shortest_counterexample_is_seed_004_case_1b() -> None:
    """Walk, then the guest repoints a PDE whose directory has no sp yet (so
    no #PF), then fetch creates that sp (Point B) and links (Point D)."""
    d = explore("race-2010", "buggy")
    best = d["violations"][0]
    s = best["schedule"]
    assert len(s) == 7 and all(len(v["schedule"]) >= 7 for v in d["violations"])
    assert s[0].startswith("vcpu0-fault:walk")
    w = next(k for k, x in enumerate(s) if x.startswith("vcpu1-write-pde"))
    assert s[w] == "vcpu1-write-pde:done=store"  # not emulated: not write-protected
    pd_sp = next(k for k, x in enumerate(s) if x.startswith("vcpu0-fault:sp[L2 gfn 0x3]"))
    assert w < pd_sp  # the write lands before the PD's shadow page exists
    assert s[-1] == "vcpu0-fault:done=ret_pf=4"  # RET_PF_FIXED: stale mapping installed
    assert any("gpa 0x7000" in m for m in best["messages"])


def test_race_2010_fixed_every_schedule_retries_or_is_fixed_by_the_write() -> None:
    res = explore_model(scenario_from_dict(builtin_scenario_dict("race-2010")), "fixed")
    assert res.violations == [] and res.schedules >= 3


@pytest.mark.parametrize("variant", ["fixed", "buggy"])
@pytest.mark.parametrize("value", [0x7067, 0])
def test_race_2010_leaf_gpte_write_never_leaves_a_stale_synced_sp(variant: str, value: int) -> None:
    """Seed 004 case 2 (the guest changes the last level): the leaf table is
    shadowed at 4K, write-protected but not tracked, so a later store faults and
    unsyncs it (§2.4, §3.12); an earlier one is caught by gpte_changed. No
    schedule may leave a *synced* shadow entry that disagrees with the guest."""
    d = builtin_scenario_dict("race-2010")
    d["op"][1] = {"name": "vcpu1-write-pte", "kind": "guest_write", "gpa": 0x4008, "value": value}
    res = explore_model(scenario_from_dict(d), variant, record=True)
    assert res.violations == []
    assert any("vcpu1-write-pte:done=unsync-store" in s for s in res.completed)


def test_mmu_notifier_retry_buggy_shortest_schedule_and_fixed_has_none() -> None:
    d = explore("mmu-notifier-retry", "buggy")
    s = d["violations"][0]["schedule"]
    order = [x.split(":")[1].split("=")[0] for x in s]
    assert order == [
        "mmu_seq",
        "faultin_pfn",
        "mmu_lock",
        "invalidate_range_start",
        "reclaim",
        "done",
        "done",
    ]
    assert explore("mmu-notifier-retry", "fixed")["violations"] == []
