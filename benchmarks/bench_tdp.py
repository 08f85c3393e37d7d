"""TDP MMU figures: 4K fault rate, 64 GiB pre-fault vs numpy fill, bytes per gfn.

Run: ``.venv/bin/python benchmarks/bench_tdp.py``. Each figure is the median
of 5 runs; ratios are taken against baselines measured in the same run.

The target's baseline is ``np.full`` of the same number of ``uint64`` (the
issue's "numpy fills the same number"). What ``np.full`` pays depends on the
allocator: 128 MiB (4K) always comes from a new mapping, so it includes the
first touch of every page (with numpy's huge-page advice); 256 KiB (2M) is
usually memory malloc recycled, so it is a memset. The pre-fault always
writes into page tables it has just allocated. Two controlled baselines are
therefore measured as well, in the same run: numpy filling a new anonymous
mapping (first touch included, no huge-page advice) and filling the same
memory again (touched: memset speed).
"""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable

import kvmmu
import numpy as np
from kvmmu.mmu import PFERR_USER_MASK, PFERR_WRITE_MASK

HVA = 0x7F00_0000_0000
RUNS = 5


def median(fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(RUNS))


def faults_per_second() -> float:
    """4K TDP faults on a 1 GiB slot backed by 4K host pages (host pages pre-touched)."""
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.host.mmap_anon(HVA, 1 << 30)
    vm.set_user_memory_region(0, 0, 0, 1 << 30, HVA)
    n = 20000
    for g in range(n):
        vm.host.hva_to_pfn(HVA + (g << 12), write=True)
    v = vm.vcpus[0]
    fault = vm.mmu.page_fault
    code = PFERR_WRITE_MASK | PFERR_USER_MASK
    t = time.perf_counter()
    for g in range(n):
        fault(v, g << 12, code)
    return n / (time.perf_counter() - t)


def fills(n: int) -> tuple[float, float, float]:
    """Seconds numpy takes to fill ``n`` uint64: np.full, a new mapping, touched memory."""
    t = time.perf_counter()
    arr = np.full(n, 0x1234, dtype=np.uint64)
    full = time.perf_counter() - t
    del arr
    t = time.perf_counter()
    buf = mmap.mmap(-1, n * 8)  # anonymous, never touched
    arr = np.frombuffer(buf, dtype=np.uint64)
    arr.fill(0x1234)
    fresh = time.perf_counter() - t
    t = time.perf_counter()
    arr.fill(0x4321)
    warm = time.perf_counter() - t
    del arr
    buf.close()
    return full, fresh, warm


def prefault(level: int) -> tuple[float, float, float, float, float]:
    """Pre-fault a 64 GiB THP-backed slot; SPTE level 1 via incongruent hva.

    Returns the ratios to the ``np.full``, new-mapping and touched-memory
    fills, SPTEs/s, and pool bytes per mapped gfn / 8.
    """
    size = 64 << 30
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.host.mmap_anon(HVA, size + (2 << 20), page_level=2)
    hva = HVA if level == 2 else HVA + 0x1000  # gpa/hva incongruent: 4K only
    vm.set_user_memory_region(0, 0, 0, size, hva)
    t = time.perf_counter()
    done = vm.pre_fault_memory(0, size)
    dt = time.perf_counter() - t
    assert done == size
    counts = vm.mmu.counts()
    entries = counts[f"leaf_sptes_level{level}"]
    full, fresh, warm = fills(entries)
    mapped = counts["mapped_gfns"]
    per_gfn = vm.mmu.pool.nbytes() / mapped / 8
    return full / dt, fresh / dt, warm / dt, entries / dt, per_gfn


def main() -> None:
    print(f"4K TDP faults/s (1 GiB slot): {median(faults_per_second):,.0f}  (target >= 100,000)")
    for level, name in ((1, "4K"), (2, "2M")):
        res = [prefault(level) for _ in range(RUNS)]
        full, fresh, warm, rate, per = (statistics.median(r[i] for r in res) for i in range(5))
        print(
            f"pre-fault 64 GiB at {name}: {rate:,.0f} SPTEs/s; ratio to np.full {full:.3f} "
            f"(target >= 0.2), to a fill of a new mapping {fresh:.3f}, to a fill of "
            f"touched memory {warm:.4f}; pool bytes per mapped gfn / 8 = {per:.3f} "
            "(target <= 1.5)"
        )


if __name__ == "__main__":
    main()
