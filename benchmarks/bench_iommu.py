"""DMA translations per second: warm IOTLB vs IOTLB misses walking the shared tables.

Shared mode (the exported EPT root). ``warm``: every translation hits the
IOTLB. ``miss``: the IOTLB holds one entry and the device strides over
more pages than that, so every translation walks KVM's SPTE tables (the
pages are already mapped, so no IO page fault is taken). ``pinned-miss``:
the same, walking the IOMMU's own table. Median of 5 runs; run with
``python benchmarks/bench_iommu.py``.
"""

from __future__ import annotations

import statistics
import time

from kvmmu.plugins.iommu.compare import make_vm

__all__ = ["main", "measure"]

PAGES = 512
N = 20000


def measure(mode: str, iotlb_entries: int) -> float:
    """Translations per second (median of 5) for ``mode`` with that IOTLB size."""
    vm = make_vm(mode, PAGES, iotlb_entries=iotlb_entries)
    p = vm.plugin("iommu")
    dev = p.add_device("bench", iopf=True)
    for g in range(PAGES):
        dev.dma_read(g << 12, 8)  # fault everything in (shared) / warm up
    dom = dev.bound.hwpt.domain
    translate = p.iommu.translate
    pages = [g % PAGES for g in range(N)] if iotlb_entries == 1 else [0] * N
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for g in pages:
            translate(dom, g, write=False)
        runs.append(N / (time.perf_counter() - t0))
    assert vm.check_invariants() == []
    return statistics.median(runs)


def main() -> None:
    warm = measure("shared", 512)
    miss = measure("shared", 1)
    pinned_miss = measure("pinned", 1)
    print(f"shared, warm IOTLB:        {warm:12,.0f} translations/s")
    print(f"shared, IOTLB miss (walk): {miss:12,.0f} translations/s  ({warm / miss:.1f}x slower)")
    print(f"pinned, IOTLB miss (walk): {pinned_miss:12,.0f} translations/s")


if __name__ == "__main__":
    main()
