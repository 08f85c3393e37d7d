"""Benchmark: the race explorer on each built-in scenario and variant.

For every built-in scenario and variant, with and without state pruning:
complete schedules explored, search nodes (each replayed from a fresh VM),
nodes pruned, violations found, and wall time (median of 3). Run:

    .venv/bin/python benchmarks/bench_explore.py
"""

from __future__ import annotations

import statistics
import time

from kvmmu.explore import ExploreResult, explore_model
from kvmmu.explore_scenarios import BUILTIN_SCENARIOS, load_scenario

REPEAT = 3


def run(name: str, variant: str, prune: bool) -> tuple[ExploreResult, float]:
    scn = load_scenario(name)
    times = []
    res = None
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        res = explore_model(scn, variant, prune=prune)
        times.append(time.perf_counter() - t0)
    assert res is not None
    return res, statistics.median(times)


def main() -> None:
    hdr = (
        f"{'scenario':<20} {'variant':<7} {'prune':<5} {'schedules':>9} {'nodes':>6} "
        f"{'pruned':>6} {'violations':>10} {'min steps':>9} {'median s':>9} {'ms/node':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, meta in BUILTIN_SCENARIOS.items():
        for variant in meta["variants"]:
            for prune in (True, False):
                res, t = run(name, variant, prune)
                steps = len(res.violations[0].schedule) if res.violations else "-"
                print(
                    f"{name:<20} {variant:<7} {'yes' if prune else 'no':<5} {res.schedules:>9} "
                    f"{res.nodes:>6} {res.pruned:>6} {len(res.violations):>10} {steps!s:>9} "
                    f"{t:>9.3f} {1000 * t / res.nodes:>8.1f}"
                )


if __name__ == "__main__":
    main()
