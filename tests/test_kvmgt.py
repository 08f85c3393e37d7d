"""KVMGT shadow PPGTT: spec/consumers.md §1 rules and the §4 checklist (items 1-17)."""

from __future__ import annotations

import errno

import kvmmu
import pytest
from kvmmu.errors import ConfigError, KvmError
from kvmmu.hookspecs import hookimpl
from kvmmu.hostmem import PAGE_SHIFT
from kvmmu.plugins.kvmgt import GpuFault, gtt
from kvmmu.plugins.kvmgt.device import (
    VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE,
    VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY,
    Vgpu,
)
from kvmmu.plugins.kvmgt.ggtt import GGTT_START_OFFSET
from kvmmu.plugins.kvmgt.gtt import GttType as T
from kvmmu.plugins.kvmgt.guest import DEFAULT_LEAF, DEFAULT_PTR, GuestPpgtt
from kvmmu.plugins.kvmgt.ppgtt import PpgttMm, Spt

HVA = 0x1000_0000
RAM = 64 << 20
DATA = 8 << 20  # data pages start here; tables live in [1 MiB, 4 MiB)


def make_vm(page_level: int = 1, **kvmgt: object) -> kvmmu.VM:
    plugins: dict[str, object] = {"enabled": ["kvmgt"]}
    if kvmgt:
        plugins["kvmgt"] = kvmgt
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", plugins=plugins))
    vm.host.mmap_anon(HVA, RAM, page_level=page_level)
    vm.set_user_memory_region(0, 0, 0, RAM, HVA)
    return vm


def vgpu_of(vm: kvmmu.VM) -> Vgpu:
    v: Vgpu = vm.plugin("kvmgt").vgpu
    return v


def host_pfn(vm: kvmmu.VM, gpa: int) -> int:
    return vm.host.hva_to_pfn(HVA + gpa, write=False)


def scatter(vm: kvmmu.VM, gpa: int, npages: int) -> None:
    """Fault pages in backwards so their host pfns are not ascending (no 2M pin)."""
    for k in reversed(range(npages)):
        vm.write_guest(gpa + k * 4096, b"\0")


def setup(vm: kvmmu.VM, maps: int = 1) -> tuple[GuestPpgtt, PpgttMm, Vgpu]:
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    for i in range(maps):
        g.map_4k(0x1000 * (i + 1), DATA + 0x1000 * i)
    v = vgpu_of(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    return g, mm, v


def spt_of(v: Vgpu, gpa: int) -> Spt:
    spt = v.gtt.find_spt_by_gfn(gpa >> PAGE_SHIFT)
    assert spt is not None
    return spt


def shadow_of(v: Vgpu, g: GuestPpgtt, gma: int, level: int = 1) -> tuple[Spt, int, int]:
    table, idx = g.entry_addr(gma, level)
    spt = spt_of(v, table)
    return spt, idx, v.gtt.get_shadow(spt, idx)[0]


# ----------------------------------------------------------------- item 1
def test_w5_w7_w10_8byte_write_remaps_pte_and_drops_old_kref() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    g.map_4k(0x2000, DATA)  # a second user of DATA: kref 2
    old_gfn = DATA >> PAGE_SHIFT
    assert v.dma.kref(old_gfn) == 2
    g.map_4k(0x1000, DATA + 0x5000, flags=DEFAULT_LEAF | gtt.PPAT_UNCACHED)
    _spt, _idx, se = shadow_of(v, g, 0x1000)
    want = gtt.set_pfn(
        DATA + 0x5000 | DEFAULT_LEAF | gtt.PPAT_UNCACHED,
        T.PPGTT_PTE_4K_ENTRY,
        host_pfn(vm, DATA + 0x5000),
    )
    assert se == want
    assert v.dma.kref(old_gfn) == 1 and v.dma.kref((DATA + 0x5000) >> PAGE_SHIFT) == 1
    g.map_4k(0x2000, DATA + 0x6000)
    assert v.dma.kref(old_gfn) == 0  # unmapped at 0 ...
    assert vm.host.pin_count(host_pfn(vm, DATA)) == 0  # ... and unpinned
    vm.write_guest(DATA + 0x5000, b"new page")
    assert v.dma_read(mm, 0x1000, 8) == b"new page"
    assert vm.check_invariants() == []


# -------------------------------------------------------------- items 2, 3
def test_w6_partial_write_points_at_scratch() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    vm.write_guest(DATA + 0x3000, b"deferred")
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_of(v, table)
    before = v.gtt.get_shadow(spt, idx)[0]
    g.write_entry(table, idx, DATA + 0x3000 | DEFAULT_LEAF, width="lo")
    se = v.gtt.get_shadow(spt, idx)[0]
    assert gtt.get_pfn(se, T.PPGTT_PTE_4K_ENTRY) == v.gtt.scratch_pt[T.PPGTT_PTE_PT]
    assert se & ~gtt.ADDR_4K_MASK == before & ~gtt.ADDR_4K_MASK  # other bits kept
    assert idx in spt.post_shadow and v.gtt.post_shadow_list == [spt]
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0  # old mapping torn down (W8)
    assert v.dma_read(mm, 0x1000, 8) == bytes(8)  # the GPU sees the zero page
    assert vm.check_invariants() == []
    # only the next submission's flush re-reads the whole entry
    assert v.submit_workload(mm, reads=[(0x1000, 8)]) == [b"deferred"]
    assert spt.post_shadow == set() and v.gtt.post_shadow_list == []
    assert vm.check_invariants() == []


def test_w6_high_half_adds_no_work_before_flush() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_of(v, table)
    new = (DATA + 0x4000) | DEFAULT_LEAF | (1 << 40)  # high half non-zero
    g.write_entry(table, idx, new, width="lo")
    after_lo = v.gtt.get_shadow(spt, idx)[0]
    maps, unmaps = v.dma.maps, v.dma.unmaps
    g.write_entry(table, idx, new, width="hi")
    assert v.gtt.get_shadow(spt, idx)[0] == after_lo
    assert (v.dma.maps, v.dma.unmaps) == (maps, unmaps)
    assert v.gtt.post_shadow_list == [spt] and spt.post_shadow == {idx}
    assert v.stats["track_writes"] == 2
    # the flush maps what the full entry says: gpa 1 TiB + DATA is outside guest
    # memory, so the map fails and the workload is refused (W11)
    with pytest.raises(KvmError) as ei:
        v.submit_workload(mm)
    assert ei.value.errno == errno.ENXIO and spt.stale == {idx}


def test_w10_populate_of_leaf_outside_guest_memory_fails_enxio() -> None:
    """W10 ([GTT] @ f1864235, no ``intel_gvt_is_valid_gfn``): populating a
    present 4K leaf the host cannot DMA-map fails with ENXIO, the new spt is
    freed and shadowing the mm fails (L2); nothing stays mapped or tracked."""
    vm = make_vm()
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_4k(0x1000, DATA)
    g.map_4k(0x2000, 1 << 40)  # outside every memslot
    v = vgpu_of(vm)
    with pytest.raises(KvmError) as ei:
        v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert ei.value.errno == errno.ENXIO
    assert v.gtt.mms == [] and v.gtt.spts == {} and v.ptable.gfns == set()
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert vm.check_invariants() == []


def test_g2_g3_g4_register_enable_unregister_page_track() -> None:
    """G2: register only records (EEXIST twice); G3: enable needs a record
    (ENXIO) and write-protects once; G4: unregistering a tracked gfn removes
    the protection."""
    vm = make_vm()
    v = vgpu_of(vm)
    gfn = (DATA >> PAGE_SHIFT) + 0x40
    slot = vm.memslots.gfn_to_memslot(gfn)
    with pytest.raises(KvmError) as ei:
        v.track.enable(gfn)
    assert ei.value.errno == errno.ENXIO
    v.track.register(gfn, lambda priv, gpa, data: None, None)
    assert not vm.page_track.is_write_tracked(slot, gfn) and gfn not in v.ptable.gfns
    with pytest.raises(KvmError) as ei:
        v.track.register(gfn, lambda priv, gpa, data: None, None)
    assert ei.value.errno == errno.EEXIST
    v.track.enable(gfn)
    v.track.enable(gfn)  # already tracked: no-op
    assert vm.page_track.is_write_tracked(slot, gfn) and v.ptable.kvm_adds == 1
    v.track.unregister(gfn)
    assert not vm.page_track.is_write_tracked(slot, gfn) and v.ptable.kvm_removes == 1
    assert v.track.find(gfn) is None and gfn not in v.ptable.gfns


def test_w3_handler_ignores_written_data_and_rereads_guest_entry() -> None:
    """W3: the handler re-reads the whole 8-byte guest entry; ``data`` is unused."""
    vm = make_vm()
    g, _mm, v = setup(vm)
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_of(v, table)
    real = (DATA + 0x6000) | DEFAULT_LEAF
    vm.write_guest(table + idx * 8, real.to_bytes(8, "little"))  # bytes already landed
    v.gtt.write_protection_handler(spt, table + idx * 8, b"\xff" * 8)
    assert v.gtt.get_shadow(spt, idx)[0] == gtt.set_pfn(
        real, T.PPGTT_PTE_4K_ENTRY, host_pfn(vm, DATA + 0x6000)
    )
    assert vm.check_invariants() == []


def test_g8_vfio_unmap_forces_out_entries_whatever_their_kref() -> None:
    """G8: ``intel_vgpu_dma_unmap`` removes every cache entry in the range."""
    vm = make_vm()
    v = vgpu_of(vm)
    gfn = (DATA >> PAGE_SHIFT) + 0x50
    v.dma.map(gfn)
    v.dma.map(gfn)
    v.dma.map(gfn + 1)
    assert v.dma.kref(gfn) == 2
    assert v.dma.unmap_range(gfn, 1) == 1
    assert v.dma.kref(gfn) == 0 and v.dma.kref(gfn + 1) == 1


# ----------------------------------------------------------------- item 4
@pytest.mark.parametrize("size", [2, 16])
def test_w1_write_of_other_size_is_einval_shadow_unchanged(size: int) -> None:
    vm = make_vm()
    g, _mm, v = setup(vm)
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_of(v, table)
    before = v.gtt.get_shadow(spt, idx)[0]
    data = (DATA + 0x7000 | DEFAULT_LEAF).to_bytes(8, "little") * 2
    r = vm.vcpus[0].access(table + idx * 8, "write", size, data[:size])
    assert r.emulated
    assert vm.read_guest(table + idx * 8, size) == data[:size]  # guest memory changed
    assert v.gtt.get_shadow(spt, idx)[0] == before  # shadow did not
    assert any("EINVAL" in e and "W1" in e for e in v.errors)
    assert idx in spt.stale


# ----------------------------------------------------------------- item 5
def test_w2_w5_misaligned_8byte_write_updates_entry_0_only() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    pt = g.table_of(0x0, 1)
    spt = spt_of(v, pt)
    # 8 bytes at offset 4: high half of entry 0, low half of entry 1
    g.write_entry(pt, 0, DATA + 0x8000 | DEFAULT_LEAF, width="lo")  # prepare entry 0 low
    v.submit_workload(mm)
    se1_before = v.gtt.get_shadow(spt, 1)[0]
    r = vm.vcpus[0].access(pt + 4, "write", 8, bytes(4) + (DATA + 0x9000 | 1).to_bytes(4, "little"))
    assert r.emulated
    se0 = v.gtt.get_shadow(spt, 0)[0]
    assert gtt.get_pfn(se0, T.PPGTT_PTE_4K_ENTRY) == host_pfn(vm, DATA + 0x8000)
    assert 0 not in spt.post_shadow
    # entry 1 changed in the guest but nobody looked at it: the invariant sees it
    assert v.gtt.get_shadow(spt, 1)[0] == se1_before
    problems = vm.check_invariants()
    assert len(problems) == 1 and "index 1:" in problems[0]


# ----------------------------------------------------------------- item 6
def test_w4_write_to_non_stride_slot_of_64k_table_ignored() -> None:
    vm = make_vm(gen=11)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(0x0, DATA)
    v = vgpu_of(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    pt = g.table_of(0x0, 1)
    spt = spt_of(v, pt)
    assert spt.pde_ips
    before = v.gtt.shadow_page(spt)
    maps = v.dma.maps
    g.write_entry(pt, 5, DATA + 0x20000 | DEFAULT_LEAF)
    assert (v.gtt.shadow_page(spt) == before).all() and v.dma.maps == maps
    assert v.stats["track_writes"] == 1 and v.errors == []
    assert vm.check_invariants() == []


# ----------------------------------------------------------------- item 7
def test_w7_pde_rewritten_with_same_value_keeps_child() -> None:
    vm = make_vm()
    g, _mm, v = setup(vm)
    pd, idx = g.entry_addr(0x1000, 2)
    pde = g.read_entry(pd, idx)
    child = spt_of(v, pde & gtt.ADDR_4K_MASK)
    in_use, maps = v.gvt.pool.in_use, v.dma.maps
    g.write_entry(pd, idx, pde)
    assert spt_of(v, pde & gtt.ADDR_4K_MASK) is child and child.refcount == 1
    assert (v.gvt.pool.in_use, v.dma.maps) == (in_use, maps)  # no re-populate
    assert vm.page_track.count(child.gfn or 0) == 1
    assert vm.check_invariants() == []


# ----------------------------------------------------------------- item 8
def test_w7_w9_l5_pde_to_new_table_allocates_tracks_and_frees_old() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    pd, idx = g.entry_addr(0x1000, 2)
    old_pt = g.read_entry(pd, idx) & gtt.ADDR_4K_MASK
    new_pt = g.alloc_table()
    g.write_entry(new_pt, 1, DATA + 0xA000 | DEFAULT_LEAF)  # untracked: plain write
    assert vm.page_track.count(new_pt >> PAGE_SHIFT) == 0
    g.write_entry(pd, idx, new_pt | DEFAULT_PTR)
    new = spt_of(v, new_pt)
    assert new.refcount == 1 and vm.page_track.count(new_pt >> PAGE_SHIFT) == 1
    assert v.gtt.find_spt_by_gfn(old_pt >> PAGE_SHIFT) is None
    assert vm.page_track.count(old_pt >> PAGE_SHIFT) == 0
    assert old_pt >> PAGE_SHIFT not in v.ptable.gfns
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0  # the old table's leaf was unmapped
    vm.write_guest(DATA + 0xA000, b"moved")
    assert v.dma_read(mm, 0x1000, 5) == b"moved"
    assert vm.check_invariants() == []


# ----------------------------------------------------------------- item 9
def test_w10_2m_split_when_host_cannot_pin_contiguously() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    scatter(vm, 16 << 20, 512)
    flags = DEFAULT_LEAF | gtt.PAGE_PAT_LARGE | gtt.PAGE_DIRTY | gtt.PAGE_PCD
    g.map_2m(2 << 20, 16 << 20, flags=flags)
    _spt, _idx, se = shadow_of(v, g, 2 << 20, level=2)
    assert not se & (gtt.PAGE_PSE | gtt.PAGE_DIRTY | gtt.GEN8_PDE_IPS_64K)
    sub = v.gtt.find_spt_by_mfn(gtt.get_pfn(se, T.PPGTT_PDE_ENTRY))
    assert sub is not None and sub.gfn is None and sub.refcount == 1
    page = v.gtt.shadow_page(sub)
    for k in (0, 1, 511):
        e = int(page[k])
        assert e & gtt.PAGE_PAT and e & gtt.PAGE_PCD  # PAT moved from bit 12 to bit 7
        assert gtt.get_pfn(e, T.PPGTT_PTE_4K_ENTRY) == host_pfn(vm, (16 << 20) + k * 4096)
    vm.write_guest((16 << 20) + 0x1FF000, b"end of 2M")
    assert v.dma_read(mm, (2 << 20) + 0x1FF000, 9) == b"end of 2M"
    assert vm.check_invariants() == []
    g.unmap(2 << 20, level=2)
    assert v.gtt.find_spt_by_mfn(sub.mfn) is None
    assert v.dma.kref((16 << 20) >> PAGE_SHIFT) == 0
    assert vm.check_invariants() == []


def test_w10_2m_direct_shadow_when_host_pages_are_contiguous() -> None:
    vm = make_vm(page_level=2)
    g, _mm, v = setup(vm)
    g.map_2m(2 << 20, 16 << 20)
    _spt, _idx, se = shadow_of(v, g, 2 << 20, level=2)
    assert se & gtt.PAGE_PSE
    assert gtt.get_pfn(se, T.PPGTT_PTE_2M_ENTRY) == host_pfn(vm, 16 << 20)
    assert v.dma.by_gfn[(16 << 20) >> PAGE_SHIFT].size == 2 << 20
    assert vm.check_invariants() == []


def test_g7_resizing_a_gfn_mapping_forcibly_unmaps_the_4k_user() -> None:
    """G7 "same gfn, different size": a 2M map attempt drops a live 4K mapping.

    On a host without contiguous 2M pages, rewriting a split 2M PDE with the
    same value tries the 2M map first; the cache entry of the base gfn (a
    4K mapping owned by the old split table) is unmapped whatever its kref,
    then the 2M pin fails and the entry is split again. Removing the old
    split table then drops the only kref of the new table's first page: a
    shadow entry is left pointing at an unpinned page (inference from kvmgt.c).
    """
    vm = make_vm(has_2m_gtt=True)
    g, _mm, v = setup(vm)
    scatter(vm, 16 << 20, 512)
    g.map_2m(2 << 20, 16 << 20)
    pd, idx = g.entry_addr(2 << 20, 2)
    g.write_entry(pd, idx, g.read_entry(pd, idx))
    base = (16 << 20) >> PAGE_SHIFT
    assert v.dma.kref(base) == 0
    assert vm.host.pin_count(host_pfn(vm, 16 << 20)) == 0
    problems = vm.check_invariants()
    assert any("kref 0 != 1" in p for p in problems)


# ---------------------------------------------------------------- item 10
def test_w10_1g_entry_rejected() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    g.map_1g(1 << 30, 0)
    spt, idx, se = shadow_of(v, g, 1 << 30, level=3)
    assert se == 0 and idx in spt.stale
    assert any("1GB" in e for e in v.errors)
    with pytest.raises(GpuFault):
        v.dma_read(mm, 1 << 30, 4)


# ---------------------------------------------------------------- item 11
def test_w7_w10_64k_entry_at_index_16_splits_into_16_entries() -> None:
    vm = make_vm(gen=11)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(0x0, DATA)  # index 0: makes the PT an IPS table
    v = vgpu_of(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    g.map_64k(16 * 4096, DATA + (64 << 10))
    spt, idx, _ = shadow_of(v, g, 16 * 4096)
    assert idx == 16
    for k in range(16):
        se = v.gtt.get_shadow(spt, 16 + k)[0]
        assert se & gtt.GTT_SPTE_FLAG_64K_SPLITED
        assert gtt.get_pfn(se, T.PPGTT_PTE_4K_ENTRY) == host_pfn(vm, DATA + (64 << 10) + k * 4096)
    vm.write_guest(DATA + (64 << 10) + 0xF000, b"64K tail")
    assert v.dma_read(mm, 16 * 4096 + 0xF000, 8) == b"64K tail"
    assert vm.check_invariants() == []
    g.unmap(16 * 4096)
    scratch = v.gtt.scratch_pt[T.PPGTT_PTE_PT]
    for k in range(16):
        se = v.gtt.get_shadow(spt, 16 + k)[0]
        assert not se & gtt.GTT_SPTE_FLAG_64K_SPLITED
        assert gtt.get_pfn(se, T.PPGTT_PTE_4K_ENTRY) == scratch
        assert v.dma.kref(((DATA + (64 << 10)) >> PAGE_SHIFT) + k) == 0
    assert vm.check_invariants() == []


def test_w9_ips_change_reshadows_existing_table() -> None:
    vm = make_vm(gen=11)
    g, _mm, v = setup(vm)
    pd, idx = g.entry_addr(0x1000, 2)
    pde = g.read_entry(pd, idx)
    pt = pde & gtt.ADDR_4K_MASK
    g.write_entry(pt, 1, 0)  # only 64K slots matter once IPS is set
    g.write_entry(pt, 0, DATA | DEFAULT_LEAF)
    g.write_entry(pd, idx, pde | gtt.GEN8_PDE_IPS_64K)
    spt = spt_of(v, pt)
    assert spt.pde_ips and spt.refcount == 1
    _, _, se = shadow_of(v, g, 0, level=2)
    assert not se & gtt.GEN8_PDE_IPS_64K  # 64K is always split in the shadow
    assert vm.check_invariants() == []


# ---------------------------------------------------------------- item 12
class _Probe:
    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes, bytes]] = []

    @hookimpl
    def kvmmu_track_write(self, vm: kvmmu.VM, gpa: int, new: bytes) -> None:
        self.seen.append((gpa, new, vm.read_guest(gpa, len(new))))


def test_k5_k6_k7_tracked_write_is_emulated_after_bytes_land() -> None:
    vm = make_vm()
    g, _mm, _v = setup(vm)
    probe = _Probe()
    vm.register_plugin(probe, "probe")
    table, idx = g.entry_addr(0x1000, 1)
    val = (DATA + 0xB000 | DEFAULT_LEAF).to_bytes(8, "little")
    r = vm.vcpus[0].access(table + idx * 8, "write", 8, val)
    assert r.emulated and r.fault is None
    assert probe.seen == [(table + idx * 8, val, val)]  # bytes already in memory
    hit = vm.mmu.translate(table)
    assert hit is not None and not vm.mmu.access_allowed(hit[0], True, False, False)
    rd = vm.vcpus[0].access(table + idx * 8, "read", 8)
    assert rd.data == val and not rd.emulated  # reads are mapped and do not exit


# ---------------------------------------------------------------- item 13
def test_g3_two_shadow_users_move_kvm_count_once() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    pd, idx = g.entry_addr(0x1000, 2)
    pde = g.read_entry(pd, idx)
    g.write_entry(pd, idx + 1, pde)  # a second PDE shares the PT
    spt = spt_of(v, pde & gtt.ADDR_4K_MASK)
    assert spt.refcount == 2
    assert vm.page_track.count(spt.gfn or 0) == 1
    v.track.enable(spt.gfn or 0)  # enabling again: no KVM call
    v.ptable.add(spt.gfn or 0)
    assert vm.page_track.count(spt.gfn or 0) == 1 and v.ptable.kvm_adds == len(v.ptable.gfns)
    # a second PPGTT sharing the whole tree
    g2 = GuestPpgtt(vm, 4 << 20, 5 << 20)
    g2.write_entry(g2.pdps[0], 0, g.read_entry(g.pdps[0], 0))
    mm2 = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g2.pdps)
    assert mm2 is not None and mm2 is not mm
    assert all(vm.page_track.count(s.gfn) == 1 for s in v.gtt.spts.values() if s.gfn)
    assert vm.check_invariants() == []


# ---------------------------------------------------------------- item 14
def test_k9_l6_memslot_delete_forgets_protect_entries() -> None:
    vm = make_vm()
    vm.host.mmap_anon(0x2000_0000, 4 << 20)
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)
    g = GuestPpgtt(vm, 64 << 20, 68 << 20)
    g.map_4k(0x1000, DATA)
    v = vgpu_of(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    gfns = {s.gfn for s in v.gtt.spts.values() if s.gfn}
    assert gfns <= v.ptable.gfns
    vm.set_user_memory_region(1, 0, 64 << 20, 0, 0x2000_0000)  # DELETE
    assert not gfns & v.ptable.gfns  # protect-table entries gone
    assert {s.gfn for s in v.gtt.spts.values() if s.gfn} == gfns  # spts stay (L6)
    assert v.ptable.kvm_removes == 0  # no call back into KVM
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)  # same place again
    assert all(vm.page_track.count(x) == 0 for x in gfns)  # counters went with the slot
    writes = v.stats["track_writes"]
    r = vm.vcpus[0].access(g.pdps[0], "write", 8, bytes(8))
    assert not r.emulated and v.stats["track_writes"] == writes  # not delivered


# ---------------------------------------------------------------- item 15
def test_k10_memslot_move_refused_while_kvmgt_attached() -> None:
    vm = make_vm()
    vm.host.mmap_anon(0x2000_0000, 4 << 20)
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)
    with pytest.raises(KvmError) as ei:
        vm.set_user_memory_region(1, 0, 80 << 20, 4 << 20, 0x2000_0000)
    assert ei.value.errno == errno.EINVAL
    assert "kvmgt" in str(ei.value) and "kvm_page_track_has_external_user" in str(ei.value)
    slot = vm.slot_of(64 << 20)
    assert slot is not None and slot.base_gfn == (64 << 20) >> PAGE_SHIFT
    assert vm.slot_of(80 << 20) is None
    vgpu_of(vm).close()
    vm.set_user_memory_region(1, 0, 80 << 20, 4 << 20, 0x2000_0000)
    assert vm.slot_of(80 << 20) is not None


# ------------------------------------------------------------ items 16, 17
def ggtt_gpa(vm: kvmmu.VM, gma: int) -> int:
    return int(vm.plugin("kvmgt").cfg.bar0_gpa) + GGTT_START_OFFSET + (gma >> 12) * 8


def test_gg3_first_half_scratch_not_present_then_other_half_merges() -> None:
    vm = make_vm()
    v = vgpu_of(vm)
    gma = v.ggtt.aperture.base + 0x5000
    addr = ggtt_gpa(vm, gma)
    index = gma >> 12
    cpu = vm.vcpus[0]
    cpu.access(addr, "write", 8, (DATA | 1).to_bytes(8, "little"))
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 1
    new = (DATA + 0x1000) | (1 << 32) | 1  # both halves non-zero
    cpu.access(addr, "write", 4, (new & 0xFFFFFFFF).to_bytes(4, "little"))
    # item 16: virtual = that half + zeros; host = scratch, not present; old unmapped
    assert int(v.ggtt.virtual_ggtt[index]) == new & 0xFFFFFFFF
    host = int(v.ggtt.host_ggtt[index])
    assert not host & 1 and gtt.get_pfn(host, T.GGTT_PTE) == v.gvt.scratch_mfn
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert vm.check_invariants() == []
    # the same half again only updates the saved data and the virtual entry
    new = (DATA + 0x2000) | (0 << 32) | 1
    cpu.access(addr, "write", 4, (new & 0xFFFFFFFF).to_bytes(4, "little"))
    assert int(v.ggtt.virtual_ggtt[index]) == new and not int(v.ggtt.host_ggtt[index]) & 1
    # item 17: the other half merges and shadows the full entry
    cpu.access(addr + 4, "write", 4, (new >> 32).to_bytes(4, "little"))
    host = int(v.ggtt.host_ggtt[index])
    assert host & 1 and gtt.get_pfn(host, T.GGTT_PTE) == host_pfn(vm, DATA + 0x2000)
    assert cpu.access(addr, "read", 8).data == new.to_bytes(8, "little")
    vm.write_guest(DATA + 0x2000, b"ggtt")
    assert v.dma_read(None, gma, 4) == b"ggtt"
    assert vm.check_invariants() == []


def test_gg3_gg4_host_entry_of_half_or_non_present_write_is_bare_scratch() -> None:
    """GG3/GG4: the kernel builds the host entry from 0 (``m = {.val64 = 0}``),
    so a half-written or non-present GGTT entry is exactly the scratch pfn: not
    present and none of the guest's other bits (RW, cache bits)."""
    vm = make_vm()
    v = vgpu_of(vm)
    gma = v.ggtt.aperture.base + 0x7000
    addr = ggtt_gpa(vm, gma)
    index = gma >> 12
    cpu = vm.vcpus[0]
    bare = gtt.set_pfn(0, T.GGTT_PTE, v.gvt.scratch_mfn)
    val = DATA | gtt.PPAT_UNCACHED | gtt.GEN8_PAGE_RW | 1
    cpu.access(addr, "write", 4, (val & 0xFFFFFFFF).to_bytes(4, "little"))  # first half
    assert int(v.ggtt.host_ggtt[index]) == bare
    cpu.access(addr + 4, "write", 4, (val >> 32).to_bytes(4, "little"))  # other half
    assert int(v.ggtt.host_ggtt[index]) == gtt.set_pfn(val, T.GGTT_PTE, host_pfn(vm, DATA))
    cpu.access(addr, "write", 8, (val & ~1).to_bytes(8, "little"))  # not present
    assert int(v.ggtt.host_ggtt[index]) == bare
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert vm.check_invariants() == []


def test_gg1_gg2_ggtt_sizes_and_ballooned_ranges() -> None:
    vm = make_vm()
    v = vgpu_of(vm)
    outside = v.ggtt.aperture.base + v.ggtt.aperture.size  # not this vGPU's
    vm.vcpus[0].access(ggtt_gpa(vm, outside), "write", 8, (DATA | 1).to_bytes(8, "little"))
    assert int(v.ggtt.virtual_ggtt[outside >> 12]) == 0 and v.dma.maps == 0  # dropped (GG2)
    assert vm.vcpus[0].access(ggtt_gpa(vm, outside), "read", 8).data == bytes(8)
    inside = ggtt_gpa(vm, v.ggtt.aperture.base)
    vm.vcpus[0].access(inside, "write", 2, b"\x01\x00")
    assert any("only 4 or 8" in e for e in v.errors)  # GG1
    assert int(v.ggtt.virtual_ggtt[v.ggtt.aperture.base >> 12]) == 0


def test_gg5_reset_points_every_host_entry_at_scratch_present() -> None:
    vm = make_vm()
    v = vgpu_of(vm)
    gma = v.ggtt.hidden.base
    vm.vcpus[0].access(ggtt_gpa(vm, gma), "write", 8, (DATA | 1).to_bytes(8, "little"))
    v.ggtt.reset(invalidate_old=True)
    want = gtt.set_pfn(0, T.GGTT_PTE, v.gvt.scratch_mfn) | 1
    lo = v.ggtt.hidden.base >> 12
    assert (v.ggtt.host_ggtt[lo : lo + 16] == want).all()
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert v.dma_read(None, gma, 4) == bytes(4)


# ------------------------------------------------------------------- S1
def test_s1_scratch_tree_resolves_to_a_zero_page() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    sp = v.gtt.scratch_pt
    host = vm.host
    pte_scratch = host.read_u64(sp[T.PPGTT_PDE_PT] << PAGE_SHIFT)
    assert pte_scratch == (sp[T.PPGTT_PTE_PT] << PAGE_SHIFT) | 3 | gtt.PPAT_CACHED
    for t in (T.PPGTT_PDP_PT, T.PPGTT_PML4_PT):
        e = host.read_u64((sp[t] << PAGE_SHIFT) + 8 * 100)
        assert e == (sp[T(t - 1)] << PAGE_SHIFT) | 3
    # a deferred PML4 entry sends the whole subtree to scratch
    g.write_entry(g.pdps[0], 0, g.read_entry(g.pdps[0], 0), width="hi")
    assert v.dma_read(mm, 0x1000, 16) == bytes(16)
    assert vm.check_invariants() == []


# ----------------------------------------------------------------- L1-L8
def test_l1_find_or_create_by_pdps_and_destroy() -> None:
    vm = make_vm()
    g, mm, v = setup(vm)
    again = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert again is mm and mm.ref == 2
    v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY, g.pdps)
    assert mm.shadowed and mm.ref == 1
    v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY, g.pdps)
    assert not mm.shadowed and v.gtt.spts == {} and v.ptable.gfns == set()
    assert vm.page_track.count(g.pdps[0] >> PAGE_SHIFT) == 0
    with pytest.raises(KvmError) as ei:
        v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY, g.pdps)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="not a PPGTT op"):
        v.g2v_notify(9, g.pdps)


def test_l2_create_needs_attached_vgpu() -> None:
    vm = make_vm(attach=False)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    with pytest.raises(KvmError) as ei:
        vgpu_of(vm).g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert ei.value.errno == errno.EINVAL and "L2" in str(ei.value)


def test_l3_l4_reclaim_oldest_unpinned_mm_and_reshadow_on_submit() -> None:
    vm = make_vm(max_shadow_pages=6)
    _g1, mm1, v = setup(vm)  # 4 spts
    g2 = GuestPpgtt(vm, 4 << 20, 6 << 20)
    g2.map_4k(0x1000, DATA)
    mm2 = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g2.pdps)
    assert mm2 is not None and mm2.shadowed
    assert not mm1.shadowed and v.stats["mm_reclaimed"] == 1  # L4
    vm.write_guest(DATA, b"again")
    assert v.submit_workload(mm1, reads=[(0x1000, 5)]) == [b"again"]  # L3 step 1
    assert mm1.shadowed and not mm2.shadowed and mm1.pincount == 0
    assert vm.check_invariants() == []


def test_l7_close_order_leaves_kvm_counts_and_drops_dma() -> None:
    vm = make_vm()
    _g, _mm, v = setup(vm, maps=3)
    gfns = [s.gfn for s in v.gtt.spts.values() if s.gfn]
    pfn = host_pfn(vm, DATA)
    assert vm.host.pin_count(pfn) == 1
    v.close()
    assert v.ptable.gfns == set() and v.dma.by_gfn == {}
    assert vm.host.pin_count(pfn) == 0  # DMA cache destroyed: unpinned
    v.destroy()
    assert v.gtt.spts == {}
    # protect table destroyed without KVM calls: counts stay (spec §5 Q4)
    assert all(vm.page_track.count(x) == 1 for x in gfns)


def test_l8_gma_to_gpa_walks_shadow_then_reads_guest() -> None:
    vm = make_vm()
    _g, mm, v = setup(vm, maps=2)
    assert v.gtt.gma_to_gpa(mm, 0x2123) == DATA + 0x1123
    assert v.gtt.gma_to_gpa(mm, 0x9000) is None


def test_g1_one_attached_vgpu_per_vm() -> None:
    vm = make_vm(vgpus=2)
    kv = vm.plugin("kvmgt")
    with pytest.raises(KvmError) as ei:
        kv.vgpus[1].open()
    assert ei.value.errno == errno.EEXIST
    kv.vgpus[0].close()
    kv.vgpus[1].open()
    assert kv.vgpus[1].attached


def test_g5_failsafe_drops_write_protection_without_shadowing() -> None:
    vm = make_vm()
    g, _mm, v = setup(vm)
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_of(v, table)
    before = v.gtt.get_shadow(spt, idx)[0]
    v.failsafe = True
    g.map_4k(0x1000, DATA + 0x1000)
    assert v.gtt.get_shadow(spt, idx)[0] == before
    assert vm.page_track.count(table >> PAGE_SHIFT) == 0
    assert not v.track.find(table >> PAGE_SHIFT).tracked  # type: ignore[union-attr]


def test_l3_root_pointers_three_level_ppgtt() -> None:
    vm = make_vm()
    g = GuestPpgtt(vm, 1 << 20, 4 << 20, l3=True)
    g.map_4k((2 << 30) + 0x3000, DATA)
    v = vgpu_of(vm)
    mm = v.get_ppgtt_mm(g.pdps, l3=True)
    vm.write_guest(DATA, b"l3")
    assert v.dma_read(mm, (2 << 30) + 0x3000, 2) == b"l3"
    assert v.gtt.gma_to_gpa(mm, (2 << 30) + 0x3000) == DATA
    assert vm.check_invariants() == []


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as ei:
        kvmmu.VMConfig.model_validate({})  # sanity: the VM config itself is fine
        kvmmu.VM(
            {"vendor": "vmx", "plugins": {"enabled": ["kvmgt"], "kvmgt": {"gen": 7, "bogus": 1}}}
        )
    text = str(ei.value)
    assert "plugins.kvmgt.gen" in text and "plugins.kvmgt.bogus" in text


def test_bad_guest_input_is_refused_with_what_is_allowed() -> None:
    vm = make_vm()
    g, _mm, v = setup(vm)
    with pytest.raises(ValueError, match="4 KiB aligned"):
        g.map_4k(0x1001, DATA)
    with pytest.raises(ValueError, match="L3 PPGTT takes 4"):
        v.get_ppgtt_mm([1, 2], l3=True)
    with pytest.raises(ValueError, match="width must be one of"):
        g.write_entry(g.pdps[0], 0, 0, width="2")  # type: ignore[arg-type]
    with pytest.raises(KvmError, match="not one of this vGPU's"):
        v.submit_workload(PpgttMm(T.PPGTT_ROOT_L4_ENTRY, [0, 0, 0, 0]))


def test_report_section_counts() -> None:
    vm = make_vm()
    _g, _mm, _v = setup(vm)
    rep = vm.plugin("kvmgt").kvmmu_report_section(vm)
    assert rep["vgpus"][0]["spts"] == 4 and rep["vgpus"][0]["tracked_gfns"] == 4


def test_w6_w10_deferred_slot_split_as_64k_after_ips_switch_is_a_gvt_hazard() -> None:
    """A kernel hazard the model reproduces (gtt.c, not fixed upstream).

    A 4-byte write to slot 21 of a page table is deferred (W6); the guest then
    switches the PDE to 64K pages (IPS, W9) before the next submission. At the
    flush GVT re-reads slot 21 as a 64K entry and splits it over 16 shadow
    slots (W10) although 21 is not a multiple of 16: ``flush_post_shadow`` and
    ``split_64KB_gtt_entry`` check nothing (the GEM_BUG_ON is debug-only). The
    GPU then reaches gma 22 * 4K, which the guest's own walk leaves unmapped.
    """
    vm = make_vm(gen=11, has_2m_gtt=False)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    pd = g.table_of(0, 2)
    pt = g.alloc_table()
    g.write_entry(pd, 0, pt | DEFAULT_PTR)
    g.write_entry(pt, 0, DATA | DEFAULT_LEAF)
    v = vgpu_of(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    g.write_entry(pt, 21, DATA | DEFAULT_LEAF, width="lo")  # deferred (W6)
    g.write_entry(pd, 0, pt | DEFAULT_PTR | gtt.GEN8_PDE_IPS_64K)  # now a 64K table
    v.submit_workload(mm)  # the post-shadow flush re-reads slot 21 as 64K
    gma = 22 * 4096
    assert g.translate(gma) is None  # the guest: entry 16 (this 64K page) is empty
    assert v.translate(mm, gma) is not None  # the GPU: reaches a page through slot 22


def test_gg5_reset_after_full_and_half_writes_keeps_invariants() -> None:
    """A reset leaves every host entry scratch + present and the virtual GGTT
    untouched (intel_vgpu_reset_ggtt); entries rewritten afterwards, whole or
    by halves, are shadowed again (GG3, GG4)."""
    vm = make_vm()
    v = vgpu_of(vm)
    gma = v.ggtt.hidden.base
    w = vm.vcpus[0].access
    w(ggtt_gpa(vm, gma), "write", 8, (DATA | 1).to_bytes(8, "little"))
    w(ggtt_gpa(vm, gma + 0x1000), "write", 4, (DATA | 1).to_bytes(8, "little")[:4])
    assert vm.check_invariants() == []
    v.ggtt.reset(invalidate_old=True)
    assert vm.check_invariants() == []
    w(ggtt_gpa(vm, gma + 0x1000) + 4, "write", 4, (DATA | 1).to_bytes(8, "little")[4:])
    w(ggtt_gpa(vm, gma), "write", 8, (DATA | 1).to_bytes(8, "little"))
    assert vm.check_invariants() == []
    assert v.ggtt.host_translate(gma) is not None
