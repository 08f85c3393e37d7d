"""The race explorer: every interleaving of a few step-wise operations.

An *operation* is a generator. Each ``next()`` runs the operation up to its
next lock or re-check point, the places where the kernel lets another CPU in:
``mmu_lock`` being taken or dropped, ``mmu_invalidate_seq`` being snapshotted,
a gPTE being re-read (``arch/x86/kvm/mmu/mmu.c: kvm_tdp_page_fault``,
``arch/x86/kvm/mmu/paging_tmpl.h: FNAME(fetch)``,
``include/linux/kvm_host.h: mmu_invalidate_retry_gfn``). The value yielded
names the point reached; the generator's return ends the operation. A *step*
is one such ``next()``; its label is ``"<op>:<point>"``.

:func:`explore_model` runs a :class:`Scenario` through every schedule (every
order in which the operations' steps can run), by depth-first search over
which operation steps next. Models are not copyable, so every search node is
*replayed* from a fresh, deterministically built instance. With pruning on,
a node whose key (which operations finished, the global state digest, and
each live operation's local variables and resume point) was seen before at
the same or a smaller depth is not expanded: its futures are those of the
first node, so the set of reachable end states, and the shortest violating
schedule, are unchanged; spin loops that return to a seen state are cut.
At the end of every schedule the scenario's check runs (for a VM scenario:
``vm.check_invariants()`` plus the scenario's own rules); a non-empty result
is a violation. The reported counterexample is the *minimal* violating
schedule: fewest steps, then fewest preemptions (switches away from an
operation that had not finished), then the first in DFS order.

Local state of an operation is read from its generator frames (following
``yield from``); objects the scenario lists as *shared* (the VM, vCPUs, ...)
stand for themselves and must be covered by the global digest instead.

Scenario files (TOML) -- see :mod:`kvmmu.explore_scenarios` for the loader and
the built-in scenarios, which use the same format::

    [scenario]
    name = "my-race"
    description = "one line"
    default_variant = "fixed"
    [scenario.variants.buggy]        # VMConfig overrides per variant
    mmu_notifier_retry_check = false
    [scenario.variants.fixed]

    [vm]                             # base VMConfig fields (tdp, vendor, era, ...)
    tdp = true

    [[memslot]]                      # host VMA + KVM_SET_USER_MEMORY_REGION
    slot = 0
    gpa = 0x0
    size = 0x10000
    hva = 0x7f0000000000

    [[setup]]                        # before the operations (not explored)
    kind = "write_u64"               # write_u64 (host-side write), sregs, access
    gpa = 0x1000
    value = 0x2007

    [[op]]                           # the concurrent operations (2 or 3)
    name = "fault"
    kind = "tdp_fault"               # tdp_fault | shadow_fault | guest_write |
    gpa = 0x1000                     #   invalidate | zap
    write = true

    [check]
    gvas = [0x400000]                # shadow: SPTE translation == guest walk

Op kinds and their fields: ``tdp_fault`` (``gpa``, ``write``, ``vcpu``),
``shadow_fault`` (``gva``, ``write``, ``vcpu``), ``guest_write`` (``gpa``,
``value``, ``size`` 8 or 4: a vCPU store; to a write-tracked gfn it is
emulated, bytes first, then ``kvm_mmu_track_write`` under ``mmu_lock``),
``invalidate`` (``hva``, ``size``, ``reclaim``: ``invalidate_range_start``,
reclaim, ``invalidate_range_end`` as three steps), ``zap`` (``gfn``,
``nr``: ``kvm_zap_gfn_range``).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "ExploreResult",
    "Instance",
    "Scenario",
    "StepGen",
    "Violation",
    "Wait",
    "explore",
    "explore_model",
    "fingerprint",
    "generator_locals",
]

#: An operation: yields the name of each point it reaches, returns when done.
StepGen = Generator[Any, None, Any]


class Instance(Protocol):
    """One freshly built model of a scenario, ready to run its operations."""

    @property
    def ops(self) -> Sequence[tuple[str, StepGen]]:
        """``(name, generator)`` per operation, in a fixed order."""
        ...

    def check(self) -> list[str]:
        """Violated invariants at the end of a schedule (empty when all hold)."""
        ...

    def state(self) -> Hashable:
        """A digest of the global state the operations can observe or change."""
        ...

    def shared(self) -> Sequence[object]:
        """Objects whose state :meth:`state` covers (tokens in local digests)."""
        ...


@dataclass(frozen=True)
class Wait:
    """Yielded by an operation that cannot go on until ``ready()`` holds
    (e.g. ``mmu_lock`` is held by a suspended fault). The explorer does not
    schedule the operation until then; if every live operation waits, the
    schedule ends in a deadlock, which is reported as a violation."""

    reason: str
    ready: Callable[[], bool]


@dataclass(frozen=True)
class Scenario:
    """A named race: ``build(variant)`` makes a fresh :class:`Instance`."""

    name: str
    description: str
    variants: tuple[str, ...]
    default_variant: str
    build: Callable[[str], Instance]


@dataclass
class Violation:
    """A schedule whose end state broke a check."""

    schedule: list[str]
    messages: list[str]
    preemptions: int


@dataclass
class ExploreResult:
    """What :func:`explore_model` found."""

    scenario: str
    variant: str
    schedules: int = 0
    nodes: int = 0
    pruned: int = 0
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    end_states: int = 0
    #: Every complete schedule's step labels (only with ``record=True``).
    completed: list[list[str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able report (``kvmmu explore --json``)."""
        return {
            "scenario": self.scenario,
            "variant": self.variant,
            "schedules": self.schedules,
            "nodes": self.nodes,
            "pruned": self.pruned,
            "end_states": self.end_states,
            "seconds": round(self.seconds, 4),
            "violations": [
                {"schedule": v.schedule, "messages": v.messages, "preemptions": v.preemptions}
                for v in self.violations
            ],
        }


# ------------------------------------------------------------ fingerprints
_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_OPAQUE = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.ModuleType,
    type,
    types.CodeType,
)


def fingerprint(value: object, shared: Sequence[object] = (), *, depth: int = 8) -> Hashable:
    """A hashable, replay-stable digest of ``value``'s contents.

    Objects in ``shared`` (and ints equal to their ``id()``, as in dicts keyed
    by ``id(vcpu)``) become positional tokens, so two fresh builds of one
    model digest alike. Generators are skipped (see :func:`generator_locals`).
    """
    tokens = {id(o): i for i, o in enumerate(shared)}
    return _fp(value, tokens, depth, set(), top=True)


def _fp(v: object, tokens: dict[int, int], depth: int, seen: set[int], top: bool = False) -> Any:
    if isinstance(v, _ATOMS):
        if type(v) is int and v in tokens:
            return ("id", tokens[v])
        if isinstance(v, bytes):
            return hash(v)
        return v
    if not top and id(v) in tokens:
        return ("shared", tokens[id(v)])
    if isinstance(v, types.GeneratorType):
        return "gen"
    if isinstance(v, _OPAQUE):
        return getattr(v, "__qualname__", type(v).__name__)
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, hash(v.tobytes()))
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytearray | memoryview):
        return hash(bytes(v))
    if depth <= 0 or id(v) in seen:
        return ("cut", type(v).__name__)
    seen = seen | {id(v)}
    d = depth - 1
    if isinstance(v, types.MethodType):
        return ("method", v.__func__.__qualname__, _fp(v.__self__, tokens, d, seen))
    if isinstance(v, list | tuple):
        return (type(v).__name__, tuple(_fp(x, tokens, d, seen) for x in v))
    if isinstance(v, dict):
        items = [(_fp(k, tokens, d, seen), _fp(x, tokens, d, seen)) for k, x in v.items()]
        return ("dict", tuple(sorted(items, key=repr)))
    if isinstance(v, set | frozenset):
        return ("set", tuple(sorted((_fp(x, tokens, d, seen) for x in v), key=repr)))
    attrs: list[tuple[str, Any]] = []
    slots: list[str] = []
    for klass in type(v).__mro__:
        s = klass.__dict__.get("__slots__", ())
        slots.extend([s] if isinstance(s, str) else s)
    for name in slots:
        if hasattr(v, name):
            attrs.append((name, _fp(getattr(v, name), tokens, d, seen)))
    vd = getattr(v, "__dict__", None)
    if isinstance(vd, dict):
        for name in sorted(vd):
            attrs.append((name, _fp(vd[name], tokens, d, seen)))
    return (type(v).__qualname__, tuple(attrs))


def generator_locals(gen: StepGen) -> Iterator[dict[str, Any]]:
    """The local variables (and resume point, ``__lasti__``) of ``gen`` and of
    every generator it delegates to."""
    g: Any = gen
    while isinstance(g, types.GeneratorType):
        frame = g.gi_frame
        if frame is None:
            return
        loc = dict(frame.f_locals)
        loc["__lasti__"] = frame.f_lasti
        yield loc
        g = g.gi_yieldfrom


# ----------------------------------------------------------------- running
@dataclass
class _Run:
    inst: Instance
    done: list[bool]
    positions: list[int]
    labels: list[str]
    errors: list[str]
    waits: dict[int, Wait] = field(default_factory=dict)

    def enabled(self) -> list[int]:
        out = []
        for i, d in enumerate(self.done):
            w = self.waits.get(i)
            if not d and (w is None or w.ready()):
                out.append(i)
        return out


def _label(name: str, point: object) -> str:
    return f"{name}:{point}"


def _step(run: _Run, i: int) -> None:
    name, gen = run.inst.ops[i]
    run.waits.pop(i, None)
    try:
        point = next(gen)
        if isinstance(point, Wait):
            run.waits[i] = point
            point = f"wait({point.reason})"
    except StopIteration as stop:
        run.done[i] = True
        point = "done" if stop.value is None else f"done={stop.value}"
    except Exception as e:  # an op that raises under a race is itself a finding
        run.done[i] = True
        point = f"raised {type(e).__name__}"
        run.errors.append(f"{name} raised {type(e).__name__}: {e}")
    run.positions[i] += 1
    run.labels.append(_label(name, point))


def _replay(scn: Scenario, variant: str, prefix: Sequence[int]) -> _Run:
    inst = scn.build(variant)
    n = len(inst.ops)
    run = _Run(inst, [False] * n, [0] * n, [], [])
    for i in prefix:
        _step(run, i)
    return run


def _key(run: _Run) -> Hashable:
    inst = run.inst
    shared = list(inst.shared())
    local = tuple(
        None if run.done[i] else fingerprint(list(generator_locals(gen)), shared)
        for i, (_name, gen) in enumerate(inst.ops)
    )
    return (tuple(run.done), inst.state(), hash(local))


def _preemptions(prefix: Sequence[int], finished_after: list[int]) -> int:
    """Switches away from an operation that had steps left."""
    count = 0
    for k in range(1, len(prefix)):
        prev = prefix[k - 1]
        if prefix[k] != prev and finished_after[prev] > k - 1:
            count += 1
    return count


def explore_model(
    scn: Scenario,
    variant: str | None = None,
    *,
    prune: bool = True,
    max_nodes: int = 200_000,
    max_depth: int = 64,
    record: bool = False,
) -> ExploreResult:
    """Run ``scn`` through every schedule; see the module docstring.

    ``prune`` turns state-hash pruning on; ``record`` keeps every complete
    schedule in :attr:`ExploreResult.completed`. ``max_nodes`` and
    ``max_depth`` bound the search (RuntimeError beyond them).
    """
    var = scn.default_variant if variant is None else variant
    if var not in scn.variants:
        raise ValueError(f"scenario {scn.name!r} has no variant {var!r}; have {scn.variants}")
    res = ExploreResult(scn.name, var)
    t0 = time.perf_counter()
    visited: dict[Hashable, int] = {}
    end_states: set[Hashable] = set()
    found: list[tuple[int, int, int, Violation]] = []
    stack: list[tuple[int, ...]] = [()]
    while stack:
        prefix = stack.pop()
        res.nodes += 1
        if res.nodes > max_nodes:
            raise RuntimeError(f"explore: more than {max_nodes} nodes; make the scenario smaller")
        run = _replay(scn, var, prefix)
        enabled = run.enabled()
        if run.errors:
            enabled = []
        elif not enabled and not all(run.done):
            stuck = ", ".join(
                f"{run.inst.ops[i][0]} ({w.reason})" for i, w in sorted(run.waits.items())
            )
            run.errors.append(f"deadlock: every live operation waits: {stuck}")
        if not enabled:
            res.schedules += 1
            if record:
                res.completed.append(list(run.labels))
            msgs = list(run.errors) + list(run.inst.check())
            end_states.add((run.inst.state(), tuple(msgs)))
            if msgs:
                # index at which each op took its last step
                last = [len(prefix)] * len(run.done)
                for k, i in enumerate(prefix):
                    last[i] = k
                pre = _preemptions(prefix, last)
                v = Violation(list(run.labels), msgs, pre)
                found.append((len(prefix), pre, len(found), v))
            continue
        if len(prefix) >= max_depth:
            raise RuntimeError(f"explore: a schedule is longer than {max_depth} steps")
        if prune:
            key = _key(run)
            seen = visited.get(key)
            if seen is not None and seen <= len(prefix):
                res.pruned += 1
                continue
            visited[key] = len(prefix)
        for i in reversed(enabled):
            stack.append((*prefix, i))
    found.sort(key=lambda t: t[:3])
    res.violations = [t[3] for t in found]
    res.end_states = len(end_states)
    res.seconds = time.perf_counter() - t0
    return res


def explore(name_or_path: str, variant: str | None = None) -> dict[str, Any]:
    """Explore a built-in scenario by name, or a TOML scenario file by path.

    Returns :meth:`ExploreResult.as_dict`: ``scenario``, ``variant``,
    ``schedules`` (complete schedules explored), ``violations`` (minimal
    first: each ``schedule`` of step labels and ``messages``), ``pruned``,
    ``nodes``, ``end_states`` and ``seconds``.
    """
    from kvmmu.explore_scenarios import load_scenario

    return explore_model(load_scenario(name_or_path), variant).as_dict()
