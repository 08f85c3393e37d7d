"""Side-by-side comparison of scenario runs (``kvmmu compare``).

Each run's report is flattened to ``metric -> value`` (fault outcomes,
emulation counts, effective memory types and SPTE memory-type bits per
memslot, and every plugin's report section, hazards included); a metric is a
difference when the runs disagree on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["compare_runs", "flatten_report", "plot_comparison", "run_label"]

#: Report keys that describe the run rather than its behaviour.
_IDENTITY = {
    "scenario",
    "vendor",
    "era",
    "variant",
    "kernel",
    "tdp",
    "seed",
    "stats",
    "device_results",
}


def run_label(rep: dict[str, Any]) -> str:
    """``vendor@era``, plus ``+variant`` for a ``compare --variant`` run."""
    label = f"{rep['vendor']}@{rep['era']}"
    return f"{label}+{rep['variant']}" if rep.get("variant") else label


def flatten_report(rep: dict[str, Any]) -> dict[str, Any]:
    """``{"faults.FIXED": 12, "memtypes.slot1": "WC:4", "plugins.iommu.pinned": 0, ...}``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            if prefix.startswith(("memtypes.", "spte_memtypes.")) and prefix.count(".") == 1:
                out[prefix] = ", ".join(f"{k}:{n}" for k, n in sorted(v.items()))
                return
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, row in enumerate(v):
                walk(f"{prefix}[{_row_key(row, i)}]", row)
        elif isinstance(v, list):
            out[prefix] = repr(v) if len(repr(v)) < 200 else f"<{len(v)} items>"
        else:
            out[prefix] = v

    for key, value in rep.items():
        if key not in _IDENTITY:
            walk(key, value)
    return out


#: Row fields that identify a row of a list-valued report section (so the
#: same row is compared across runs even if the lists differ in order).
_ROW_ID_KEYS = ("design", "guest_pat", "id", "name", "resource_id")


def _row_key(row: dict[str, Any], index: int) -> str:
    parts = [str(row[k]) for k in _ROW_ID_KEYS if k in row and not isinstance(row[k], dict)]
    return ",".join(parts) if parts else str(index)


def compare_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare reports; return the runs, every metric and the differing ones."""
    labels = [run_label(r) for r in reports]
    if len(set(labels)) != len(labels):  # same vendor and era twice: number them
        labels = [f"{lb}#{i}" for i, lb in enumerate(labels)]
    flat = [flatten_report(r) for r in reports]
    metrics = sorted(set().union(*flat)) if flat else []
    differences = []
    for m in metrics:
        values = {lb: f.get(m) for lb, f in zip(labels, flat, strict=True)}
        absent = [lb for lb, f in zip(labels, flat, strict=True) if m not in f]
        if absent or len({repr(v) for v in values.values()}) > 1:
            # "absent": the run has no such metric (another vendor's report
            # section), as opposed to a metric whose value is None.
            differences.append({"metric": m, "values": values, "absent": absent})
    return {
        "scenario": reports[0]["scenario"] if reports else None,
        "runs": labels,
        "differences": differences,
        "equal_metrics": len(metrics) - len(differences),
        "reports": {lb: r for lb, r in zip(labels, reports, strict=True)},
    }


def plot_comparison(result: dict[str, Any], path: Path) -> None:
    """Draw the numeric differences as grouped bars, one group per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        d
        for d in result["differences"]
        if all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in d["values"].values()
        )
    ]
    labels = result["runs"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * max(1, len(rows)) * len(labels)), 4.5))
    width = 0.8 / max(1, len(labels))
    for i, lb in enumerate(labels):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [d["values"][lb] for d in rows],
            width,
            label=lb,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([d["metric"] for d in rows], rotation=45, ha="right", fontsize=7)
    ax.set_title(f"{result['scenario']}: numeric metrics that differ")
    if not rows:
        ax.text(
            0.5, 0.5, "no numeric differences", ha="center", va="center", transform=ax.transAxes
        )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
