"""Shadow MMU figures: shadow page faults per second and emulated guest-PTE
writes per second (median of 5 runs). Run: ``python benchmarks/bench_shadow.py``."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import kvmmu
from kvmmu import paging as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_shadow import TABLE_WINDOW, URW, GuestTables, make_vm

__all__ = ["bench_emulated_pte_writes", "bench_faults", "main"]

N_PAGES = 2048


def _guest() -> tuple[kvmmu.VM, GuestTables]:
    vm = make_vm()
    gt = GuestTables(vm)
    for i in range(N_PAGES):
        gt.map(0x1000000 + i * 0x1000, 0x400000 + (i % 1024) * 0x1000, URW | P.PTE_A)
    gt.map_tables()
    gt.start()
    return vm, gt


def bench_faults() -> float:
    """Faults/s: first touch of N_PAGES pages (prefetch off: host pages not present)."""
    vm, _gt = _guest()
    v = vm.vcpus[0]
    t0 = time.perf_counter()
    for i in range(N_PAGES):
        v.access(0x1000000 + i * 0x1000, "read", 1)
    dt = time.perf_counter() - t0
    return vm.stats["pf_taken"] / dt


def bench_emulated_pte_writes() -> float:
    """Emulated writes/s to a write-tracked PD entry (each zaps that shadow PDE).

    Each write is followed by an access through the rewritten PDE, whose
    fault resets the PD's write-flooding count (otherwise the third write
    would zap the PD's shadow page and later writes would not trap).
    """
    vm, gt = _guest()
    v = vm.vcpus[0]
    target = 300 << 21
    pt = gt.entry(target, 1) & ~0xFFF
    gt.write(pt, 0x400000 | URW | P.PTE_A)
    pde = gt.entry(target, 2)
    gt.map_tables()
    v.access(target, "read", 1)
    gva = TABLE_WINDOW + pde
    v.access(gva, "read", 8)
    value = (pt | URW).to_bytes(8, "little")
    n = 2000
    elapsed = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        v.access(gva, "write", 8, value)
        elapsed += time.perf_counter() - t0
        v.access(target, "read", 1)
    assert vm.stats["emulated_writes"] == n
    return n / elapsed


def main() -> None:
    faults = statistics.median(bench_faults() for _ in range(5))
    writes = statistics.median(bench_emulated_pte_writes() for _ in range(5))
    print(f"shadow faults/s (median of 5):              {faults:,.0f}")
    print(f"emulated guest-PTE writes/s (median of 5):  {writes:,.0f}")


if __name__ == "__main__":
    main()
