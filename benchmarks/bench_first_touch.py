"""The floor under the 2M pre-fault figure: first touch of new table memory.

Pre-faulting a 64 GiB slot at 2M writes 32,768 leaf SPTEs into 64 page
directories that did not exist before the call (plus one PDPT), so the call
must allocate and touch 64 new 4 KiB pages. This script measures, in the same
run and with the same allocator the SPTE pool uses (numpy):

* ``np.full`` of 32,768 ``uint64`` — the issue's baseline (malloc usually
  hands it recycled memory, so it is a memset);
* zeroed allocation of 128 table rows plus the first write of 64 of them — what
  the pool's growth costs when the pre-fault adds 64 tables (rows kept alive,
  as the pool keeps them, so the memory is new each time).

Run: ``.venv/bin/python benchmarks/bench_first_touch.py``. Median of 21.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

RUNS = 21
ENTRIES = 32_768  # 64 GiB / 2 MiB
TABLES = 64  # one page directory per GiB


def np_full() -> float:
    t = time.perf_counter()
    arr = np.full(ENTRIES, 0x1234, dtype=np.uint64)
    dt = time.perf_counter() - t
    del arr
    return dt


def new_tables(keep: list[np.ndarray]) -> float:
    t = time.perf_counter()
    pool = np.zeros((2 * TABLES, 512), dtype=np.uint64)
    pool[TABLES:] = 0x1234
    dt = time.perf_counter() - t
    keep.append(pool)  # the pool keeps its memory: the next run gets new pages
    return dt


def main() -> None:
    keep: list[np.ndarray] = []
    full, touch = [], []
    for _ in range(RUNS):
        full.append(np_full())
        touch.append(new_tables(keep))
    f, tt = statistics.median(full), statistics.median(touch)
    print(f"np.full({ENTRIES}) median: {f * 1e6:.1f} us; 0.2 of its rate = {5 * f * 1e6:.0f} us")
    print(f"allocate + first touch of {TABLES} new table pages, median: {tt * 1e6:.1f} us")
    ratio = tt / (5 * f)
    print(f"first touch alone / (5 x np.full) = {ratio:.2f} (> 1: the target is out of reach)")


if __name__ == "__main__":
    main()
