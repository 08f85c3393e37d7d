"""The race explorer's engine on a toy model written here (no VM involved)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from math import comb, factorial

import pytest
from kvmmu.explore import (
    Scenario,
    StepGen,
    Wait,
    explore_model,
    fingerprint,
    generator_locals,
)


class Counter:
    """Shared memory of the toy: one counter and a lock flag."""

    def __init__(self) -> None:
        self.value = 0
        self.locked = False


def unlocked_inc(mem: Counter) -> StepGen:
    """A lost-update increment: load, then store (a preemption point between)."""
    tmp = mem.value
    yield "load"
    mem.value = tmp + 1
    return "store"


def locked_inc(mem: Counter) -> StepGen:
    """The same increment under a lock: no preemption between load and store."""
    while mem.locked:
        yield "spin"
    mem.locked = True
    mem.value += 1
    yield "inc"
    mem.locked = False
    return "unlock"


def independent(mem: Counter, n: int) -> StepGen:
    """Steps that touch nothing shared: every order reaches the same state."""
    for k in range(n):
        yield f"nop{k}"


class Toy:
    def __init__(self, op_factories: Sequence[tuple[str, object]], expect: int) -> None:
        self.mem = Counter()
        self.expect = expect
        self.ops: list[tuple[str, StepGen]] = [(n, f(self.mem)) for n, f in op_factories]  # type: ignore[operator]

    def check(self) -> list[str]:
        if self.mem.value != self.expect:
            return [f"lost update: value {self.mem.value}, expected {self.expect}"]
        return []

    def state(self) -> Hashable:
        return (self.mem.value, self.mem.locked)

    def shared(self) -> Sequence[object]:
        return (self.mem,)


def toy(name: str, factories: Sequence[tuple[str, object]], expect: int) -> Scenario:
    return Scenario(name, "toy", ("only",), "only", lambda _v: Toy(factories, expect))


def test_lost_update_found_with_minimal_schedule() -> None:
    scn = toy("lost", [("a", unlocked_inc), ("b", unlocked_inc)], 2)
    res = explore_model(scn, prune=False)
    assert res.schedules == comb(4, 2)
    assert res.violations, "the lost update must be found"
    best = res.violations[0]
    assert len(best.schedule) == 4
    assert best.preemptions == 1
    assert best.schedule == ["a:load", "b:load", "b:done=store", "a:done=store"]
    assert best.messages == ["lost update: value 1, expected 2"]
    # every violating schedule is at least as long as the reported one
    assert all(len(v.schedule) >= len(best.schedule) for v in res.violations)


def test_locked_increment_has_no_violation() -> None:
    scn = toy("locked", [("a", locked_inc), ("b", locked_inc), ("c", locked_inc)], 3)
    res = explore_model(scn)
    assert res.violations == []
    assert res.schedules > 1
    assert res.pruned > 0  # the spin loop returns to a seen state and is cut


def test_three_unlocked_ops_minimal_is_shortest() -> None:
    scn = toy("lost3", [("a", unlocked_inc), ("b", unlocked_inc), ("c", unlocked_inc)], 3)
    res = explore_model(scn)
    assert res.violations
    assert len(res.violations[0].schedule) == 6
    assert res.violations[0].preemptions == 1


def test_pruning_reduces_the_search_and_keeps_the_result() -> None:
    scn = toy(
        "indep",
        [
            ("a", lambda m: independent(m, 3)),
            ("b", lambda m: independent(m, 3)),
            ("c", unlocked_inc),
        ],
        1,
    )
    full = explore_model(scn, prune=False)
    pruned = explore_model(scn, prune=True)
    # 4 + 4 + 2 steps: the multinomial 10! / (4! 4! 2!)
    assert full.schedules == factorial(10) // (factorial(4) ** 2 * factorial(2))
    assert pruned.schedules < full.schedules
    assert pruned.nodes < full.nodes
    assert pruned.pruned > 0
    assert pruned.end_states == full.end_states
    assert pruned.violations == full.violations == []


def test_pruning_keeps_the_minimal_counterexample() -> None:
    scn = toy(
        "lost-indep",
        [("a", unlocked_inc), ("b", unlocked_inc), ("n", lambda m: independent(m, 2))],
        2,
    )
    full = explore_model(scn, prune=False)
    pruned = explore_model(scn, prune=True)
    assert pruned.nodes < full.nodes
    assert len(pruned.violations[0].schedule) == len(full.violations[0].schedule)
    assert {tuple(v.messages) for v in pruned.violations} == {
        tuple(v.messages) for v in full.violations
    }


def test_local_state_is_part_of_the_key() -> None:
    """Same global state and positions but different locals must not be merged."""
    scn = toy("lost", [("a", unlocked_inc), ("b", unlocked_inc)], 2)
    assert explore_model(scn, prune=True).violations


def test_raising_op_is_reported() -> None:
    def boom(mem: Counter) -> StepGen:
        yield "before"
        raise RuntimeError("kaboom")

    res = explore_model(toy("boom", [("x", boom), ("y", unlocked_inc)], 1))
    assert res.violations
    assert "x raised RuntimeError: kaboom" in res.violations[0].messages


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="no variant"):
        explore_model(toy("v", [("a", unlocked_inc)], 1), "nope")


def test_fingerprint_tokens_and_generator_locals() -> None:
    m1, m2 = Counter(), Counter()
    assert fingerprint({id(m1): [m1, 1]}, [m1]) == fingerprint({id(m2): [m2, 1]}, [m2])
    m2.value = 5
    assert fingerprint(m1, [m1]) != fingerprint(m2, [m2])
    g = unlocked_inc(m1)
    m1.value = 7
    next(g)
    assert [loc["tmp"] for loc in generator_locals(g)] == [7]


def test_as_dict_shape() -> None:
    d = explore_model(toy("lost", [("a", unlocked_inc), ("b", unlocked_inc)], 2)).as_dict()
    assert {"scenario", "variant", "schedules", "violations", "pruned", "seconds"} <= set(d)
    assert d["violations"][0]["schedule"][0] == "a:load"


def waiting_inc(mem: Counter) -> StepGen:
    """The locked increment with a blocking wait instead of a spin loop."""
    if mem.locked:
        yield Wait("lock", lambda: not mem.locked)
    mem.locked = True
    tmp = mem.value
    yield "locked-load"
    mem.value = tmp + 1
    mem.locked = False
    return "unlock"


def test_wait_blocks_until_ready_without_pruning() -> None:
    scn = toy("wait", [("a", waiting_inc), ("b", waiting_inc)], 2)
    res = explore_model(scn, prune=False, record=True)
    assert res.violations == []
    assert any("b:wait(lock)" in s for s in res.completed)


def test_deadlock_is_reported() -> None:
    def hold(mem: Counter) -> StepGen:
        mem.locked = True
        yield "took"
        yield Wait("never", lambda: False)

    res = explore_model(toy("dead", [("a", hold), ("b", waiting_inc)], 1))
    assert res.violations
    assert any("deadlock" in m for m in res.violations[0].messages)
