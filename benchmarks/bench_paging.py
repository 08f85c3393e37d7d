"""Guest-walk throughput: scalar ``walk`` vs numpy ``walk_batch`` (same run).

Builds 4-level page tables in a numpy array of guest RAM mapping 256 MiB with
4 KiB pages (plus a 1 GiB-page region and a not-present hole, so the mix has
three leaf levels and faults), then walks the same random GVAs with both
walkers. Reports walks/second as the median of ``--repeat`` runs and the
batch/scalar ratio. Run: ``.venv/bin/python benchmarks/bench_paging.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from kvmmu.paging import CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE, walk
from kvmmu.paging_batch import array_reader, walk_batch

__all__ = ["build_tables", "main"]

MAPPED = 256 << 20  # 4 KiB-mapped range at GVA 0
PT_BASE = 0x10_0000  # page tables start at 1 MiB
KW = {
    "cr0": CR0_PG | CR0_WP,
    "cr3": 0x1000,
    "cr4": CR4_PAE,
    "efer": EFER_LME | EFER_LMA | EFER_NXE,
    "cpl": 3,
}


def build_tables() -> npt.NDArray[np.uint8]:
    """PML4 at 0x1000; PML4[0] maps MAPPED bytes with 4K pages, PML4[1] 1G pages."""
    n_pt = MAPPED >> 21
    size = PT_BASE + (n_pt + 8) * 4096
    mem = np.zeros(size, np.uint8)
    ents = mem.view(np.uint64)
    flags = np.uint64(0x7)  # P|RW|US
    pdpt, pd = 0x2000, 0x3000
    ents[0x1000 // 8] = pdpt | 7
    ents[0x1000 // 8 + 1] = 0x4000 | 7
    ents[0x4000 // 8 : 0x4000 // 8 + 512] = (np.arange(512, dtype=np.uint64) << np.uint64(30)) | (
        flags | np.uint64(0x80)
    )
    ents[pdpt // 8] = pd | 7
    pts = PT_BASE + np.arange(n_pt, dtype=np.uint64) * np.uint64(4096)
    ents[pd // 8 : pd // 8 + n_pt] = pts | flags
    frames = (np.arange(n_pt * 512, dtype=np.uint64) + np.uint64(0x10000)) << np.uint64(12)
    ents[PT_BASE // 8 : PT_BASE // 8 + n_pt * 512] = frames | flags
    ents[PT_BASE // 8 + 5] = 0  # one not-present page
    return mem


def random_gvas(n: int, seed: int = 1) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, MAPPED, n, dtype=np.uint64)
    high = (np.uint64(1) << np.uint64(39)) + rng.integers(0, 1 << 39, n, dtype=np.uint64)
    return np.where(rng.random(n) < 0.8, low, high).astype(np.uint64)


def _median_rate(fn: Callable[[], object], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50_000, help="GVAs per run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    mem = build_tables()
    words = mem.view(np.uint64).tolist()

    def read_phys(addr: int) -> int:
        value: int = words[addr >> 3]
        return value

    read_many = array_reader(mem)
    gvas = random_gvas(args.n)
    gva_list = gvas.tolist()
    print(f"guest walk benchmark: {args.n} GVAs per run, median of {args.repeat} runs")
    for access in ("read", "write"):

        def scalar(access: str = access) -> None:
            for g in gva_list:
                walk(read_phys, access=access, gva=g, **KW)  # type: ignore[arg-type]

        def batch(access: str = access) -> None:
            walk_batch(read_many, access=access, gvas=gvas, **KW)  # type: ignore[arg-type]

        s_rate = _median_rate(scalar, args.n, args.repeat)
        b_rate = _median_rate(batch, args.n, args.repeat)
        print(
            f"  {access:5s}: scalar {s_rate:12,.0f} walks/s   batch {b_rate:12,.0f} walks/s"
            f"   batch/scalar {b_rate / s_rate:6.1f}x"
        )
    small = gvas[:64]
    b64 = _median_rate(
        lambda: walk_batch(read_many, access="read", gvas=small, **KW),  # type: ignore[arg-type]
        len(small),
        args.repeat * 20,
    )
    print(f"  batch of 64 GVAs (read): {b64:12,.0f} walks/s")


if __name__ == "__main__":
    main()
