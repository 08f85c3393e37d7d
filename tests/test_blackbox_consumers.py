"""Black-box tests of the consumer plugins against spec/consumers.md.

Written from the spec (KVMGT W/L/GG/S rules, IOMMUFD and shared-TDP T rules,
virtio-gpu M rules and H hazards), through the plugins' public API, for cases
the per-plugin suites do not cover: L3 roots, partial writes in both orders,
same-value rewrites, shared page-table pages, 64K/2M leaves, GGTT range
boundaries, IOAS map/unmap edges, IOPF groups, memtype per vendor/era.
"""

from __future__ import annotations

import errno

import kvmmu
import pytest
from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SHIFT
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.device import VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, Vgpu
from kvmmu.plugins.kvmgt.ggtt import GGTT_START_OFFSET
from kvmmu.plugins.kvmgt.gtt import GttType as T
from kvmmu.plugins.kvmgt.guest import DEFAULT_LEAF, DEFAULT_PTR, GuestPpgtt
from kvmmu.plugins.kvmgt.ppgtt import PpgttMm, Spt
from test_kvmgt import host_pfn, make_vm, vgpu_of

HVA = 0x1000_0000
RAM = 64 << 20
DATA = 8 << 20


# =================================================================== KVMGT
# the KVMGT VM of tests/test_kvmgt.py (same HVA, RAM and DATA)
kvm_vm, vgpu, hpfn = make_vm, vgpu_of, host_pfn


def spt_at(v: Vgpu, gpa: int) -> Spt:
    s = v.gtt.find_spt_by_gfn(gpa >> PAGE_SHIFT)
    assert s is not None
    return s


def l4(vm: kvmmu.VM, *maps: tuple[int, int]) -> tuple[GuestPpgtt, PpgttMm, Vgpu]:
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    for gma, gpa in maps:
        g.map_4k(gma, gpa)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    return g, mm, v


def scratch4k(v: Vgpu) -> int:
    return v.gtt.scratch_pt[T.PPGTT_PTE_PT]


def pfn4k(se: int) -> int:
    return gtt.get_pfn(se, T.PPGTT_PTE_4K_ENTRY)


# ------------------------------------------------------------- L1/L2, L3 roots
def test_l1_l2_l3_root_four_pdps_each_shadowed_and_indexed_by_gma_31_30() -> None:
    vm = kvm_vm()
    g = GuestPpgtt(vm, 1 << 20, 4 << 20, l3=True)
    for q in range(4):
        g.map_4k((q << 30) + 0x5000, DATA + q * 0x1000)
        vm.write_guest(DATA + q * 0x1000, bytes([0xA0 + q]) * 4)
    v = vgpu(vm)
    mm = v.get_ppgtt_mm(g.pdps, l3=True)
    assert mm.l3 and mm.shadowed and all(mm.shadow_pdps)
    for q in range(4):
        assert v.dma_read(mm, (q << 30) + 0x5000, 4) == bytes([0xA0 + q]) * 4
        assert v.gtt.gma_to_gpa(mm, (q << 30) + 0x5123) == DATA + q * 0x1000 + 0x123
    # each root points at a PD spt: 4 PDs + 4 PTs, all tracked once
    assert len(v.gtt.spts) == 8
    assert all(vm.page_track.count(s.gfn) == 1 for s in v.gtt.spts.values() if s.gfn)
    # L1: an L3 mm matches all four pdps; changing pdps[3] makes another mm
    assert v.get_ppgtt_mm(list(g.pdps), l3=True) is mm and mm.ref == 2
    other = list(g.pdps)
    other[3] = g.pdps[2]
    mm2 = v.get_ppgtt_mm(other, l3=True)
    assert mm2 is not mm
    # pdps[2] of mm and pdps[2], pdps[3] of mm2 name one PD: one spt, refcount 3
    assert spt_at(v, g.pdps[2]).refcount == 3
    assert v.gtt.find_spt_by_gfn(g.pdps[3] >> PAGE_SHIFT) is not None  # still mm's
    assert vm.check_invariants() == []


def test_l2_l3_zero_root_is_not_present_nonzero_root_without_present_bit_is() -> None:
    """Root entries count as present when non-zero (gen8_gtt_test_present)."""
    vm = kvm_vm()
    g = GuestPpgtt(vm, 1 << 20, 4 << 20, l3=True)
    g.map_4k((1 << 30) + 0x2000, DATA)
    assert not g.pdps[1] & gtt.GEN8_PAGE_PRESENT  # a bare table address
    v = vgpu(vm)
    pdps = [g.pdps[0], g.pdps[1], 0, g.pdps[3]]
    mm = v.get_ppgtt_mm(pdps, l3=True)
    assert mm.shadow_pdps[2] == 0
    assert all(mm.shadow_pdps[i] for i in (0, 1, 3))
    vm.write_guest(DATA, b"root")
    assert v.dma_read(mm, (1 << 30) + 0x2000, 4) == b"root"
    with pytest.raises(Exception):  # noqa: B017 - GpuFault: no root for gma 2 GiB
        v.dma_read(mm, (2 << 30) + 0x2000, 4)
    assert vm.check_invariants() == []


def test_l1_l4_mm_matches_on_pdps0_only() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    same = v.get_ppgtt_mm([g.pdps[0], 0x1234000, 0, 7])
    assert same is mm and mm.ref == 2


# --------------------------------------------------------- W6 partial writes
def test_w6_hi_then_lo_defers_once_and_flush_applies_full_entry() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_at(v, table)
    new = (DATA + 0x3000) | DEFAULT_LEAF
    vm.write_guest(DATA + 0x3000, b"hi-lo")
    g.write_entry(table, idx, new, width="hi")
    se = v.gtt.get_shadow(spt, idx)[0]
    assert pfn4k(se) == scratch4k(v) and spt.post_shadow == {idx}
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0  # old mapping torn down at once
    maps = v.dma.maps
    g.write_entry(table, idx, new, width="lo")
    assert v.gtt.get_shadow(spt, idx)[0] == se and v.dma.maps == maps
    assert v.gtt.post_shadow_list == [spt]
    assert v.submit_workload(mm, reads=[(0x1000, 5)]) == [b"hi-lo"]
    assert spt.post_shadow == set()
    assert pfn4k(v.gtt.get_shadow(spt, idx)[0]) == hpfn(vm, DATA + 0x3000)
    assert vm.check_invariants() == []


@pytest.mark.parametrize("width", ["lo", "hi"])
def test_w6_partial_rewrite_of_same_value_still_goes_through_scratch(width: str) -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_at(v, table)
    old = g.read_entry(table, idx)
    before = v.gtt.get_shadow(spt, idx)[0]
    g.write_entry(table, idx, old, width=width)  # type: ignore[arg-type]
    se = v.gtt.get_shadow(spt, idx)[0]
    assert pfn4k(se) == scratch4k(v)
    assert se & ~gtt.ADDR_4K_MASK == before & ~gtt.ADDR_4K_MASK
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    vm.write_guest(DATA, b"same")
    assert v.dma_read(mm, 0x1000, 4) == bytes(4)  # scratch until the flush
    v.submit_workload(mm)
    assert v.gtt.get_shadow(spt, idx)[0] == before
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 1
    assert v.dma_read(mm, 0x1000, 4) == b"same"


def test_w5_w7_8byte_rewrite_of_same_value_keeps_mapping() -> None:
    vm = kvm_vm()
    g, _mm, v = l4(vm, (0x1000, DATA))
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_at(v, table)
    before = v.gtt.get_shadow(spt, idx)[0]
    g.write_entry(table, idx, g.read_entry(table, idx))
    assert v.gtt.get_shadow(spt, idx)[0] == before
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 1
    assert vm.host.pin_count(hpfn(vm, DATA)) == 1
    assert spt.post_shadow == set()
    assert vm.check_invariants() == []


def test_w5_w6_8byte_write_after_deferred_half_applies_now_bit_stays() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_at(v, table)
    g.write_entry(table, idx, (DATA + 0x2000) | DEFAULT_LEAF, width="lo")
    g.write_entry(table, idx, (DATA + 0x4000) | DEFAULT_LEAF)  # full write: immediate
    assert pfn4k(v.gtt.get_shadow(spt, idx)[0]) == hpfn(vm, DATA + 0x4000)
    assert idx in spt.post_shadow  # the kernel does not clear the bit on W5
    v.submit_workload(mm)
    assert pfn4k(v.gtt.get_shadow(spt, idx)[0]) == hpfn(vm, DATA + 0x4000)
    assert v.dma.kref((DATA + 0x4000) >> PAGE_SHIFT) == 1
    assert v.dma.kref((DATA + 0x2000) >> PAGE_SHIFT) == 0
    assert vm.check_invariants() == []


def test_w2_high_half_of_entry_5_defers_entry_5() -> None:
    vm = kvm_vm()
    g, _mm, v = l4(vm, (0x5000, DATA))
    table, idx = g.entry_addr(0x5000, 1)
    assert idx == 5
    spt = spt_at(v, table)
    vm.vcpus[0].access(table + 5 * 8 + 4, "write", 4, b"\0\0\0\0")
    assert spt.post_shadow == {5}


def test_w4_partial_write_to_non_stride_64k_slot_sets_no_bit() -> None:
    vm = kvm_vm(gen=11)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(0x0, DATA)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    pt = g.table_of(0, 1)
    spt = spt_at(v, pt)
    before = v.gtt.shadow_page(spt)
    g.write_entry(pt, 7, (DATA + 0x30000) | DEFAULT_LEAF, width="lo")
    assert spt.post_shadow == set() and v.gtt.post_shadow_list == []
    assert (v.gtt.shadow_page(spt) == before).all()


# ----------------------------------------------------------------- 64K leaves
def test_w6_w7_64k_cleared_by_halves_scratches_all_16_at_flush() -> None:
    vm = kvm_vm(gen=11)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(0x0, DATA)
    g.map_64k(32 * 4096, DATA + (64 << 10))
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    pt = g.table_of(0, 1)
    spt = spt_at(v, pt)
    base = (DATA + (64 << 10)) >> PAGE_SHIFT
    g.write_entry(pt, 32, 0, width="lo")
    assert pfn4k(v.gtt.get_shadow(spt, 32)[0]) == scratch4k(v)
    g.write_entry(pt, 32, 0, width="hi")
    v.submit_workload(mm)
    for k in range(16):
        se = v.gtt.get_shadow(spt, 32 + k)[0]
        assert pfn4k(se) == scratch4k(v), k
        assert not se & gtt.GTT_SPTE_FLAG_64K_SPLITED
    # the first 64K page is untouched
    assert pfn4k(v.gtt.get_shadow(spt, 0)[0]) == hpfn(vm, DATA)
    assert v.dma.kref(base) == 0
    assert vm.check_invariants() == []


def test_w7_w10_64k_rewritten_to_new_page_moves_all_16_slots() -> None:
    vm = kvm_vm(gen=11)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(16 * 4096, DATA)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    spt = spt_at(v, g.table_of(0, 1))
    g.map_64k(16 * 4096, DATA + (128 << 10))
    for k in range(16):
        se = v.gtt.get_shadow(spt, 16 + k)[0]
        assert se & gtt.GTT_SPTE_FLAG_64K_SPLITED
        assert pfn4k(se) == hpfn(vm, DATA + (128 << 10) + k * 4096)
        assert v.dma.kref((DATA >> PAGE_SHIFT) + k) == 0  # idealised (decision 3)
    vm.write_guest(DATA + (128 << 10) + 0x7000, b"moved64")
    assert v.dma_read(mm, 16 * 4096 + 0x7000, 7) == b"moved64"
    assert vm.check_invariants() == []


# ------------------------------------------------------------------ 2M leaves
def test_w10_2m_over_contiguous_but_unaligned_host_run_maps_the_right_pages() -> None:
    """W10 + §1.2: a 2M entry holds address bits 45:21 only. A contiguous pin
    that does not start on a 2 MiB boundary cannot be one 2M shadow entry (it
    used to be masked down and point the GPU at the wrong host pages)."""
    vm = kvm_vm(has_2m_gtt=True)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    vm.write_guest(RAM - 4096, b"\0")  # shift the host allocator by one page
    for k in range(512):  # fault in ascending order: contiguous host pages
        vm.write_guest(DATA + k * 4096, b"\0")
    assert hpfn(vm, DATA + 0x1FF000) == hpfn(vm, DATA) + 511
    assert hpfn(vm, DATA) % 512 != 0
    vm.write_guest(DATA + 0x1000, b"page1")
    g.map_2m(2 << 20, DATA)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    assert v.dma_read(mm, (2 << 20) + 0x1000, 5) == b"page1"
    assert vm.check_invariants() == []
    g.unmap(2 << 20, level=2)
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert vm.host.pin_count(hpfn(vm, DATA)) == 0
    assert vm.check_invariants() == []


def test_w7_direct_2m_cleared_keeps_present_clears_ps_points_at_pde_scratch() -> None:
    vm = kvm_vm(page_level=2, has_2m_gtt=True)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_2m(2 << 20, DATA)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    pd, idx = g.entry_addr(2 << 20, 2)
    spt = spt_at(v, pd)
    _old, t = v.gtt.get_shadow(spt, idx)
    assert t == T.PPGTT_PTE_2M_ENTRY
    g.write_entry(pd, idx, 0)
    se, t2 = v.gtt.get_shadow(spt, idx)
    assert not se & gtt.PAGE_PSE and t2 == T.PPGTT_PDE_ENTRY
    assert gtt.get_pfn(se, T.PPGTT_PDE_ENTRY) == v.gtt.scratch_pt[T.PPGTT_PDE_PT]
    assert se & gtt.GEN8_PAGE_PRESENT  # the old bits are kept, only the pfn moves
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert v.dma_read(mm, (2 << 20) + 0x1000, 4) == bytes(4)  # scratch tree: zeros
    assert vm.check_invariants() == []


def test_w10_1g_pdpe_refused_old_shadow_kept() -> None:
    vm = kvm_vm()
    g, _mm, v = l4(vm, (0x1000, DATA))
    pdp, _idx = g.entry_addr(0x1000, 3)
    spt = spt_at(v, pdp)
    before = v.gtt.get_shadow(spt, 1)[0]
    g.write_entry(pdp, 1, (1 << 30) | DEFAULT_LEAF | gtt.PAGE_PSE)
    assert v.gtt.get_shadow(spt, 1)[0] == before  # W11: no shadow of a 1G leaf
    assert any("1GB" in e or "1G" in e for e in v.errors)


# ------------------------------------------- page-table pages used twice (W9)
def test_w9_w8_pt_shared_by_two_pdes_freed_only_with_the_last() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    pd, idx = g.entry_addr(0x1000, 2)
    pde = g.read_entry(pd, idx)
    pt = pde & gtt.ADDR_4K_MASK
    g.write_entry(pd, idx + 3, pde)
    s = spt_at(v, pt)
    assert s.refcount == 2 and vm.page_track.count(pt >> PAGE_SHIFT) == 1
    vm.write_guest(DATA, b"twice")
    assert v.dma_read(mm, (3 << 21) + 0x1000, 5) == b"twice"
    g.write_entry(pd, idx, 0)
    assert spt_at(v, pt) is s and s.refcount == 1
    assert vm.page_track.count(pt >> PAGE_SHIFT) == 1 and pt >> PAGE_SHIFT in v.ptable.gfns
    g.write_entry(pd, idx + 3, 0, width="4+4")  # partial: removed at once (W6 -> W8)
    assert v.gtt.find_spt_by_gfn(pt >> PAGE_SHIFT) is None
    assert vm.page_track.count(pt >> PAGE_SHIFT) == 0
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    v.submit_workload(mm)
    assert vm.check_invariants() == []


def test_w9_pt_shared_by_two_ppgtts_survives_one_destroy_and_updates_both() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    pd, idx = g.entry_addr(0x1000, 2)
    pt = g.read_entry(pd, idx) & gtt.ADDR_4K_MASK
    g2 = GuestPpgtt(vm, 4 << 20, 6 << 20)
    g2.table_of(0x4000_0000, 2)  # builds PML4 -> PDP -> PD for 1 GiB
    pd2, idx2 = g2.entry_addr(0x4000_0000, 2)
    g2.write_entry(pd2, idx2, pt | DEFAULT_PTR)  # untracked yet: plain store
    mm2 = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g2.pdps)
    assert mm2 is not None and mm2 is not mm
    s = spt_at(v, pt)
    assert s.refcount == 2 and vm.page_track.count(pt >> PAGE_SHIFT) == 1
    g.map_4k(0x2000, DATA + 0x1000)  # a write to the shared PT
    vm.write_guest(DATA + 0x1000, b"shared")
    assert v.dma_read(mm2, 0x4000_2000, 6) == b"shared"
    v.put_ppgtt_mm(g.pdps)
    assert spt_at(v, pt) is s and s.refcount == 1
    assert vm.page_track.count(pt >> PAGE_SHIFT) == 1
    g.map_4k(0x3000, DATA + 0x2000)  # still tracked: reaches the survivor
    vm.write_guest(DATA + 0x2000, b"after")
    assert v.dma_read(mm2, 0x4000_3000, 5) == b"after"
    assert vm.check_invariants() == []


# ------------------------------------------------------------------ GGTT
def ggtt_addr(vm: kvmmu.VM, gma: int) -> int:
    return int(vm.plugin("kvmgt").cfg.bar0_gpa) + GGTT_START_OFFSET + (gma >> 12) * 8


def ggw(vm: kvmmu.VM, gma: int, val: int, n: int = 8, off: int = 0) -> None:
    raw = val.to_bytes(8, "little")[off : off + n]
    r = vm.vcpus[0].access(ggtt_addr(vm, gma) + off, "write", n, raw)
    assert r.fault is None


def ggr(vm: kvmmu.VM, gma: int, n: int = 8, off: int = 0) -> bytes:
    data: bytes = vm.vcpus[0].access(ggtt_addr(vm, gma) + off, "read", n).data
    return data


def test_gg2_range_boundaries_first_last_inside_neighbours_dropped() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    ap, hid = v.ggtt.aperture, v.ggtt.hidden
    inside = [ap.base, ap.base + ap.size - 4096, hid.base, hid.base + hid.size - 4096]
    outside = [ap.base - 4096, ap.base + ap.size, hid.base - 4096, hid.base + hid.size]
    for k, gma in enumerate(inside):
        ggw(vm, gma, (DATA + k * 4096) | 1)
        assert ggr(vm, gma) == ((DATA + k * 4096) | 1).to_bytes(8, "little")
        assert v.ggtt.host_translate(gma) == hpfn(vm, DATA + k * 4096) << 12
    for gma in outside:
        ggw(vm, gma, DATA | 1)
        assert ggr(vm, gma) == bytes(8)
        assert int(v.ggtt.virtual_ggtt[gma >> 12]) == 0
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 1
    assert vm.check_invariants() == []


def test_gg3_high_half_first_then_low_merges() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    gma = v.ggtt.hidden.base + 0x3000
    idx = gma >> 12
    val = (DATA + 0x5000) | (0x5 << 48) | 1
    ggw(vm, gma, val, 4, 4)
    assert int(v.ggtt.virtual_ggtt[idx]) == val & ~0xFFFFFFFF
    assert not int(v.ggtt.host_ggtt[idx]) & 1
    assert v.dma.maps == 0
    # the same (high) half again: saved data and virtual entry only
    val2 = (DATA + 0x5000) | (0x7 << 48) | 1
    ggw(vm, gma, val2, 4, 4)
    assert int(v.ggtt.virtual_ggtt[idx]) == val2 & ~0xFFFFFFFF and v.dma.maps == 0
    ggw(vm, gma, val2, 4, 0)
    assert int(v.ggtt.virtual_ggtt[idx]) == val2
    host = int(v.ggtt.host_ggtt[idx])
    assert host & 1 and gtt.get_pfn(host, T.GGTT_PTE) == hpfn(vm, DATA + 0x5000)
    assert ggr(vm, gma, 4, 4) == (val2 >> 32).to_bytes(4, "little")
    assert vm.check_invariants() == []


def test_gg3_half_writes_of_two_entries_do_not_mix() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    a = v.ggtt.aperture.base + 0x1000
    b = a + 0x1000
    va, vb = (DATA + 0x1000) | 1, (DATA + 0x2000) | 1
    ggw(vm, a, va, 4, 0)
    ggw(vm, b, vb, 4, 0)
    ggw(vm, b, vb, 4, 4)
    ggw(vm, a, va, 4, 4)
    assert v.ggtt.host_translate(a) == hpfn(vm, DATA + 0x1000) << 12
    assert v.ggtt.host_translate(b) == hpfn(vm, DATA + 0x2000) << 12
    assert vm.check_invariants() == []


def test_gg4_same_value_rewrite_keeps_one_kref_and_new_value_moves_it() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    gma = v.ggtt.aperture.base
    ggw(vm, gma, DATA | 1)
    ggw(vm, gma, DATA | 1)
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 1
    ggw(vm, gma, (DATA + 0x1000) | 1)
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
    assert v.dma.kref((DATA + 0x1000) >> PAGE_SHIFT) == 1
    assert vm.host.pin_count(hpfn(vm, DATA)) == 0
    assert vm.check_invariants() == []


def test_gg4_unmappable_gfn_is_scratch_but_present() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    gma = v.ggtt.aperture.base + 0x9000
    ggw(vm, gma, (RAM + (16 << 20)) | 1)  # outside every memslot
    host = int(v.ggtt.host_ggtt[gma >> 12])
    assert host & 1 and gtt.get_pfn(host, T.GGTT_PTE) == v.gvt.scratch_mfn
    assert v.dma_read(None, gma, 4) == bytes(4)


# =================================================================== IOMMUFD / T
from kvmmu.plugins.iommu import DmaFault, IopfFault, PageResponse  # noqa: E402
from kvmmu.plugins.iommu.compare import GUEST_HVA, make_vm  # noqa: E402
from kvmmu.plugins.iommu.iommufd import (  # noqa: E402
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    U64_MAX,
)

RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
FIX = IOMMU_IOAS_MAP_FIXED_IOVA
IO_PAGES = 64


def _errno(fn: object, *a: object) -> int:
    with pytest.raises(KvmError) as e:
        fn(*a)  # type: ignore[operator]
    return e.value.errno


def test_ioas_map_fixed_adjacent_ok_any_overlap_eexist_iova0_allowed() -> None:
    vm = make_vm("pinned", IO_PAGES)
    fd = vm.plugin("iommu").iommufd
    ioas = fd.ioas_alloc()
    assert fd.ioas_map(ioas, GUEST_HVA, 0x2000, RW | FIX, 0x10000) == 0x10000
    assert fd.ioas_map(ioas, GUEST_HVA, 0x1000, RW | FIX, 0x12000) == 0x12000  # adjacent
    assert fd.ioas_map(ioas, GUEST_HVA, 0x1000, RW | FIX, 0xF000) == 0xF000  # adjacent below
    for iova, length in ((0xE000, 0x2000), (0x11000, 0x1000), (0x12000, 0x3000), (0, 0x20000)):
        assert _errno(fd.ioas_map, ioas, GUEST_HVA, length, RW | FIX, iova) == errno.EEXIST
    # FIXED_IOVA at 0 is the caller's choice; only the kernel's pick avoids 0
    assert fd.ioas_map(ioas, GUEST_HVA, 0x1000, RW | FIX, 0) == 0
    assert len(fd.ioas(ioas).areas) == 4


def test_ioas_map_misaligned_fixed_iova_einval_and_unaligned_length() -> None:
    vm = make_vm("pinned", IO_PAGES)
    fd = vm.plugin("iommu").iommufd
    ioas = fd.ioas_alloc()
    assert _errno(fd.ioas_map, ioas, GUEST_HVA, 0x1000, RW | FIX, 0x10800) == errno.EINVAL
    assert _errno(fd.ioas_map, ioas, GUEST_HVA, 0x1800, RW | FIX, 0x10000) == errno.EINVAL
    assert fd.ioas(ioas).areas == []


def test_ioas_unmap_superset_spanning_holes_returns_bytes_of_whole_maps() -> None:
    vm = make_vm("pinned", IO_PAGES)
    fd = vm.plugin("iommu").iommufd
    ioas = fd.ioas_alloc()
    fd.ioas_map(ioas, GUEST_HVA, 0x2000, RW | FIX, 0x10000)
    fd.ioas_map(ioas, GUEST_HVA, 0x3000, RW | FIX, 0x20000)
    fd.ioas_map(ioas, GUEST_HVA, 0x1000, RW | FIX, 0x40000)
    assert fd.ioas_unmap(ioas, 0x8000, 0x20000) == 0x5000  # two maps and the hole
    assert [a.iova for a in fd.ioas(ioas).areas] == [0x40000]
    # cutting the head or the tail of a map: ENOENT, nothing happens
    fd.ioas_map(ioas, GUEST_HVA, 0x4000, RW | FIX, 0x50000)
    assert _errno(fd.ioas_unmap, ioas, 0x51000, 0x10000) == errno.ENOENT
    assert _errno(fd.ioas_unmap, ioas, 0x50000, 0x3000) == errno.ENOENT  # tail cut
    assert [a.iova for a in fd.ioas(ioas).areas] == [0x40000, 0x50000]
    assert _errno(fd.ioas_unmap, ioas, U64_MAX - 0xFFF, 0x2000) == errno.EOVERFLOW
    assert fd.ioas_unmap(ioas, 0, U64_MAX) == 0x5000  # unmap-all returns the bytes


def test_ioas_unmap_one_map_keeps_other_iotlb_entries_and_faults_dma() -> None:
    vm = make_vm("pinned", IO_PAGES)
    p = vm.plugin("iommu")
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    fd.ioas_map(ioas, GUEST_HVA + 0x3000, 0x2000, RW | FIX, 0x100000)
    fd.ioas_map(ioas, GUEST_HVA + 0x5000, 0x2000, RW | FIX, 0x200000)
    dev = p.add_device("nic", iopf=False)
    fd.detach(dev.bound.id)
    fd.attach(dev.bound.id, ioas)
    vm.write_guest(0x3000, b"one")
    vm.write_guest(0x5000, b"two")
    assert dev.dma_read(0x100000, 3) == b"one"
    assert dev.dma_read(0x200000, 3) == b"two"
    fd.ioas_unmap(ioas, 0x100000, 0x2000)
    cached = {v for _d, v, _e in p.iommu.iotlb.entries()}
    assert 0x100 not in cached and 0x200 in cached
    with pytest.raises(DmaFault):
        dev.dma_read(0x100000, 3)
    assert dev.dma_read(0x200000, 3) == b"two"
    assert vm.check_invariants() == []


def test_ioas_map_readonly_area_refuses_dma_write() -> None:
    vm = make_vm("pinned", IO_PAGES)
    p = vm.plugin("iommu")
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    fd.ioas_map(ioas, GUEST_HVA, 0x1000, IOMMU_IOAS_MAP_READABLE | FIX, 0x300000)
    dev = p.add_device("nic", iopf=False)
    fd.detach(dev.bound.id)
    fd.attach(dev.bound.id, ioas)
    vm.write_guest(0, b"ro")
    assert dev.dma_read(0x300000, 2) == b"ro"
    with pytest.raises(DmaFault):
        dev.dma_write(0x300000, b"xx")
    assert vm.read_guest(0, 2) == b"ro"


def test_t3_group_all_succeed_maps_every_page_one_success_response() -> None:
    vm = make_vm("shared", IO_PAGES)
    p = vm.plugin("iommu")
    dev = p.add_device("dsa", iopf=True)
    hwpt = dev.bound.hwpt
    out = hwpt.handle_iopf([IopfFault(g << 12, read=True) for g in (3, 4, 5)])
    assert out.response is PageResponse.SUCCESS and out.skipped == 0
    assert all(vm.mmu.translate(g << 12) is not None for g in (3, 4, 5))
    assert hwpt.responses == {"SUCCESS": 1}


def test_t3_first_fault_fails_whole_group_dropped() -> None:
    vm = make_vm("shared", IO_PAGES)
    p = vm.plugin("iommu")
    dev = p.add_device("dsa", iopf=True)
    hwpt = dev.bound.hwpt
    out = hwpt.handle_iopf([IopfFault(IO_PAGES << 12, read=True), IopfFault(6 << 12, read=True)])
    assert out.response is PageResponse.FAILURE and out.skipped == 1
    assert vm.mmu.translate(6 << 12) is None


def test_t3_t8_iopf_read_of_write_tracked_gfn_succeeds_read_only() -> None:
    vm = make_vm("shared", IO_PAGES)
    p = vm.plugin("iommu")
    dev = p.add_device("dsa", iopf=True)
    vm.write_guest(7 << 12, b"tracked")
    vm.write_track_add_gfn(7)
    out = dev.bound.hwpt.handle_iopf([IopfFault(7 << 12, read=True)])
    assert out.response is PageResponse.SUCCESS
    hit = vm.mmu.translate(7 << 12)
    assert hit is not None and not vm.mmu.access_allowed(hit[0], True, False, False)
    assert dev.dma_read(7 << 12, 7) == b"tracked"


def test_t5_zap_of_one_gfn_invalidates_only_that_iotlb_page() -> None:
    vm = make_vm("shared", IO_PAGES)
    p = vm.plugin("iommu")
    dev = p.add_device("dsa", iopf=True)
    for g in (20, 21, 22):
        dev.dma_read(g << 12, 1)
    vm.zap_gfn_range(21, 22)
    cached = {v for _d, v, _e in p.iommu.iotlb.entries()}
    assert {20, 22} <= cached and 21 not in cached
    vm.write_guest(21 << 12, b"z")
    assert dev.dma_read(21 << 12, 1) == b"z"  # refaults through IOPF
    assert vm.check_invariants() == []


def test_t1_t7_m7_create_refused_only_while_noncoherent_count_nonzero() -> None:
    vm = make_vm("shared", IO_PAGES)
    p = vm.plugin("iommu")
    vm.register_noncoherent_dma()
    vm.register_noncoherent_dma()
    vm.unregister_noncoherent_dma()
    assert _errno(p.create_tdp_fd) == errno.EINVAL  # count is still 1
    vm.unregister_noncoherent_dma()
    assert p.create_tdp_fd() is not None


# =================================================================== virtio-gpu / M, H
from kvmmu.memtype import MemType  # noqa: E402
from kvmmu.plugins.virtio_gpu import GUEST_TYPES, build_scenario, hazard_table  # noqa: E402
from kvmmu.plugins.virtio_gpu.table import _PROBE_GVA  # noqa: E402

VWC, VUCM, VUC, VWT, VWP, VWB = GUEST_TYPES


def _eff(plugin: object, vm: kvmmu.VM) -> dict[MemType, MemType]:
    checks = plugin.check_coherency(vm.vcpus[0], ram_probe_gva=_PROBE_GVA)  # type: ignore[attr-defined]
    return {c.guest_pat: c.effective for c in checks}


def _honoured() -> dict[MemType, MemType]:
    return {t: (MemType.UC if t is VUCM else t) for t in GUEST_TYPES}


@pytest.mark.parametrize(
    ("era", "design", "quirks"),
    [
        ("6.8", "today", None),
        ("6.11", "today", None),
        ("6.16", "today", {"ignore_guest_pat": False}),
        ("6.16", "virtio_noncoherent", None),
        ("6.16", "kvm_mem_dma", None),
    ],
)
def test_m1_host_mmio_uc_in_every_era_and_design_only_wc_survives(
    era: str, design: str, quirks: dict[str, bool] | None
) -> None:
    vm, plugin, _ = build_scenario("vmx", era, design, backing="vram", quirks=quirks)
    got = _eff(plugin, vm)
    assert got == {t: (MemType.WC if t is VWC else MemType.UC) for t in GUEST_TYPES}


def test_m3_h6_noncoherent_dma_honours_guest_pat_on_ordinary_ram() -> None:
    vm, _plugin, _ = build_scenario("vmx", "6.16", "virtio_noncoherent", guest_types=[VWC])
    r = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert r.memtype is MemType.UC and not r.spte & 0x40  # IPAT clear, guest UC


def test_m4_no_zap_when_quirk_disabled_and_none_on_second_registration() -> None:
    # quirk disabled: guest PAT is already honoured, so 0->1 changes nothing
    vm, _p, _ = build_scenario(
        "vmx", "6.16", "today", guest_types=[VWC], quirks={"ignore_guest_pat": False}
    )
    vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    vm.register_noncoherent_dma()
    r = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert r.exits == 0 and r.memtype is MemType.UC
    # quirk on: 0->1 zaps, 1->2 and 2->1 do not, 1->0 zaps
    vm, _p, _ = build_scenario("vmx", "6.16", "today", guest_types=[VWC])
    assert vm.vcpus[0].access(_PROBE_GVA, "read", 8).memtype is MemType.WB
    vm.register_noncoherent_dma()
    r = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert r.exits >= 1 and r.memtype is MemType.UC
    vm.register_noncoherent_dma()
    assert vm.vcpus[0].access(_PROBE_GVA, "read", 8).exits == 0
    vm.unregister_noncoherent_dma()
    assert vm.vcpus[0].access(_PROBE_GVA, "read", 8).exits == 0
    vm.unregister_noncoherent_dma()
    r = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert r.exits >= 1 and r.memtype is MemType.WB


def test_m6_wbinvd_follows_the_registration_count() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "today", guest_types=[VWC])
    assert plugin.guest_wbinvd(vm.vcpus[0]) is False
    vm.register_noncoherent_dma()
    assert plugin.guest_wbinvd(vm.vcpus[0]) is True
    vm.unregister_noncoherent_dma()
    assert plugin.guest_wbinvd(vm.vcpus[0]) is False


def test_h1_h5_per_vendor_and_era_for_the_guest_wc_page() -> None:
    rows = hazard_table(["vmx", "svm"], designs=["today"], eras=["6.8", "6.16"], guest_types=[VWC])
    by = {(r["vendor"], r["era"]): r for r in rows}
    # VMX with the quirk / pre-6.11: WB|IPAT over a host WC buffer -> H1 aliasing
    for era in ("6.8", "6.16"):
        r = by[("vmx", era)]
        assert r["effective"] == "WB" and "H1" in r["hazards"] and "H5" not in r["hazards"]
    # SVM honours guest PAT: WC matches the host WC mapping (no H1); H5 is Intel-only
    for era in ("6.8", "6.16"):
        r = by[("svm", era)]
        assert r["effective"] == "WC" and "H1" not in r["hazards"] and "H5" not in r["hazards"]


def test_h5_h1_quirk_disabled_vmx_guest_wc_on_ram() -> None:
    rows = hazard_table(
        ["vmx"],
        designs=["today"],
        eras=["6.16"],
        guest_types=[VWC, VWB],
        quirks={"ignore_guest_pat": False},
    )
    wc = next(r for r in rows if r["guest_pat"] == "WC")
    wb = next(r for r in rows if r["guest_pat"] == "WB")
    assert wc["effective"] == "WC" and "H5" in wc["hazards"] and "H1" not in wc["hazards"]
    assert wb["effective"] == "WB" and "H1" in wb["hazards"]  # WB alias of the host WC buffer


def test_h2_vram_guest_wb_is_uc_with_guard_and_no_h2() -> None:
    rows = hazard_table(
        ["vmx"], designs=["kvm_mem_dma"], eras=["6.16"], guest_types=[VWB], backing="vram"
    )
    (r,) = rows
    assert r["effective"] == "UC" and "H2" not in r["hazards"]


# ------------------------------------------------ more KVMGT: IPS gating, G/K errors
@pytest.mark.parametrize(
    ("gen", "gamw", "ips"),
    [(8, True, False), (9, False, False), (9, True, True), (10, False, False), (12, False, True)],
)
def test_w9_ips_honoured_only_when_vgpu_ips_enabled(gen: int, gamw: bool, ips: bool) -> None:
    """§1.2 'IPS enabled?': gen9/10 only with the GAMW vreg bit, gen11+ always, gen8 never."""
    vm = kvm_vm(gen=gen, gamw_eco_64k_ips=gamw)
    g = GuestPpgtt(vm, 1 << 20, 4 << 20)
    g.map_64k(0, DATA)  # slot 0, PDE with IPS
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    spt = spt_at(v, g.table_of(0, 1))
    assert spt.pde_ips is ips
    se1 = v.gtt.get_shadow(spt, 1)[0]
    if ips:  # split: slot 1 maps the second 4K page of the 64K page
        assert pfn4k(se1) == hpfn(vm, DATA + 0x1000) and se1 & gtt.GTT_SPTE_FLAG_64K_SPLITED
    else:  # a plain 4K PTE table: slot 1 is empty
        assert not se1 & gtt.GEN8_PAGE_PRESENT
        assert pfn4k(v.gtt.get_shadow(spt, 0)[0]) == hpfn(vm, DATA)
    pd, idx = g.entry_addr(0, 2)
    assert not v.gtt.get_shadow(spt_at(v, pd), idx)[0] & gtt.GEN8_PDE_IPS_64K  # W9


def test_w1_one_byte_write_is_refused_and_logged() -> None:
    vm = kvm_vm()
    g, _mm, v = l4(vm, (0x1000, DATA))
    table, idx = g.entry_addr(0x1000, 1)
    spt = spt_at(v, table)
    before = v.gtt.get_shadow(spt, idx)[0]
    r = vm.vcpus[0].access(table + idx * 8 + 1, "write", 1, b"\x55")
    assert r.emulated and r.fault is None  # the error never reaches KVM (G5)
    assert v.gtt.get_shadow(spt, idx)[0] == before
    assert spt.post_shadow == set() and v.errors


def test_g3_enable_page_track_needs_attached_vgpu_esrch_and_record_enxio() -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    gfn = (DATA >> PAGE_SHIFT) + 7
    with pytest.raises(KvmError) as e:
        v.track.enable(gfn)
    assert e.value.errno == errno.ENXIO
    v.track.register(gfn, lambda *a: None, None)
    with pytest.raises(KvmError) as e:
        v.track.register(gfn, lambda *a: None, None)
    assert e.value.errno == errno.EEXIST  # G2
    assert vm.page_track.count(gfn) == 0  # G2: registering does not write-protect
    v.close()
    with pytest.raises(KvmError) as e:
        v.track.enable(gfn)
    assert e.value.errno == errno.ESRCH and vm.page_track.count(gfn) == 0
    assert not v.track.find(gfn).tracked  # type: ignore[union-attr]


def test_w9_k1_pde_to_table_outside_every_memslot_fails_no_spt_left() -> None:
    vm = kvm_vm()
    g, mm, v = l4(vm, (0x1000, DATA))
    pd, idx = g.entry_addr(0x1000, 2)
    pdspt = spt_at(v, pd)
    before = v.gtt.get_shadow(pdspt, idx + 1)[0]
    nspts = len(v.gtt.spts)
    outside = RAM + (4 << 20)
    g.write_entry(pd, idx + 1, outside | DEFAULT_PTR)
    assert v.errors  # W11: logged, not raised into KVM
    assert v.gtt.find_spt_by_gfn(outside >> PAGE_SHIFT) is None
    assert len(v.gtt.spts) == nspts
    assert v.gtt.get_shadow(pdspt, idx + 1)[0] == before
    vm.write_guest(DATA, b"ok")
    assert v.dma_read(mm, 0x1000, 2) == b"ok"  # the rest of the tree is intact


# ------------------------------------------------------ GG3/GG4 state machine (property)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_GG_OPS = st.lists(
    st.tuples(
        st.integers(0, 2),  # entry
        st.sampled_from(["8", "lo", "hi"]),
        st.integers(0, 3),  # target page (3: not present)
        st.integers(0, 1),  # high-half flag bits (bit 52)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_GG_OPS)
def test_gg3_gg4_partial_write_state_machine_matches_the_spec(
    ops: list[tuple[int, str, int, int]],
) -> None:
    vm = kvm_vm()
    v = vgpu(vm)
    base = v.ggtt.aperture.base + 0x20000
    partial: dict[int, tuple[int, int]] = {}  # entry -> (offset in entry, saved u64)
    virt = {i: 0 for i in range(3)}
    # GG5: a fresh vGPU's host entries are scratch + present
    host_present: dict[int, int | None] = {i: v.gvt.scratch_mfn for i in range(3)}
    for i, width, page, hi in ops:
        val = ((DATA + page * 0x1000) | 1 if page < 3 else 0) | (hi << 52)
        gma = base + i * 0x1000
        if width == "8":
            ggw(vm, gma, val)
            full = val
        else:
            off = 0 if width == "lo" else 4
            ggw(vm, gma, val, 4, off)
            half = val & (0xFFFFFFFF << (off * 8))
            rec = partial.get(i)
            if rec is None:
                partial[i] = (off, half)
                virt[i], host_present[i] = half, None
                continue
            if rec[0] == off:
                partial[i] = (off, half)
                virt[i] = half
                continue
            full = half | rec[1]
            del partial[i]
        virt[i] = full
        present = full & 1
        gpa = full & gtt.ADDR_4K_MASK
        host_present[i] = hpfn(vm, gpa) if present and gpa < RAM else None
    for i in range(3):
        gma = base + i * 0x1000
        assert int(v.ggtt.virtual_ggtt[gma >> 12]) == virt[i]
        assert ggr(vm, gma) == virt[i].to_bytes(8, "little")
        h = v.ggtt.host_translate(gma)
        want = host_present[i]
        assert (h >> 12 if h is not None else None) == want
    assert vm.check_invariants() == []


def test_l6_l5_destroy_after_memslot_delete_makes_no_kvm_call() -> None:
    vm = kvm_vm()
    vm.host.mmap_anon(0x2000_0000, 4 << 20)
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)
    g = GuestPpgtt(vm, 64 << 20, 68 << 20)
    g.map_4k(0x1000, DATA)
    v = vgpu(vm)
    mm = v.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
    assert mm is not None
    gfns = {s.gfn for s in v.gtt.spts.values() if s.gfn}
    vm.set_user_memory_region(1, 0, 64 << 20, 0, 0x2000_0000)  # DELETE (K9)
    vm.set_user_memory_region(1, 0, 64 << 20, 4 << 20, 0x2000_0000)  # re-created
    removes = v.ptable.kvm_removes
    v.put_ppgtt_mm(g.pdps)  # last ref: invalidate (L5) -> unregister page tracks
    assert v.ptable.kvm_removes == removes  # not in the protect table: KVM skipped (L6)
    assert v.gtt.spts == {} and all(v.track.find(x) is None for x in gfns)
    assert all(vm.page_track.count(x) == 0 for x in gfns)
    assert v.dma.kref(DATA >> PAGE_SHIFT) == 0
