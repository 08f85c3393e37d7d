"""Tracked PPGTT writes handled per second (median of 5 runs).

Each write is a guest 8-byte store through a vCPU into a write-tracked PPGTT
page table: EPT write fault -> emulation -> page-track notifier -> KVMGT's
W7 update (dma map the new page, unmap the old). A second figure does the
same with 4-byte writes (W6, deferred) plus the flush at submission.
Run: ``.venv/bin/python benchmarks/bench_kvmgt.py``.
"""

from __future__ import annotations

import statistics
import time

import kvmmu
from kvmmu.plugins.kvmgt.device import VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE
from kvmmu.plugins.kvmgt.guest import DEFAULT_LEAF, GuestPpgtt

__all__ = ["main", "run"]

HVA = 0x1000_0000
RAM = 64 << 20
DATA = 8 << 20


def run(n: int, width: str) -> float:
    """Writes per second for ``n`` tracked PTE rewrites of ``width`` ("8" or "4+4")."""
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", plugins={"enabled": ["kvmgt"]}))
    vm.host.mmap_anon(HVA, RAM)
    vm.set_user_memory_region(0, 0, 0, RAM, HVA)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    for i in range(512):
        g.map_4k(i * 4096, DATA + i * 4096)
    v = vm.plugin("kvmgt").vgpu
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    pt = g.table_of(0, 1)
    t0 = time.perf_counter()
    for k in range(n):
        i = k % 512
        g.write_entry(pt, i, (DATA + ((i + k // 512 + 1) % 1024) * 4096) | DEFAULT_LEAF, width)  # type: ignore[arg-type]
        if width != "8" and i == 511:
            v.submit_workload(mm)
    v.submit_workload(mm)
    dt = time.perf_counter() - t0
    assert v.stats["track_writes"] == n * (1 if width == "8" else 2)
    assert vm.check_invariants() == []
    return n / dt


def main() -> None:
    for width, label in (("8", "8-byte (W5/W7)"), ("4+4", "4+4-byte (W6 + flush)")):
        rates = [run(2048, width) for _ in range(5)]
        print(
            f"kvmgt tracked PPGTT writes, {label}: median {statistics.median(rates):,.0f}/s "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f}; 2048 entry rewrites x 5)"
        )


if __name__ == "__main__":
    main()
