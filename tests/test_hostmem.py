"""Host memory: VMAs, GUP, huge-page contiguity, lazy bytes, MMU notifiers, pins."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from kvmmu.errors import KvmError
from kvmmu.hostmem import (
    KVM_PAGES_PER_HPAGE,
    PAGE_SIZE,
    RAM_BASE,
    HostMemory,
)
from kvmmu.memtype import MemType

MB2, GB = 1 << 21, 1 << 30
BAR = 0xFE000000


class Recorder:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def invalidate_range_start(self, s: int, e: int) -> None:
        self.log.append((self.name, "start", s, e))

    def invalidate_range_end(self, s: int, e: int) -> None:
        self.log.append((self.name, "end", s, e))


@pytest.fixture
def h() -> HostMemory:
    return HostMemory()


def test_pages_per_hpage():
    assert [KVM_PAGES_PER_HPAGE(level) for level in (1, 2, 3)] == [1, 512, 262144]
    with pytest.raises(ValueError, match="page level"):
        KVM_PAGES_PER_HPAGE(4)


def test_vma_overlap_and_alignment(h):
    h.mmap_anon(0x10000, 0x10000)
    with pytest.raises(ValueError, match="overlaps"):
        h.mmap_anon(0x1F000, 0x2000)
    with pytest.raises(ValueError, match="multiples"):
        h.mmap_anon(0x100000, 0x1000, page_level=2)
    with pytest.raises(ValueError, match="multiples"):
        h.mmap_anon(0x1001, 0x1000)
    assert h.find_vma(0x1FFFF).start == 0x10000 and h.find_vma(0x20000) is None


def test_gup_errors(h):
    h.mmap_anon(0x10000, 0x1000, writable=False)
    assert h.hva_to_pfn(0x10000, write=False) >= RAM_BASE >> 12
    with pytest.raises(KvmError) as ei:
        h.hva_to_pfn(0x10000, write=True)
    assert ei.value.errno == errno.EFAULT and "read-only" in ei.value.message
    with pytest.raises(KvmError) as ei:
        h.hva_to_pfn(0x50000, write=False)
    assert ei.value.errno == errno.EFAULT


def test_lazy_materialisation(h):
    h.mmap_anon(0x40000000, GB)
    pfn = h.hva_to_pfn(0x40000000, write=True)
    assert h.stats.pages_populated == 1 and h.stats.pages_materialised == 0
    assert h.read_phys(pfn << 12, 16) == bytes(16) and h.resident_bytes() == 0
    h.write_phys((pfn << 12) + 4094, b"\x01\x02\x03\x04")  # spans into the next pfn
    assert h.stats.pages_materialised == 2
    assert h.read_phys((pfn << 12) + 4094, 4) == b"\x01\x02\x03\x04"
    assert h.hva_to_pfn(0x40000000, write=False) == pfn  # stable


def test_thp_block_contiguous_and_aligned(h):
    h.mmap_anon(0x40000000, 4 * MB2, page_level=2)
    pfn = h.hva_to_pfn(0x40000000 + MB2 + 5 * PAGE_SIZE, write=True)
    base = pfn - 5
    assert base % 512 == 0
    assert h.hva_to_pfn(0x40000000 + MB2 + 511 * PAGE_SIZE, write=False) == base + 511
    assert h.host_mapping_level(0x40000000 + MB2) == 2
    assert h.host_mapping_level(0x40000000) == 1  # block not populated
    assert h.stats.pages_populated == 512


def test_thp_split_on_partial_invalidation(h):
    h.mmap_anon(0x40000000, MB2, page_level=2)
    base = h.hva_to_pfn(0x40000000, write=True)
    h.write_phys((base + 1) << 12, b"keep")
    assert h.invalidate_range(0x40001000, 0x40002000) == 1
    assert h.host_mapping_level(0x40000000) == 1
    assert h.hva_to_pfn(0x40000000, write=False) == base  # untouched subpages keep pfns
    new = h.hva_to_pfn(0x40001000, write=False)
    assert new != base + 1 and h.read_phys(new << 12, 4) == b"keep"
    assert not h.pfn_is_live(base + 1) and h.pfn_is_live(base)


def test_hugetlb_1g_block(h):
    h.mmap_anon(0x40000000, 2 * GB, page_level=3)
    pfn = h.hva_to_pfn(0x40000000 + GB + 0x3000, write=True)
    assert (pfn - 3) % 262144 == 0 and h.host_mapping_level(0x40000000 + GB) == 3
    # a partial invalidation never splits a hugetlbfs page
    assert h.invalidate_range(0x40000000 + GB, 0x40000000 + GB + PAGE_SIZE) == 0
    assert h.hva_to_pfn(0x40000000 + GB + 0x3000, write=False) == pfn
    with pytest.raises(ValueError, match="1G"):
        h.munmap(0x40000000, MB2)
    h.write_phys(pfn << 12, b"x")
    assert h.invalidate_range(0x40000000 + GB, 0x40000000 + 2 * GB) == 262144
    again = h.hva_to_pfn(0x40000000 + GB + 0x3000, write=False)
    assert again != pfn and h.read_phys(again << 12, 1) == b"x"


def test_notifier_order_and_reclaim_gives_new_pfn(h):
    log: list = []
    a, b = Recorder("a", log), Recorder("b", log)
    h.register_notifier(a)
    h.register_notifier(b)
    h.mmap_anon(0x10000, 0x4000)
    old = h.hva_to_pfn(0x11000, write=True)
    h.write_phys(old << 12, b"data")
    h.invalidate_range(0x10000, 0x14000)
    assert log == [
        ("b", "start", 0x10000, 0x14000),
        ("a", "start", 0x10000, 0x14000),
        ("b", "end", 0x10000, 0x14000),
        ("a", "end", 0x10000, 0x14000),
    ]
    assert not h.pfn_is_live(old) and not h.is_populated(0x11000)
    new = h.hva_to_pfn(0x11000, write=False)
    assert new != old and h.read_phys(new << 12, 4) == b"data"
    h.unregister_notifier(a)
    with pytest.raises(ValueError):
        h.unregister_notifier(a)


def test_split_invalidation_steps(h):
    h.mmap_anon(0x10000, 0x1000)
    pfn = h.hva_to_pfn(0x10000, write=True)
    h.invalidate_range_start(0x10000, 0x11000)
    assert h.invalidations_in_progress == 1
    assert h.hva_to_pfn(0x10000, write=False) == pfn  # a fault racing before the unmap
    h.reclaim_range(0x10000, 0x11000)
    assert h.hva_to_pfn(0x10000, write=False) != pfn
    h.invalidate_range_end(0x10000, 0x11000)
    with pytest.raises(ValueError, match="matching start"):
        h.invalidate_range_end(0x10000, 0x11000)


def test_no_reclaim_keeps_pfn(h):
    h.mmap_anon(0x10000, 0x1000)
    pfn = h.hva_to_pfn(0x10000, write=True)
    h.invalidate_range(0x10000, 0x11000, reclaim=False)
    assert h.hva_to_pfn(0x10000, write=False) == pfn


def test_pin_survives_invalidation_and_munmap(h):
    log: list = []
    h.register_notifier(Recorder("n", log))
    h.mmap_anon(0x10000, 0x2000)
    pfns = h.pin(0x10000, 2)
    h.write_phys(int(pfns[0]) << 12, b"pinned")
    assert h.invalidate_range(0x10000, 0x12000) == 0 and len(log) == 2
    assert h.hva_to_pfn(0x10000, write=False) == pfns[0] and h.pin_count(int(pfns[0])) == 1
    h.munmap(0x10000, 0x2000)
    assert h.find_vma(0x10000) is None and h.pfn_is_live(int(pfns[0]))
    assert h.read_phys(int(pfns[0]) << 12, 6) == b"pinned"  # device DMA still sees it
    h.unpin(0x10000, 2)
    assert not h.pfn_is_live(int(pfns[0]))
    with pytest.raises(ValueError, match="not pinned"):
        h.unpin(0x10000, 1)


def test_munmap_splits_vma_and_drops_contents(h):
    h.mmap_anon(0x10000, 0x4000)
    pfn = h.hva_to_pfn(0x11000, write=True)
    h.write_phys(pfn << 12, b"gone")
    h.munmap(0x11000, 0x1000)
    assert [(v.start, v.end) for v in h.vmas()] == [(0x10000, 0x11000), (0x12000, 0x14000)]
    h.mmap_anon(0x11000, 0x1000)
    assert h.read_phys(h.hva_to_pfn(0x11000, write=False) << 12, 4) == bytes(4)


def test_mmio_mapping(h):
    h.map_mmio(0x7000_0000, 0x2000, hpa=BAR, memtype=MemType.WC)
    pfn = h.hva_to_pfn(0x7000_1000, write=True)
    assert pfn == (BAR >> 12) + 1 and h.is_mmio_pfn(pfn)
    assert h.memtype_of(BAR + 0x1008) == MemType.WC
    assert isinstance(h.memtype_of(BAR), MemType)
    assert h.memtype_of(RAM_BASE) == MemType.WB and not h.is_mmio_pfn(RAM_BASE >> 12)
    assert h.memtype_of(0xFED00000) == MemType.UC_MINUS  # untracked non-RAM
    h.write_u64(BAR + 8, 0xDEADBEEF)  # a register write lands in the device store
    assert h.read_u64(BAR + 8) == 0xDEADBEEF
    with pytest.raises(ValueError, match="overlaps host RAM"):
        h.map_mmio(0x7100_0000, 0x1000, hpa=RAM_BASE, memtype=MemType.UC)
    with pytest.raises(ValueError, match="conflicting"):
        h.map_mmio(0x7200_0000, 0x1000, hpa=BAR, memtype=MemType.UC)
    assert h.stats.pfn_allocations == 0


def test_read_u64_many_matches_scalar(h):
    h.mmap_anon(0x10000, 0x3000)
    pfns = [h.hva_to_pfn(0x10000 + i * PAGE_SIZE, write=True) for i in range(3)]
    for i, p in enumerate(pfns):
        h.write_u64((p << 12) + 8 * i, 0x1111 * (i + 1))
    addrs = np.array([(pfns[2] << 12) + 16, pfns[0] << 12, (pfns[1] << 12) + 8, 0x5000], np.uint64)
    got = h.read_u64_many(addrs)
    assert got.dtype == np.uint64 and got.tolist() == [h.read_u64(int(a)) for a in addrs]
    assert got.tolist()[:3] == [0x3333, 0x1111, 0x2222]
    with pytest.raises(ValueError, match="aligned"):
        h.read_u64_many(np.array([4], np.uint64))


def test_maxphyaddr_bounds():
    with pytest.raises(ValueError, match="maxphyaddr"):
        HostMemory(maxphyaddr=30)


def test_hva_to_pfn_range_equals_page_by_page() -> None:
    """Bulk GUP gives what hva_to_pfn gives per page (4K, THP, MMIO; faulting in)."""
    a, b = HostMemory(), HostMemory()
    for h in (a, b):
        h.mmap_anon(0x40000000, 8 << 20, page_level=2)
        h.mmap_anon(0x80000000, 1 << 20)
        h.map_mmio(0x90000000, 1 << 16, hpa=0xF000_0000, memtype=0)
        h.hva_to_pfn(0x80003000, write=True)  # a page already present
    for hva, n in ((0x40000000 + 0x3000, 1500), (0x80000000, 256), (0x90000000, 16)):
        bulk = a.hva_to_pfn_range(hva, n, write=False)
        one = np.array([b.hva_to_pfn(hva + (i << 12), write=False) for i in range(n)])
        assert bulk.dtype == np.uint64 and bulk.tolist() == one.tolist()
    assert a.hva_to_pfn_range(0x40000000, 0, write=False).size == 0
    with pytest.raises(KvmError):
        a.hva_to_pfn_range(0x80000000 + (255 << 12), 2, write=False)  # runs off the VMA


def _host_state(h: HostMemory, hva: int, npages: int) -> tuple[list[int], list[int], list[int]]:
    """Per-page pfn and host level, and the stats, without faulting anything in."""
    pages = range(hva >> 12, (hva >> 12) + npages, 97)
    pfns = [h._lookup(p, h.find_vma(p << 12)) or -1 for p in pages]
    levels = [h.host_mapping_level(p << 12) for p in pages]
    st = h.stats
    return pfns, levels, [st.pages_populated, st.pfn_allocations, st.pages_reclaimed]


@pytest.mark.parametrize("level", [2, 3])
def test_fault_in_blocks_equals_page_by_page(level: int) -> None:
    """One pfn run per range of blocks == hva_to_pfn block by block (pfns, stats, liveness)."""
    blk = KVM_PAGES_PER_HPAGE(level) << 12
    hva = 1 << 40
    a, b = HostMemory(), HostMemory()
    for h in (a, b):
        h.mmap_anon(hva, 8 * blk, page_level=level)
        h.hva_to_pfn(hva + 2 * blk + 0x5000, write=True)  # a block already present
        h.write_phys(h.hva_to_pfn(hva + 5 * blk, write=True) << 12, b"swap")
        h.invalidate_range(hva + 5 * blk, hva + 6 * blk)  # reclaimed whole: contents swapped
    got = a.fault_in_blocks(hva, 8 * blk >> 12, write=False).tolist()
    one = [b.hva_to_pfn(hva + i * blk, write=False) for i in range(8)]
    assert got == one
    assert _host_state(a, hva, 8 * blk >> 12) == _host_state(b, hva, 8 * blk >> 12)
    assert a.read_phys(int(got[5]) << 12, 4) == b"swap"
    for h in (a, b):
        h.invalidate_range(hva + 3 * blk, hva + 4 * blk)
    assert [a.pfn_is_live(int(p) + 7) for p in got] == [b.pfn_is_live(p + 7) for p in one]
    assert not a.pfn_is_live(int(got[3])) and a.pfn_is_live(int(got[4]))


def test_fault_in_blocks_stops_at_split_block_and_vma_edge() -> None:
    """A THP block split into 4K pages, or one cut by munmap, is left to the page path."""
    hva = 1 << 40
    a, b = HostMemory(), HostMemory()
    for h in (a, b):
        h.mmap_anon(hva, 8 * MB2, page_level=2)
        h.hva_to_pfn(hva + 3 * MB2, write=True)
        h.invalidate_range(hva + 3 * MB2, hva + 3 * MB2 + PAGE_SIZE)  # split: 511 4K pages
        h.munmap(hva + 7 * MB2 + PAGE_SIZE, PAGE_SIZE)
    got = a.fault_in_blocks(hva, 8 * 512, write=False)
    assert len(got) == 3
    bulk = a.hva_to_pfn_range(hva, 7 * 512 + 1, write=False)
    one = [b.hva_to_pfn(hva + (i << 12), write=False) for i in range(7 * 512 + 1)]
    assert bulk.tolist() == one
    assert (
        a.fault_in_blocks(hva + 4 * MB2 + 0x5000, 4 * 512, write=False).size == 3
    )  # up to the cut block
    assert _host_state(a, hva, 8 * 512) == _host_state(b, hva, 8 * 512)
    assert a.host_mapping_level(hva + 3 * MB2 + 0x2000) == 1
    assert a.host_mapping_level(hva + 7 * MB2) == 1
    assert a.fault_in_blocks(0x10000, 1, write=False).size == 0  # no VMA


def test_fault_in_blocks_out_of_ram_leaves_the_error_to_hva_to_pfn() -> None:
    h = HostMemory(maxphyaddr=36)  # RAM window [4 GiB, 32 GiB): 28 1G pages
    h.mmap_anon(1 << 40, 32 * GB, page_level=3)
    got = h.fault_in_blocks(1 << 40, 32 << 18, write=False)
    assert 0 < len(got) < 32 and h.stats.pfn_allocations == len(got) << 18
    with pytest.raises(KvmError) as ei:
        h.hva_to_pfn((1 << 40) + len(got) * GB, write=False)
    assert ei.value.errno == errno.ENOMEM


def test_munmap_piece_keeps_its_blocks() -> None:
    h = HostMemory()
    h.mmap_anon(1 << 40, 4 * MB2, page_level=2)
    pfns = h.fault_in_blocks(1 << 40, 4 * 512, write=True).tolist()
    h.munmap((1 << 40) + MB2, MB2)
    assert h.hva_to_pfn((1 << 40) + 2 * MB2 + 0x1000, write=False) == int(pfns[2]) + 1
    assert h.pfn_is_live(int(pfns[3])) and not h.pfn_is_live(int(pfns[1]))
    assert h.host_mapping_level((1 << 40) + 3 * MB2) == 2
