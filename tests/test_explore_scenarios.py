"""The built-in race scenarios: buggy variants break, fixed ones hold (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvmmu.explore import explore, explore_model
from kvmmu.explore_scenarios import (
    BUILTIN_SCENARIOS,
    builtin_scenario_dict,
    load_scenario,
    scenario_from_dict,
)


def _index(schedule: list[str], label: str) -> int:
    """Position of the first step starting with ``label`` (len(schedule) if none)."""
    return next((k for k, s in enumerate(schedule) if s.startswith(label)), len(schedule))


def test_builtin_table() -> None:
    assert set(BUILTIN_SCENARIOS) == {"race-2010", "mmu-notifier-retry"}
    for meta in BUILTIN_SCENARIOS.values():
        assert meta["variants"] == ["buggy", "fixed"]
        assert meta["default_variant"] == "fixed"
        assert meta["description"]


def test_race_2010_level1_check_links_a_stale_table() -> None:
    """Seed 004 case 1b: walk, guest repoints the unshadowed PDE, fetch links."""
    d = explore("race-2010", "buggy")
    assert d["violations"]
    best = d["violations"][0]
    sched = best["schedule"]
    write = _index(sched, "vcpu1-write-pde")
    assert _index(sched, "vcpu0-fault:walk") < write < _index(sched, "vcpu0-fault:install")
    # the PD was not yet shadowed: the store went straight to guest memory
    assert sched[write] == "vcpu1-write-pde:done=store"
    assert any("stale shadow translation" in m for m in best["messages"])
    assert all(len(v["schedule"]) >= len(sched) for v in d["violations"])


def test_race_2010_fixed_gpte_changed_retries() -> None:
    d = explore("race-2010", "fixed")
    assert d["violations"] == []
    assert d["schedules"] >= 3
    assert explore("race-2010", None)["violations"] == []


def test_mmu_notifier_retry_buggy_maps_a_reclaimed_pfn() -> None:
    d = explore("mmu-notifier-retry", "buggy")
    assert d["violations"]
    sched = d["violations"][0]["schedule"]
    assert len(sched) == 7
    # GUP before the reclaim, the SPTE installed after it
    assert _index(sched, "fault:faultin_pfn") < _index(sched, "host:reclaim")
    assert _index(sched, "host:reclaim") < _index(sched, "fault:done")
    assert sched[-1] == "fault:done=ret_pf=4"  # RET_PF_FIXED: the stale SPTE went in
    assert any("stale SPTE" in m for m in d["violations"][0]["messages"])


def test_mmu_notifier_retry_fixed_has_no_violation() -> None:
    d = explore("mmu-notifier-retry")
    assert d["variant"] == "fixed"
    assert d["violations"] == []


@pytest.mark.parametrize("name", ["race-2010", "mmu-notifier-retry"])
def test_pruning_reduces_work_and_keeps_results(name: str) -> None:
    scn = load_scenario(name)
    full = explore_model(scn, "buggy", prune=False)
    pruned = explore_model(scn, "buggy", prune=True)
    assert pruned.nodes < full.nodes
    assert pruned.schedules < full.schedules
    assert pruned.end_states == full.end_states
    assert len(pruned.violations[0].schedule) == len(full.violations[0].schedule)
    assert pruned.violations[0].preemptions == min(
        v.preemptions
        for v in full.violations
        if len(v.schedule) == len(full.violations[0].schedule)
    )


TOML = """
[scenario]
name = "fault-vs-two-hosts"
description = "a TDP fault against an invalidation and a zap, from a file"
default_variant = "fixed"
[scenario.variants.buggy]
mmu_notifier_retry_check = false
[scenario.variants.fixed]

[vm]
tdp = true

[[memslot]]
slot = 0
gpa = 0x0
size = 0x10000
hva = 0x7f0000000000

[[setup]]
kind = "write_u64"
gpa = 0x2000
value = 0x1234

[[op]]
name = "fault"
kind = "tdp_fault"
gpa = 0x2000
write = false

[[op]]
name = "host"
kind = "invalidate"
hva = 0x7f0000002000
size = 0x1000
reclaim = true

[[op]]
name = "zap"
kind = "zap"
gfn = 2
nr = 1
"""


def test_toml_scenario_file(tmp_path: Path) -> None:
    p = tmp_path / "race.toml"
    p.write_text(TOML)
    buggy = explore(str(p), "buggy")
    fixed = explore(str(p), "fixed")
    assert buggy["scenario"] == "fault-vs-two-hosts"
    assert buggy["violations"] and not fixed["violations"]
    assert len(buggy["violations"][0]["schedule"]) == 8
    assert fixed["schedules"] > 10


def test_unknown_scenario_and_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no built-in scenario"):
        load_scenario("nope")
    p = tmp_path / "bad.toml"
    p.write_text(TOML.replace('kind = "zap"', 'kind = "teleport"'))
    with pytest.raises(ValueError, match="unknown kind"):
        explore(str(p), None)


def test_race_2010_fixed_covers_the_emulated_write_and_the_retry() -> None:
    """Both seed-004 cases appear: the write to an already shadowed PD is
    emulated (case 1a, zapped by kvm_mmu_track_write), and a write before the
    PD's sp exists is caught by gpte_changed (case 1b, RETRY)."""
    res = explore_model(load_scenario("race-2010"), "fixed", prune=False, record=True)
    assert res.violations == []
    assert any("vcpu1-write-pde:emulated-store" in s for s in res.completed)
    retried = [s for s in res.completed if "vcpu0-fault:done=ret_pf=1" in s]
    assert retried
    assert all(_index(s, "vcpu0-fault:walk") < _index(s, "vcpu1-write-pde") for s in retried)


def test_mmu_notifier_retry_fixed_retries_the_racing_fault() -> None:
    res = explore_model(load_scenario("mmu-notifier-retry"), "fixed", prune=False, record=True)
    racing = [
        s
        for s in res.completed
        if _index(s, "fault:faultin_pfn") < _index(s, "host:reclaim") < _index(s, "fault:done")
    ]
    assert racing
    assert all("fault:done=ret_pf=1" in s for s in racing)  # RET_PF_RETRY


def test_three_ops_zap_waits_for_the_faults_mmu_lock() -> None:
    """race-2010 plus a zap of the data gfn: the zap waits while the suspended
    fetch holds mmu_lock (never raises MmuLockContended), and the fix holds."""
    d = builtin_scenario_dict("race-2010")
    d["op"].append({"name": "zap", "kind": "zap", "gfn": 5, "nr": 1})
    res = explore_model(scenario_from_dict(d), "fixed", record=True)
    assert res.violations == []
    assert any("zap:wait(mmu_lock)" in s for s in res.completed)
    assert all(s[-1].split(":")[1].startswith("done") for s in res.completed)


def test_guest_store_waiting_for_mmu_lock_is_emulated_if_the_gfn_got_tracked() -> None:
    """A store to a shadowed last-level guest table waits for mmu_lock to
    unsync it (spec/kvm-mmu.md §3.12); if the gfn became write-tracked
    meanwhile, mmu_try_to_unsync_pages says -EPERM and the store is emulated
    (bytes land, then kvm_page_track_write), never written past the protection."""
    import copy

    import kvmmu
    from kvmmu.explore import Wait
    from kvmmu.explore_scenarios import VmInstance, builtin_scenario_dict

    d = copy.deepcopy(builtin_scenario_dict("race-2010"))
    d["op"] = [{"name": "w", "kind": "guest_write", "gpa": 0x4010, "value": 0x1234}]
    inst = VmInstance(d, "fixed")
    vm = inst.vm
    assert vm.vcpus[0].access(0x201000).fault is None  # shadows PT 0x4000 (last level)
    assert vm.mmu.gfn_sps.get(4)
    seen: list[int] = []

    class Notifier:
        @kvmmu.hookimpl
        def kvmmu_track_write(self, gpa: int) -> None:
            seen.append(gpa)

    vm.register_plugin(Notifier(), "n")
    vm.mmu._mmu_lock_owner = object()  # a suspended fault holds mmu_lock
    gen = inst.ops[0][1]
    assert isinstance(next(gen), Wait)
    vm.write_track_add_gfn(4)  # meanwhile the gfn is tracked
    vm.mmu._mmu_lock_owner = None
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert result == "track_write" and seen == [0x4010]
    assert vm.read_guest(0x4010, 8) == (0x1234).to_bytes(8, "little")
