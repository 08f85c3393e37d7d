"""Running a scenario for the CLI, and the human-readable report.

``run_with_progress`` shows a rich progress bar once a run has taken more
than a second; ``print_report`` renders the JSON report (docs/scenarios.md)
as tables: fault outcomes, exits, memory types per memslot, each plugin's
section and the invariant checks.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["print_report", "run_with_progress", "summary"]

err_console = Console(stderr=True)


def run_with_progress(sc: Any, vendor: str | None, era: str | None, quiet: bool) -> dict[str, Any]:
    """Run a scenario; a rich progress bar appears if it runs over a second."""
    import time

    from kvmmu.runner import ScenarioRun
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    run = ScenarioRun(sc, vendor=vendor, era=era)
    total = run.total_steps()
    start = time.monotonic()
    progress: Progress | None = None
    task = None

    def tick(n: int) -> None:
        nonlocal progress, task
        if quiet:
            return
        if progress is None:
            if time.monotonic() - start < 1.0:
                return
            progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            )
            progress.start()
            task = progress.add_task(f"{sc.name} ({run.vm.config.vendor})", total=total)
            progress.update(task, completed=run.steps)
        assert task is not None
        progress.advance(task, n)

    try:
        return run.run(tick)
    finally:
        if progress is not None:
            progress.stop()


def print_report(console: Console, rep: dict[str, Any]) -> None:
    console.rule(
        f"[bold]{escape(rep['scenario'])}[/] — {rep['vendor']}, era {rep['era']}, "
        f"tdp={'on' if rep['tdp'] else 'off'}"
    )
    t = Table(title="Faults and exits", show_header=True)
    t.add_column("what")
    t.add_column("count", justify="right")
    for k, v in rep["faults"].items():
        t.add_row(f"RET_PF_{k}", str(v))
    for k in (
        "accesses",
        "guest_faults",
        "emulated_writes",
        "mmio_exits",
        "track_writes",
        "remote_tlb_flushes",
    ):
        t.add_row(k, str(rep[k]))
    for k, v in rep.get("dirty_log", {}).items():
        t.add_row(f"dirty_log.{k}", str(v))
    console.print(t)
    mt = Table(title="Effective memory types per memslot")
    mt.add_column("slot")
    mt.add_column("types seen (accesses)")
    for slot, types in rep["memtypes"].items():
        mt.add_row(slot, escape(", ".join(f"{k}: {v}" for k, v in types.items())))
    console.print(mt)
    for name, section in rep["plugins"].items():
        pt = Table(title=f"plugin {name}")
        pt.add_column("key")
        pt.add_column("value")
        for k, v in section.items():
            pt.add_row(escape(str(k)), escape(summary(v)))
        console.print(pt)
    inv = rep["invariants"]
    colour = "green" if not inv["violations"] else "red"
    console.print(
        f"[{colour}]invariants: {inv['checked']} checks, {len(inv['violations'])} violations[/]"
    )
    for v in inv["violations"]:
        console.print(f"  [red]- {escape(str(v))}[/]")


def summary(v: Any) -> str:
    """A one-line view of a report value: scalars as they are, long lists counted."""
    if isinstance(v, str):
        return v
    text = json.dumps(v, default=str)
    if len(text) <= 160:
        return text
    if isinstance(v, list):
        return f"<{len(v)} rows; see --json>"
    if isinstance(v, dict):
        return f"<{len(v)} keys; see --json>"
    return text[:157] + "..."
