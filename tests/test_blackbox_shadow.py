"""Black-box tests of the shadow MMU (``tdp = false``) against spec/kvm-mmu.md.

Written from the spec (§2.3–2.4, §3.7–3.9, §3.12–3.15) and, where the spec
is silent or unverified, from the kernel (``arch/x86/kvm/mmu/mmu.c``,
``paging_tmpl.h``). Expected results are computed here from the
architectural rules, never from ``kvmmu.paging.walk``.
"""

from __future__ import annotations

import random

import kvmmu
import pytest
from kvmmu import paging as P
from kvmmu.spte import PT_WRITABLE_MASK
from test_shadow import TABLE_WINDOW, URW, GuestTables, guest_write_entry, make_vm
from test_shadow_pae import LegacyTables

CR0 = P.CR0_PG | 1 | P.CR0_WP
A = P.PTE_A
D = P.PTE_D
LONG_EFER = P.EFER_LME | P.EFER_NXE


def sps_of(vm: kvmmu.VM, gfn: int, level: int | None = None) -> list[object]:
    return [
        sp
        for sp in vm.mmu.active.values()
        if sp.gfn == gfn
        and not sp.role.direct
        and not sp.invalid
        and (level is None or sp.role.level == level)
    ]


def long_env(n: int = 16) -> tuple[kvmmu.VM, GuestTables]:
    vm = make_vm()
    gt = GuestTables(vm)
    for i in range(n):
        gt.map(0x400000 + i * 0x1000, 0x200000 + i * 0x1000, URW | A)
    gt.map_tables()
    gt.start()
    return vm, gt


# --------------------------------------------------------------- §3.12 / §3.15
def test_unsync_leaf_write_not_present_then_invlpg_injects_not_present_fault() -> None:
    """§3.12 unsync + §3.15 INVLPG: a 4K table goes unsync on the guest's
    write; the guest then clears the gPTE through its writable mapping (no
    exit); INVLPG syncs the entry (invalid gPTE -> SPTE dropped), so the next
    access is a guest #PF with a not-present error code."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    assert v.access(0x401000, "read").gpa == 0x201000
    pte = gt.entry(0x401000, 1)
    w = guest_write_entry(v, pte, 0x201000 | URW | A)
    assert not w.emulated
    (sp,) = sps_of(vm, pte >> 12, 1)
    assert sp.unsync  # type: ignore[attr-defined]
    w2 = guest_write_entry(v, pte, 0)
    assert w2.exits == 0 and not w2.emulated  # the table is writable now
    vm.mmu.invlpg(v, 0x401000)
    r = v.access(0x401000, "write", 1, b"x")
    assert r.fault is not None and r.fault.vector == 14
    assert r.fault.error_code == P.PFERR_WRITE
    assert vm.check_invariants() == []


def test_unsync_leaf_made_read_only_then_invlpg_write_faults() -> None:
    """§3.15 ``sync_spte``: the access is recomputed from the new gPTE; a gPTE
    made read-only (after INVLPG) gives the guest a P|W protection fault."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    assert v.access(0x402000, "write", 1, b"a").fault is None
    pte = gt.entry(0x402000, 1)
    guest_write_entry(v, pte, 0x202000 | P.PTE_P | P.PTE_US | A | D)
    vm.mmu.invlpg(v, 0x402000)
    r = v.access(0x402000, "write", 1, b"b")
    assert r.fault is not None
    assert r.fault.error_code == P.PFERR_PRESENT | P.PFERR_WRITE
    assert vm.read_guest(0x202000, 1) == b"a"
    assert v.access(0x402000, "read").fault is None
    assert vm.check_invariants() == []


def test_unsync_leaf_synced_by_invlpg_of_the_faulting_gva_only_for_that_entry() -> None:
    """INVLPG syncs only the leaf SPTE of that address: another stale entry
    of the same unsync table keeps its old translation (the TLB would too)."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    for gva in (0x400000, 0x401000):
        v.access(gva, "read")
    p0, p1 = gt.entry(0x400000, 1), gt.entry(0x401000, 1)
    guest_write_entry(v, p0, 0x20A000 | URW | A)
    guest_write_entry(v, p1, 0x20B000 | URW | A)
    vm.mmu.invlpg(v, 0x400000)
    assert v.access(0x400000, "read").gpa == 0x20A000
    vm.mmu.invlpg(v, 0x401000)
    assert v.access(0x401000, "read").gpa == 0x20B000
    assert vm.check_invariants() == []


def test_unsync_table_found_again_through_a_second_path_is_synced() -> None:
    """kvm_mmu_find_shadow_page (mmu.c): an unsync 4K sp found through another
    parent is synced (``kvm_sync_page``) before it is linked, so a gva whose
    translation the guest never cached sees the new gPTE; it stays unsync
    (only mmu_sync_children write-protects it again)."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    assert v.access(0x405000, "read").gpa == 0x205000
    pt = gt.entry(0x400000, 1) & ~0xFFF
    # A second PDE (gva 0x800000..) points at the same guest PT.
    gt.write(gt.entry(0x800000, 2), pt | URW | A)
    pte5 = pt + 5 * 8
    guest_write_entry(v, pte5, 0x20C000 | URW | A)
    (sp,) = sps_of(vm, pt >> 12, 1)
    assert sp.unsync  # type: ignore[attr-defined]
    r = v.access(0x805000, "read")
    assert r.fault is None and r.gpa == 0x20C000
    assert sps_of(vm, pt >> 12, 1) == [sp]  # the same sp, two parents
    assert sp.unsync  # type: ignore[attr-defined]
    assert vm.check_invariants() == []


def test_same_guest_table_two_paths_different_access_two_sps() -> None:
    """Role.access is part of the sp's role: a PT reached through a writable
    and a read-only PDE is shadowed twice; the read-only path gives a guest
    P|W fault on write, the other one maps it writable."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    pt = gt.entry(0x400000, 1) & ~0xFFF
    gt.write(gt.entry(0x800000, 2), pt | P.PTE_P | P.PTE_US | A)
    v.access(0x403000, "read")
    v.access(0x803000, "read")
    assert len(sps_of(vm, pt >> 12, 1)) == 2
    r = v.access(0x803000, "write", 1, b"q")
    assert r.fault is not None and r.fault.error_code == P.PFERR_PRESENT | P.PFERR_WRITE
    assert v.access(0x403000, "write", 1, b"q").fault is None
    assert vm.read_guest(0x203000, 1) == b"q"
    assert vm.check_invariants() == []


def test_write_through_alias_unsyncs_every_sp_of_the_table() -> None:
    """§3.12 ``mmu_try_to_unsync_pages``: every (4K) sp of the gfn goes unsync."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    pt = gt.entry(0x400000, 1) & ~0xFFF
    gt.write(gt.entry(0x800000, 2), pt | P.PTE_P | P.PTE_US | A)
    v.access(0x403000, "read")
    v.access(0x803000, "read")
    sps = sps_of(vm, pt >> 12, 1)
    assert len(sps) == 2
    assert not guest_write_entry(v, pt + 8 * 3, 0x20D000 | URW | A).emulated
    assert all(sp.unsync for sp in sps)  # type: ignore[attr-defined]
    v.set_sregs(cr3=gt.cr3)  # CR3 reload: sync
    assert v.access(0x403000, "read").gpa == 0x20D000
    assert v.access(0x803000, "read").gpa == 0x20D000
    assert vm.check_invariants() == []


# ------------------------------------------------------------ §2.4 role change
def test_unsync_pt_reused_as_pd_is_zapped_and_then_write_tracked() -> None:
    """§2.4 / kvm_mmu_find_shadow_page: a page shadowed as an (unsync) PT that
    becomes a PD elsewhere: the upper-level lookup zaps the unsync sp; the
    new level-2 sp write-tracks the gfn, so the guest's next store to that
    page is emulated (the gfn can no longer go unsync: -EPERM)."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pt = gt.entry(0x400000, 1) & ~0xFFF
    guest_write_entry(v, pt + 8 * 9, 0x209000 | URW | A)  # unsync
    (old,) = sps_of(vm, pt >> 12, 1)
    assert old.unsync  # type: ignore[attr-defined]
    # Use the same page as a PD for 1 GiB at gva 0x80000000: entry 2 of the
    # PDPT of 0x80000000 points at it.
    pdpte = gt.entry(0x80000000, 3)
    gt.write(pdpte, pt | URW | A)
    # PD entry 0 (= PT entry 0: 0x200000|URW|A) is a PDE pointing at a PT at
    # gpa 0x200000; give that PT one entry.
    vm.write_guest(0x200000, (0x20E000 | URW | A).to_bytes(8, "little"))
    r = v.access(0x80000000, "read")
    assert r.fault is None and r.gpa == 0x20E000
    assert old.invalid  # type: ignore[attr-defined]
    assert sps_of(vm, pt >> 12, 2)
    assert vm.page_track.count(pt >> 12) == 1
    w = guest_write_entry(v, pt + 8 * 10, 0x20F000 | URW | A)
    assert w.emulated
    assert vm.check_invariants() == []


# ------------------------------------------------------------------ §3.13
def pd_env() -> tuple[kvmmu.VM, GuestTables, int, object]:
    vm, gt = long_env()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    (pd_sp,) = sps_of(vm, pde >> 12, 2)
    return vm, gt, pde, pd_sp


def test_flooding_needs_three_writes_and_a_misaligned_write_does_not_count() -> None:
    """§3.13: misaligned is checked first (``||`` short-circuits), so a
    misaligned write zaps without counting; two aligned writes do not flood,
    the third does."""
    vm, _gt, pde, pd_sp = pd_env()
    v = vm.vcpus[0]
    guest_write_entry(v, pde + 8 * 200, 0)
    guest_write_entry(v, pde + 8 * 201, 0)
    assert pd_sp.write_flooding_count == 2  # type: ignore[attr-defined]
    assert not pd_sp.invalid and vm.stats["mmu_flooded"] == 0  # type: ignore[attr-defined]
    guest_write_entry(v, pde + 8 * 202, 0)
    assert pd_sp.invalid and vm.stats["mmu_flooded"] == 1  # type: ignore[attr-defined]


def test_flooding_count_reset_by_a_fault_through_the_pd_not_by_a_fault_elsewhere() -> None:
    """§3.8 step 2: ``FNAME(fetch)`` clears the count only of sps on the fault's
    path; a fault through another PD leaves it."""
    vm, gt, pde, pd_sp = pd_env()
    v = vm.vcpus[0]
    gt.map(0x40000000, 0x300000, URW | A)  # another PDPT entry -> another PD
    guest_write_entry(v, pde + 8 * 200, 0)
    guest_write_entry(v, pde + 8 * 200, 0)
    assert v.access(0x40000000, "read").gpa == 0x300000
    assert pd_sp.write_flooding_count == 2  # type: ignore[attr-defined]
    guest_write_entry(v, pde + 8 * 200, 0)
    assert pd_sp.invalid  # type: ignore[attr-defined]


def test_level1_sp_never_floods() -> None:
    """``detect_write_flooding``: a 4K sp never floods (it may go unsync); an
    externally tracked PT takes many emulated writes and only SPTEs go."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    for gva in (0x400000, 0x401000):
        v.access(gva, "read")
    pt = gt.entry(0x400000, 1) & ~0xFFF
    vm.page_track.add_gfn(pt >> 12)
    (sp,) = sps_of(vm, pt >> 12, 1)
    for _ in range(5):
        assert guest_write_entry(v, pt + 8 * 100, 0).emulated
    assert not sp.invalid and vm.stats["mmu_flooded"] == 0  # type: ignore[attr-defined]
    assert vm.mmu.spte(sp, 0) and vm.mmu.spte(sp, 1)
    assert guest_write_entry(v, pt + 8, 0x20A000 | URW | A).emulated
    assert vm.mmu.spte(sp, 0) and not vm.mmu.spte(sp, 1)
    assert v.access(0x401000, "read").gpa == 0x20A000
    assert vm.check_invariants() == []


@pytest.mark.parametrize(
    ("offset", "nbytes", "whole"),
    [
        (0, 8, False),  # aligned
        (0, 4, False),  # widened (long mode is_pae)
        (4, 4, False),  # widened to the aligned 8
        (0, 1, False),  # clear_bit-style 1-byte write at the start
        (1, 1, True),  # < 4 bytes, not at the start
        (0, 2, True),  # < 4 bytes
        (4, 8, True),  # crosses two gPTEs
        (2, 4, False),  # widened to offset 0, 8 bytes
    ],
)
def test_partial_writes_to_a_64bit_pd(offset: int, nbytes: int, whole: bool) -> None:
    """§3.13 ``detect_write_misaligned`` after ``mmu_pte_write_fetch_gpte``'s
    PAE widening: which writes zap the whole sp and which only the SPTE."""
    vm, _gt, pde, pd_sp = pd_env()
    v = vm.vcpus[0]
    i = (pde & 0xFFF) // 8
    assert vm.mmu.spte(pd_sp, i)
    # Rewrite with the current bytes so the translation stays the same.
    data = vm.read_guest(pde + offset, nbytes)
    r = v.access(TABLE_WINDOW + pde + offset, "write", nbytes, data)
    assert r.emulated
    assert pd_sp.invalid == whole  # type: ignore[attr-defined]
    assert vm.stats["mmu_flooded"] == int(whole)
    if not whole:
        assert vm.mmu.spte(pd_sp, i) == 0
    assert v.access(0x400000, "read").gpa == 0x200000
    assert vm.check_invariants() == []


def test_write_straddling_two_pdes_zaps_whole_sp_and_both_translations_update() -> None:
    """An 8-byte write at offset 4 of a gPTE is misaligned: the whole sp goes,
    so both entries it touched are rebuilt from memory."""
    vm, gt, pde, pd_sp = pd_env()
    v = vm.vcpus[0]
    nxt = gt.entry(0x600000, 1) & ~0xFFF  # PDE index 3 (0x600000) gets a PT
    gt.write(nxt, 0x206000 | URW | A)
    assert v.access(0x600000, "read").gpa == 0x206000
    cur = vm.read_guest(pde, 16)
    r = v.access(TABLE_WINDOW + pde + 4, "write", 8, cur[4:12])
    assert r.emulated and pd_sp.invalid  # type: ignore[attr-defined]
    assert v.access(0x400000, "read").gpa == 0x200000
    assert vm.check_invariants() == []


def test_32bit_guest_pt_write_zaps_in_its_quadrant_only() -> None:
    """§3.13 ``get_written_sptes``: a 4-byte gPTE at index 600 of a 32-bit PT
    is in quadrant 1 (entries 512..1023), SPTE index 88; quadrant 0 untouched."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    g_lo, g_hi = 0x400000 + 88 * 0x1000, 0x400000 + 600 * 0x1000
    gt.map(g_lo, 0x200000)
    gt.map(g_hi, 0x201000)
    gt.map_tables()
    gt.start()
    v = vm.vcpus[0]
    assert v.access(g_lo, "read").gpa == 0x200000
    assert v.access(g_hi, "read").gpa == 0x201000
    pt = gt.entry(g_lo, 1) >> 12
    q = {sp.role.quadrant: sp for sp in sps_of(vm, pt, 1)}  # type: ignore[attr-defined]
    assert set(q) == {0, 1}
    assert vm.mmu.spte(q[0], 88) and vm.mmu.spte(q[1], 88)
    vm.page_track.add_gfn(pt)
    entry = gt.entry(g_hi, 1)
    assert entry & 0xFFF == 600 * 4
    r = v.access(TABLE_WINDOW + entry, "write", 4, (0x202000 | URW).to_bytes(4, "little"))
    assert r.emulated
    assert vm.mmu.spte(q[0], 88) and not vm.mmu.spte(q[1], 88)
    assert v.access(g_hi, "read").gpa == 0x202000
    assert v.access(g_lo, "read").gpa == 0x200000
    assert vm.check_invariants() == []


@pytest.mark.parametrize(("offset", "nbytes", "whole"), [(4, 1, False), (2, 1, True), (2, 4, True)])
def test_32bit_misaligned_uses_4_byte_gptes(offset: int, nbytes: int, whole: bool) -> None:
    """``detect_write_misaligned`` uses ``pte_size`` 4 for ``has_4_byte_gpte``:
    a 1-byte write at offset 4 is at a gPTE start (not misaligned), a 4-byte
    write at offset 2 crosses a gPTE (no widening without PAE)."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    gt.map(0x400000, 0x200000)
    gt.map(0x401000, 0x201000)
    gt.map_tables()
    gt.start()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    v.access(0x401000, "read")
    pt = gt.entry(0x400000, 1) >> 12
    (sp,) = sps_of(vm, pt, 1)
    vm.page_track.add_gfn(pt)
    data = vm.read_guest((pt << 12) + offset, nbytes)
    assert v.access(TABLE_WINDOW + (pt << 12) + offset, "write", nbytes, data).emulated
    assert sp.invalid == whole  # type: ignore[attr-defined]
    if not whole:
        assert vm.mmu.spte(sp, 0) and not vm.mmu.spte(sp, 1)


def test_32bit_pd_write_in_quadrant_1_zaps_two_shadow_pdes() -> None:
    """A 32-bit PDE at index 300 (offset 1200): quadrant 1, shadow PDEs 88, 89."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    gva = 300 << 22  # 0x4B000000
    gt.map(gva, 0x200000)
    gt.map(gva + 0x200000, 0x201000)
    gt.map_tables()
    gt.start()
    v = vm.vcpus[0]
    assert v.access(gva, "read").gpa == 0x200000
    assert v.access(gva + 0x200000, "read").gpa == 0x201000
    root = vm.mmu.vstate(v).root
    top = root.pae[1]  # type: ignore[union-attr,index]
    assert top is not None and top.role.quadrant == 1
    assert vm.mmu.spte(top, 88) and vm.mmu.spte(top, 89)
    pde = gt.entry(gva, 2)
    assert pde & 0xFFF == 1200
    assert v.access(TABLE_WINDOW + pde, "write", 4, b"\0\0\0\0").emulated
    assert not vm.mmu.spte(top, 88) and not vm.mmu.spte(top, 89)
    assert v.access(gva, "read").fault is not None
    assert vm.check_invariants() == []


# ------------------------------------------------------------------ §3.7 A/D
def test_walker_sets_a_on_every_level_and_d_only_on_the_leaf() -> None:
    vm = make_vm()
    gt = GuestTables(vm)
    gt.map(0x400000, 0x200000, URW)
    gt.start()
    v = vm.vcpus[0]
    addrs = [gt.entry(0x400000, lvl) for lvl in (4, 3, 2, 1)]
    assert all(not gt.read(a) & (A | D) for a in addrs)
    v.access(0x400000, "read")
    assert all(gt.read(a) & A for a in addrs)
    assert all(not gt.read(a) & D for a in addrs)
    v.access(0x400000, "write", 1, b"w")
    assert gt.read(addrs[3]) & D
    assert all(not gt.read(a) & D for a in addrs[:3])


def test_walker_sets_d_on_a_huge_leaf_write_only() -> None:
    vm = make_vm()
    gt = GuestTables(vm)
    gt.map(0x800000, 0x600000, URW, level=2)
    gt.start()
    v = vm.vcpus[0]
    pde = gt.entry(0x800000, 2)
    v.access(0x801000, "fetch")
    assert gt.read(pde) & A and not gt.read(pde) & D
    v.access(0x801000, "write", 1, b"w")
    assert gt.read(pde) & D


@pytest.mark.parametrize(
    ("flags", "kind", "cpl"),
    [
        (P.PTE_P | P.PTE_US, "write", 3),  # read-only page
        (P.PTE_P | P.PTE_RW, "read", 3),  # supervisor page
        (0, "read", 0),  # not present
        (URW | P.PTE_NX, "fetch", 0),  # NX
    ],
)
def test_walker_sets_no_a_d_bits_when_the_walk_faults(flags: int, kind: str, cpl: int) -> None:
    """``FNAME(walk_addr_generic)``: ``update_accessed_dirty_bits`` runs only
    after ``permission_fault`` passed; a failed walk changes no gPTE."""
    vm = make_vm()
    gt = GuestTables(vm)
    leaf = gt.map(0x400000, 0x200000, flags)
    gt.start()
    v = vm.vcpus[0]
    v.set_sregs(cpl=cpl)
    addrs = [gt.entry(0x400000, lvl) for lvl in (4, 3, 2)] + [leaf]
    before = [gt.read(a) for a in addrs]
    r = v.access(0x400000, kind, 1, b"x" if kind == "write" else None)  # type: ignore[arg-type]
    assert r.fault is not None
    assert [gt.read(a) for a in addrs] == before


def test_pae_walker_does_not_write_the_pdpte() -> None:
    """PAE: A/D are updated from ``max_level`` = 2 down; a PDPTE has no A bit."""
    vm = make_vm()
    gt = LegacyTables(vm, "pae")
    gt.map(0x400000, 0x200000)
    gt.start()
    pdpte = vm.read_guest(gt.cr3, 8)
    v = vm.vcpus[0]
    assert v.access(0x400000, "write", 1, b"w").fault is None
    assert vm.read_guest(gt.cr3, 8) == pdpte
    assert gt.read(gt.entry(0x400000, 2)) & A
    assert gt.read(gt.entry(0x400000, 1)) & (A | D) == A | D


def test_32bit_walker_writes_a_d_4_bytes_wide() -> None:
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    gt.map(0x400000, 0x200000)
    gt.start()
    leaf = gt.entry(0x400000, 1)
    vm.write_guest(leaf + 4, b"\xee\xee\xee\xee")  # the next gPTE (garbage)
    v = vm.vcpus[0]
    assert v.access(0x400000, "write", 1, b"w").fault is None
    assert gt.read(leaf) & (A | D) == A | D
    assert vm.read_guest(leaf + 4, 4) == b"\xee\xee\xee\xee"


# ---------------------------------------------------------- §3.15 CR3 switch
def test_prev_roots_lru_keeps_three() -> None:
    """``KVM_MMU_NUM_PREV_ROOTS`` = 3: A->B->C->D->A reuses A's cached root."""
    vm = make_vm(vcpus=1)
    tabs = [GuestTables(vm, base=0x10000 + k * 0x10000) for k in range(5)]
    for k, t in enumerate(tabs):
        t.map(0x400000, 0x200000 + k * 0x1000, URW | A)
    v = vm.vcpus[0]
    tabs[0].start(v)
    v.access(0x400000, "read")
    root_a = vm.mmu.vstate(v).root
    for t in tabs[1:4]:
        v.set_sregs(cr3=t.cr3)
        v.access(0x400000, "read")
    v.set_sregs(cr3=tabs[0].cr3)
    assert vm.mmu.vstate(v).root is root_a
    assert v.access(0x400000, "read").exits == 0


def test_cr3_switch_back_syncs_unsync_children_of_cached_root() -> None:
    """§3.15 ``kvm_mmu_new_pgd`` + ``kvm_mmu_sync_roots``: switching back to a
    cached root syncs its unsync leaf table (the new gPTE is seen)."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pte = gt.entry(0x400000, 1)
    guest_write_entry(v, pte, 0x20A000 | URW | A)
    guest_write_entry(v, pte, 0x20B000 | URW | A)
    other = GuestTables(vm, base=0x80000)
    other.map(0x400000, 0x20C000, URW | A)
    root = vm.mmu.vstate(v).root
    want = 0x20B000
    for k in range(2):
        v.set_sregs(cr3=other.cr3)
        assert v.access(0x400000, "read").gpa == 0x20C000
        v.set_sregs(cr3=gt.cr3)
        assert vm.mmu.vstate(v).root is root
        assert v.access(0x400000, "read").gpa == want
        want = 0x20D000 + k * 0x1000
        guest_write_entry(v, pte, want | URW | A)
    (sp,) = sps_of(vm, pte >> 12, 1)
    v.set_sregs(cr3=other.cr3)
    v.set_sregs(cr3=gt.cr3)
    assert not sp.unsync  # type: ignore[attr-defined]
    assert v.access(0x400000, "read").gpa == want
    assert vm.check_invariants() == []


def test_role_change_and_back_finds_the_same_root_sp() -> None:
    """kvm_mmu_get_shadow_page: a valid root sp stays in the hash after its
    root reference is dropped; the same (gfn, role) finds it again."""
    vm, _gt = long_env()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    root = vm.mmu.vstate(v).root
    v.set_sregs(cr0=CR0 & ~P.CR0_WP)
    assert vm.mmu.vstate(v).root is not root
    v.access(0x400000, "read")
    v.set_sregs(cr0=CR0)
    v.access(0x400000, "read")
    assert vm.mmu.vstate(v).root is root


# ------------------------------------------------------ permissions (§3.7)
def expected(
    pde: int, pte: int, kind: str, cpl: int, wp: bool, smep: bool, smap: bool, ac: bool, nxe: bool
) -> int | None:
    """SDM Vol 3A §4.6 (and RSVD for NX without EFER.NXE): error code or None."""
    user = cpl == 3
    ec = (P.PFERR_WRITE if kind == "write" else 0) | (P.PFERR_USER if user else 0)
    if kind == "fetch" and (nxe or smep):
        ec |= P.PFERR_FETCH
    if not nxe and (pte | pde) & P.PTE_NX:
        return ec | P.PFERR_RSVD | P.PFERR_PRESENT
    u = bool(pde & pte & P.PTE_US)
    w = bool(pde & pte & P.PTE_RW)
    nx = nxe and bool((pde | pte) & P.PTE_NX)
    bad = False
    if user:
        bad = not u or (kind == "write" and not w) or (kind == "fetch" and nx)
    elif kind == "fetch":
        bad = nx or (smep and u)
    else:
        if smap and u and not ac:
            bad = True
        if kind == "write" and not w and wp:
            bad = True
    return ec | P.PFERR_PRESENT if bad else None


LEAF_FLAGS = [
    P.PTE_P | rw | us | nx for rw in (0, P.PTE_RW) for us in (0, P.PTE_US) for nx in (0, P.PTE_NX)
]
PDE_FLAGS = [P.PTE_P | rw | us for rw in (0, P.PTE_RW) for us in (0, P.PTE_US)]


def test_permission_matrix_against_the_sdm() -> None:
    """§3.7 ``permission_fault`` (U/S, W with CR0.WP, NX, SMEP, SMAP with
    RFLAGS.AC) and the error code, at CPL 0 and 3, with SPTEs reused across
    mode changes (role: cr0_wp, smep_andnot_wp, smap_andnot_wp, efer_nx)."""
    vm = make_vm(vcpus=1)
    gt = GuestTables(vm)
    cases = []
    for p, pdef in enumerate(PDE_FLAGS):
        for li, leaff in enumerate(LEAF_FLAGS):
            gva = 0x40000000 + p * 0x200000 + li * 0x1000
            gpa = 0x200000 + (p * 8 + li) * 0x1000
            gt.map(gva, gpa, leaff | A | D)
            cases.append((gva, gpa, pdef, leaff))
    for p, pdef in enumerate(PDE_FLAGS):
        addr = gt.entry(0x40000000 + p * 0x200000, 2)
        gt.write(addr, (gt.read(addr) & ~0xFFF) | pdef | A)
    v = vm.vcpus[0]
    rng = random.Random(1234)
    modes = [
        (wp, smep, smap, ac, nxe, cpl)
        for wp in (False, True)
        for smep in (False, True)
        for smap in (False, True)
        for ac in (False, True)
        for nxe in (False, True)
        for cpl in (0, 3)
    ]
    rng.shuffle(modes)
    bad: list[str] = []
    for wp, smep, smap, ac, nxe, cpl in modes:
        v.set_sregs(
            cr0=CR0 if wp else CR0 & ~P.CR0_WP,
            cr3=gt.cr3,
            cr4=P.CR4_PAE | (P.CR4_SMEP if smep else 0) | (P.CR4_SMAP if smap else 0),
            efer=P.EFER_LME | (P.EFER_NXE if nxe else 0),
            cpl=cpl,
        )
        v.rflags_ac = ac
        order = list(cases)
        rng.shuffle(order)
        for gva, gpa, pdef, leaff in order[:12]:
            for kind in rng.sample(["read", "write", "fetch"], 3):
                exp = expected(pdef, leaff, kind, cpl, wp, smep, smap, ac, nxe)
                r = v.access(gva, kind, 1, b"z" if kind == "write" else None)  # type: ignore[arg-type]
                got = None if r.fault is None else r.fault.error_code
                if got != exp or (exp is None and r.gpa != gpa):
                    bad.append(
                        f"wp={wp} smep={smep} smap={smap} ac={ac} nxe={nxe} cpl={cpl} "
                        f"pde={pdef:#x} pte={leaff:#x} {kind}: exp {exp} got {got}"
                    )
    assert bad == []
    assert vm.check_invariants() == []


# ------------------------------------------------------------ PAE PDPTEs
@pytest.mark.parametrize("rsvd", [P.PTE_RW, 1 << 5, 1 << 8, 1 << 50])
def test_reserved_pdpte_fails_the_load_and_keeps_the_cached_pdptes(rsvd: int) -> None:
    """x86.c ``load_pdptrs``: a present PDPTE with a reserved bit (MAXPHYADDR..63,
    5..8, 1..2) fails the load and leaves ``mmu->pdptrs`` unchanged (MOV CR3
    #GPs; KVM_SET_SREGS ignores the result): the walker keeps the old copies,
    so nothing faults with RSVD and no new PDPTE (even a valid one) is used."""
    vm = make_vm()
    gt = LegacyTables(vm, "pae")
    gt.map(0x400000, 0x200000)
    gt.map(0xC0000000, 0x201000)
    gt.map_tables()
    gt.start()
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == 0x200000
    assert v.access(0xC0000000, "read").gpa == 0x201000
    new_pd = gt.alloc()
    new_pt = gt.alloc()
    vm.write_guest(new_pd + 2 * 8, (new_pt | URW).to_bytes(8, "little"))
    vm.write_guest(new_pt, (0x205000 | URW).to_bytes(8, "little"))
    old3 = gt.read(gt.cr3 + 24)
    gt.write(gt.cr3, new_pd | P.PTE_P)  # valid, but in a failing load
    gt.write(gt.cr3 + 24, old3 | rsvd)
    v.set_sregs(cr3=gt.cr3)
    assert vm.mmu.vstate(v).pdptrs[3] == old3
    r = v.access(0x400000, "read")
    assert r.fault is None and r.gpa == 0x200000
    r = v.access(0xC0000000, "read")
    assert r.fault is None and r.gpa == 0x201000
    gt.write(gt.cr3 + 24, old3)  # fixed: the next load takes both
    v.set_sregs(cr3=gt.cr3)
    assert v.access(0x400000, "read").gpa == 0x205000
    assert vm.check_invariants() == []


# ------------------------------------------------------------------ §3.9
def test_prefetch_stops_at_a_gpte_with_reserved_bits() -> None:
    """§3.9 ``prefetch_invalid_gpte``: a reserved bit refuses the gPTE and the
    scan stops there."""
    vm, gt = long_env()
    for i in range(8):
        vm.read_guest(0x200000 + i * 0x1000, 1)
    gt.write(gt.entry(0x404000, 1), 0x204000 | URW | A | (1 << 50))
    v = vm.vcpus[0]
    v.access(0x402000, "read")
    assert vm.stats["mmu_prefetched"] == 3  # 0, 1, 3; stops at 4
    r = v.access(0x405000, "read")
    assert r.exits == 1
    f = v.access(0x404000, "read").fault
    assert f is not None and f.error_code == P.PFERR_RSVD | P.PFERR_PRESENT


def test_prefetch_uses_the_gptes_reread_after_write_protection() -> None:
    """§3.8/§3.9: ``gpte_changed`` at 4K re-reads the 8-entry block once the
    table is write-protected and the prefetch uses those values: a neighbour
    changed after the walk is prefetched with its new value."""
    from kvmmu.mmu.fault import RET_PF_FIXED
    from kvmmu.mmu.shadow import drive

    vm, gt = long_env()
    for i in range(8):
        vm.read_guest(0x200000 + i * 0x1000, 1)
    vm.read_guest(0x20F000, 1)
    v = vm.vcpus[0]
    vm.mmu.reload(v)
    nb = gt.entry(0x405000, 1)

    def racer(step: object) -> None:
        if getattr(step, "name", "") == "walk":
            gt.write(nb, 0x20F000 | URW | A)

    assert drive(vm.mmu.page_fault_steps(v, 0x402000, 0), racer) == RET_PF_FIXED
    r = v.access(0x405000, "read")
    assert r.exits == 0 and r.gpa == 0x20F000
    assert vm.check_invariants() == []


def test_race_pte_retargeted_between_walk_and_fetch_retries() -> None:
    """§3.8 (2010 fix): the leaf gPTE retargeted after the walk -> RETRY; the
    access then maps the new target, never the walked one."""
    from kvmmu.mmu.fault import RET_PF_RETRY
    from kvmmu.mmu.shadow import drive

    vm, gt = long_env()
    v = vm.vcpus[0]
    vm.mmu.reload(v)
    pte = gt.entry(0x403000, 1)

    def racer(step: object) -> None:
        if getattr(step, "name", "") == "walk":
            gt.write(pte, 0x20E000 | URW | A)

    assert drive(vm.mmu.page_fault_steps(v, 0x403000, 0), racer) == RET_PF_RETRY
    assert v.access(0x403000, "read").gpa == 0x20E000
    assert vm.check_invariants() == []


# ------------------------------------------------------- §2.3 step 4 / flood
def test_tracked_write_fault_clears_flooding_counts_on_its_path() -> None:
    """§2.3 (4): shadow ``FNAME(page_fault)``'s page-track fast path clears the
    write-flooding counts along the walk (``shadow_page_table_clear_flood``)."""
    vm, _gt, pde, pd_sp = pd_env()
    v = vm.vcpus[0]
    v.access(0x401000, "read")
    vm.page_track.add_gfn(0x201)
    guest_write_entry(v, pde + 8 * 200, 0)
    guest_write_entry(v, pde + 8 * 200, 0)
    assert pd_sp.write_flooding_count == 2  # type: ignore[attr-defined]
    assert v.access(0x401000, "write", 1, b"t").emulated
    assert pd_sp.write_flooding_count == 0  # type: ignore[attr-defined]
    guest_write_entry(v, pde + 8 * 200, 0)
    assert not pd_sp.invalid  # type: ignore[attr-defined]


def test_emulated_pml4e_write_zaps_and_rebuilds() -> None:
    """§3.13 on the root: a PML4E store is emulated (the root is tracked),
    its SPTE is zapped and the next access follows the new PDPT."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == 0x200000
    other = GuestTables(vm, base=0x80000)
    other.map(0x400000, 0x20C000, URW | A)
    pdpt = other.read(other.cr3) & ~0xFFF
    w = guest_write_entry(v, gt.cr3, pdpt | URW | A)
    assert w.emulated
    assert v.access(0x400000, "read").gpa == 0x20C000
    assert vm.check_invariants() == []


# ---------------------------------------------------------------- §3.15 sync
def test_invlpg_of_a_sync_mapping_keeps_the_spte() -> None:
    """§3.15: INVLPG syncs unsync leaves only; a sync SPTE is left alone."""
    vm, _gt = long_env()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    vm.mmu.invlpg(v, 0x400000)
    assert v.access(0x400000, "read").exits == 0


def test_sync_drops_spte_whose_gfn_changed_and_updates_access_in_place() -> None:
    """§3.15 ``sync_spte``: a new gfn drops the SPTE (the next access faults);
    same gfn, new access -> the SPTE is rewritten in place (no exit)."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    for gva in (0x400000, 0x401000):
        assert v.access(gva, "write", 1, b"a").fault is None
    p0, p1 = gt.entry(0x400000, 1), gt.entry(0x401000, 1)
    guest_write_entry(v, p0, 0x20A000 | URW | A | D)
    guest_write_entry(v, p1, 0x201000 | P.PTE_P | P.PTE_US | A | D)
    v.set_sregs(cr3=gt.cr3)
    r0 = v.access(0x400000, "read")
    assert r0.exits == 1 and r0.gpa == 0x20A000
    r1 = v.access(0x401000, "read")
    assert r1.exits == 0 and r1.gpa == 0x201000
    assert r1.spte is not None and not r1.spte & PT_WRITABLE_MASK
    f = v.access(0x401000, "write", 1, b"b").fault
    assert f is not None and f.error_code == P.PFERR_PRESENT | P.PFERR_WRITE
    assert vm.check_invariants() == []


def test_parentless_unsync_pt_relinked_is_synced_first() -> None:
    """An unsync PT whose PDE the guest repoints (emulated: the shadow PDE is
    zapped) keeps its stale entries; when the PDE points back, the lookup
    finds the unsync sp and syncs it (``kvm_sync_page``) before linking, so
    gPTEs written while it was unlinked are seen."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    assert v.access(0x403000, "read").gpa == 0x203000
    pde = gt.entry(0x400000, 2)
    pt = gt.read(pde) & ~0xFFF
    guest_write_entry(v, pt + 8 * 3, 0x203000 | URW | A)  # unsync
    spare = gt.alloc()
    assert guest_write_entry(v, pde, spare | URW | A).emulated
    guest_write_entry(v, pt + 8 * 3, 0x20B000 | URW | A)  # unseen by KVM
    assert guest_write_entry(v, pde, pt | URW | A).emulated
    assert v.access(0x403000, "read").gpa == 0x20B000
    assert vm.check_invariants() == []


def test_32bit_unsync_pt_invlpg_in_quadrant_1() -> None:
    """32-bit guest: INVLPG syncs entry 600 of the guest PT through the
    quadrant-1 sp (gPTE at ``gfn*4096 + (512 + 88)*4``); the quadrant-0 sp's
    entry 88 (another gva) keeps its translation."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    g_lo, g_hi = 0x400000 + 88 * 0x1000, 0x400000 + 600 * 0x1000
    gt.map(g_lo, 0x200000)
    gt.map(g_hi, 0x201000)
    gt.map_tables()
    gt.start()
    v = vm.vcpus[0]
    assert v.access(g_lo, "read").gpa == 0x200000
    assert v.access(g_hi, "read").gpa == 0x201000
    e_hi = gt.entry(g_hi, 1)
    w = v.access(TABLE_WINDOW + e_hi, "write", 4, (0x201000 | URW | A).to_bytes(4, "little"))
    assert not w.emulated
    w = v.access(TABLE_WINDOW + e_hi, "write", 4, (0x20A000 | URW | A).to_bytes(4, "little"))
    assert w.exits == 0
    assert v.access(g_hi, "read").gpa == 0x201000  # stale until INVLPG
    vm.mmu.invlpg(v, g_hi)
    assert v.access(g_hi, "read").gpa == 0x20A000
    assert v.access(g_lo, "read").gpa == 0x200000
    assert vm.check_invariants() == []


@pytest.mark.parametrize("pse", [False, True])
def test_32bit_pde_ps_ignored_without_cr4_pse(pse: bool) -> None:
    """§3.7 ``is_last_gpte``: for 32-bit paging bit 7 makes a 4 MiB page only
    with CR4.PSE=1; without it the PDE points at a page table."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    pt = gt.alloc()
    vm.write_guest(pt + 5 * 4, (0x205000 | URW).to_bytes(4, "little"))
    gt.write(gt.entry(0x800000, 2), pt | URW | P.PTE_PS)
    v = vm.vcpus[0]
    v.set_sregs(cr0=CR0, cr3=gt.cr3, cr4=P.CR4_PSE if pse else 0, efer=0)
    r = v.access(0x805000, "read")
    # With PSE: a 4 MiB page, frame bits 31:22, PSE-36 bits 20:13 -> 39:32.
    big = (((pt >> 13) & 0xFF) << 32) | (pt & 0xFFC00000) | 0x5000
    assert r.fault is None and r.gpa == (big if pse else 0x205000)


def test_self_mapped_pml4_is_two_sps_and_writes_through_it_are_emulated() -> None:
    """A recursive PML4 entry: the same guest table is a PML4 (level 4) and,
    through the self-map, a PDPT/PD/PT (levels 3..1): one sp per role. A
    store through the self-map hits a write-tracked gfn -> emulated, and the
    PML4E's SPTE is zapped, so the new mapping is used."""
    vm, gt = long_env()
    v = vm.vcpus[0]
    gt.write(gt.cr3 + 8 * 511, gt.cr3 | URW | A)
    self_va = 0xFFFFFFFFFFFFF000  # PML4[511] four times: the PML4 page itself
    r = v.access(self_va, "read")
    assert r.fault is None and r.gpa == gt.cr3
    assert int.from_bytes(r.data or b"", "little") == gt.read(gt.cr3)
    levels = {sp.role.level for sp in sps_of(vm, gt.cr3 >> 12)}  # type: ignore[attr-defined]
    assert {4, 3, 2} <= levels
    assert v.access(0x400000, "read").gpa == 0x200000
    other = GuestTables(vm, base=0x80000)
    other.map(0x400000, 0x20C000, URW | A)
    pdpt = other.read(other.cr3) & ~0xFFF
    w = v.access(self_va, "write", 8, (pdpt | URW | A).to_bytes(8, "little"))
    assert w.fault is None and w.emulated
    assert v.access(0x400000, "read").gpa == 0x20C000
    assert vm.check_invariants() == []


def test_32bit_pd_writes_count_flooding_in_every_quadrant_sp() -> None:
    """§3.13: ``detect_write_flooding`` runs for every sp of the gfn before the
    quadrant check, so stores to quadrant-0 PDEs count in the quadrant-1 sp
    too; the emulated store's own fault clears the counts along its path
    (§2.3 (4)), here the quadrant-1 sp of the table window."""
    vm = make_vm()
    gt = LegacyTables(vm, "32")
    gt.map(0x400000, 0x200000)
    gt.map_tables()  # the window (0x40000000+) is in quadrant 1
    gt.start()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    v.access(TABLE_WINDOW + gt.cr3, "read")
    root = vm.mmu.vstate(v).root
    q0, q1 = root.pae[0], root.pae[1]  # type: ignore[union-attr,index]
    assert q0 is not None and q1 is not None and q0.gfn == q1.gfn == gt.cr3 >> 12
    for k in range(3):
        e = gt.cr3 + 4 * (10 + k)  # PDEs 10..12: quadrant 0
        assert v.access(TABLE_WINDOW + e, "write", 4, bytes(4)).emulated
    assert q0.invalid
    assert not q1.invalid and q1.write_flooding_count == 1
    assert v.access(0x400000, "read").gpa == 0x200000
    assert vm.check_invariants() == []


# ------------------------------------------- property: stores, flush, agree
def oracle_read(vm: kvmmu.VM, cr3: int, gva: int) -> int | None:
    """A plain 4-level walk over guest memory (all entries URW, no PS)."""
    table = cr3 & ~0xFFF
    for level in (4, 3, 2, 1):
        e = int.from_bytes(
            vm.read_guest(table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8, 8), "little"
        )
        if not e & P.PTE_P:
            return None
        table = e & 0xFFFFFFFFFF000
    return table | (gva & 0xFFF)


STORES = [(0, 8), (0, 4), (4, 4), (0, 1), (0, 2), (2, 4), (4, 8), (1, 1)]
PROP_GVAS = [0x400000 + i * 0x1000 for i in range(0, 16, 3)] + [0x600000, 0x40000000]


def _prop_steps() -> object:
    from hypothesis import strategies as st

    return st.lists(
        st.one_of(
            st.tuples(
                st.just("store"),
                st.integers(0, 7),  # table
                st.sampled_from([0, 1, 2, 3, 6, 9, 12, 15, 511]),  # entry
                st.integers(0, 11),  # value
                st.sampled_from(STORES),
            ),
            st.tuples(st.just("read"), st.sampled_from(PROP_GVAS)),
            st.tuples(st.just("invlpg"), st.sampled_from(PROP_GVAS)),
            st.tuples(st.just("reload")),
        ),
        min_size=1,
        max_size=18,
    )


def test_guest_stores_of_any_width_then_cr3_reload_agree_with_memory() -> None:
    """§3.12–3.15 end to end: whatever mix of aligned, widened, partial and
    straddling stores the guest makes to its tables (emulated for upper
    levels, unsync for leaves), after a CR3 reload (TLB flush + sync) every
    translation equals a walk of guest memory, and the invariants hold."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(steps=_prop_steps())
    def run(steps: list[tuple[object, ...]]) -> None:
        vm = make_vm(vcpus=1)
        gt = GuestTables(vm)
        for i in range(16):
            gt.map(0x400000 + i * 0x1000, 0x200000 + i * 0x1000, URW | A)
        gt.map(0x600000, 0x210000, URW | A)
        gt.map(0x40000000, 0x211000, URW | A)
        gt.map_tables()
        tables = list(gt.tables)
        values = [t | URW | A for t in tables[:6]] + [
            (0x200000 + k * 0x1000) | URW | A for k in range(5)
        ]
        values.append(0)
        gt.start()
        v = vm.vcpus[0]
        for g in PROP_GVAS:
            v.access(g, "read")
        for step in steps:
            if step[0] == "store":
                _s, t, e, val, (off, size) = step  # type: ignore[misc]
                addr = tables[t % len(tables)] + 8 * e + off  # type: ignore[operator]
                raw = values[val].to_bytes(16, "little")  # type: ignore[index]
                r = v.access(TABLE_WINDOW + addr, "write", size, raw[off % 8 : off % 8 + size])  # type: ignore[arg-type,operator]
                del r  # a store may fault once the window is unmapped
            elif step[0] == "read":
                v.access(step[1], "read")  # type: ignore[arg-type]
            elif step[0] == "invlpg":
                vm.mmu.invlpg(v, step[1])
            else:
                v.set_sregs(cr3=gt.cr3)
                for g in PROP_GVAS:
                    want = oracle_read(vm, gt.cr3, g)
                    got = v.access(g, "read")
                    assert (got.gpa if got.fault is None else None) == want, (hex(g), steps)
            assert vm.check_invariants() == [], steps
        v.set_sregs(cr3=gt.cr3)
        for g in PROP_GVAS:
            want = oracle_read(vm, gt.cr3, g)
            got = v.access(g, "read")
            assert (got.gpa if got.fault is None else None) == want, (hex(g), steps)

    run()
