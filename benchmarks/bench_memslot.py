"""Benchmark: a 64 GiB memslot and its host VMA.

Reports creation time (median of 5), Python heap peak during creation
(tracemalloc), process RSS, and the cost of touching 1000 pages, plus the
gfn_to_memslot hot path and a dirty-log harvest.  Run:

    .venv/bin/python benchmarks/bench_memslot.py
"""

from __future__ import annotations

import resource
import statistics
import time
import tracemalloc

import numpy as np
from kvmmu.hostmem import HostMemory
from kvmmu.memslot import KVM_MEM_LOG_DIRTY_PAGES, Memslots

GIB = 1 << 30
SIZE = 64 * GIB
HVA = 0x7F00_0000_0000
MAX_GFN = (1 << 40) - 1


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def create(flags: int = 0, *, write_tracking: bool = False) -> tuple[HostMemory, Memslots]:
    host = HostMemory()
    host.mmap_anon(HVA, SIZE, page_level=2)
    ms = Memslots()
    if write_tracking:
        ms.enable_write_tracking()
    ms.set_memory_region(0, flags, 0x1_0000_0000, SIZE, HVA, max_gfn=MAX_GFN)
    return host, ms


def timed(fn, n: int = 5) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    print(f"64 GiB slot ({SIZE >> 12} pages), THP-backed VMA")
    for label, kw in (
        ("plain", {}),
        ("dirty logging", {"flags": KVM_MEM_LOG_DIRTY_PAGES}),
        ("write tracking", {"write_tracking": True}),
    ):
        t = timed(lambda kw=kw: create(**kw))
        tracemalloc.start()
        create(**kw)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"  create [{label:14}] median {t * 1e3:7.2f} ms   heap peak {peak / 2**20:7.2f} MiB")

    rss0 = rss_mib()
    host, ms = create(KVM_MEM_LOG_DIRTY_PAGES)
    rss1 = rss_mib()
    slot = ms.id_to_memslot(0, 0)
    assert slot is not None
    rng = np.random.default_rng(1)
    gfns = slot.base_gfn + rng.choice(slot.npages, 1000, replace=False)
    t = time.perf_counter()
    for gfn in gfns.tolist():
        s = ms.gfn_to_memslot(gfn)
        pfn = host.hva_to_pfn(ms.gfn_to_hva(gfn), write=True)
        host.write_phys(pfn << 12, b"x")
        ms.mark_page_dirty(s, gfn)
    t_touch = time.perf_counter() - t
    rss2 = rss_mib()
    print(
        f"  RSS: before {rss0:.1f} MiB, after create {rss1:.1f} MiB, "
        f"after 1000 touches {rss2:.1f} MiB"
    )
    print(
        f"  touch 1000 pages: {t_touch * 1e3:.1f} ms; host resident bytes "
        f"{host.resident_bytes() / 2**20:.1f} MiB; pfns allocated {host.stats.pfn_allocations}"
    )
    t = time.perf_counter()
    n = 200_000
    for gfn in (gfns.tolist() * (n // 1000))[:n]:
        ms.gfn_to_memslot(gfn)
    print(f"  gfn_to_memslot: {(time.perf_counter() - t) / n * 1e9:.0f} ns/call (cache hit)")
    t = time.perf_counter()
    got = ms.get_dirty_log(0, 0)
    print(
        f"  KVM_GET_DIRTY_LOG on 16M-page bitmap: "
        f"{(time.perf_counter() - t) * 1e3:.2f} ms, {got.size} gfns"
    )


if __name__ == "__main__":
    main()
