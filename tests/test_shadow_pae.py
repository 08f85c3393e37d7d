"""Shadow paging of PAE and 32-bit (non-PAE) guests (spec/kvm-mmu.md §3.7, §3.8, §3.13).

``LegacyTables`` builds PAE (PDPT + 4 PDs, 8-byte entries) or 32-bit (one
1024-entry PD, 4-byte entries) guest tables in guest memory from the host
side; every table page is mapped at ``TABLE_WINDOW + gpa`` so a vCPU can
rewrite its own entries. Accesses are compared with :func:`kvmmu.paging.walk`
on the same tables, and ``vm.check_invariants()`` must stay empty.
"""

from __future__ import annotations

import random

import kvmmu
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu import paging as P
from kvmmu.mmu.shadow_page import ShadowPage
from test_shadow import GUEST_SIZE, HVA, TABLE_WINDOW, URW, make_vm

MODES = ["pae", "32"]
VENDORS = ["vmx", "svm"]
CR0 = P.CR0_PG | 1 | P.CR0_WP
DATA = 0x200000
#: gpa of the 4 MiB page a 32-bit guest maps with PSE (2 MiB for PAE).
HUGE_GPA = 0x800000


class LegacyTables:
    """PAE or 32-bit guest page tables, built from the host side."""

    def __init__(self, vm: kvmmu.VM, mode: str, base: int = 0x10000) -> None:
        self.vm = vm
        self.mode = mode
        self.size = 8 if mode == "pae" else 4
        self.next = base
        self.tables: list[int] = []
        self.cr3 = self.alloc()
        if mode == "pae":
            for q in range(4):
                self.write(self.cr3 + 8 * q, self.alloc() | P.PTE_P)

    def alloc(self) -> int:
        gpa = self.next
        self.next += 0x1000
        self.vm.write_guest(gpa, bytes(0x1000))
        self.tables.append(gpa)
        return gpa

    def read(self, gpa: int) -> int:
        return int.from_bytes(self.vm.read_guest(gpa, self.size), "little")

    def write(self, gpa: int, value: int) -> None:
        self.vm.write_guest(gpa, value.to_bytes(self.size, "little"))

    def entry(self, gva: int, level: int) -> int:
        """The gpa of the level-``level`` (2 = PD, 1 = PT) entry for ``gva``."""
        if self.mode == "pae":
            pd = self.read(self.cr3 + 8 * ((gva >> 30) & 3)) & 0xFFFFF000
            pde = pd + ((gva >> 21) & 511) * 8
            pt_index = ((gva >> 12) & 511) * 8
        else:
            pde = self.cr3 + ((gva >> 22) & 1023) * 4
            pt_index = ((gva >> 12) & 1023) * 4
        if level == 2:
            return pde
        val = self.read(pde)
        if not val & P.PTE_P or val & P.PTE_PS:
            val = self.alloc() | URW
            self.write(pde, val)
        return (val & 0xFFFFF000) + pt_index

    def map(self, gva: int, gpa: int, flags: int = URW, level: int = 1) -> int:
        addr = self.entry(gva, level)
        self.write(addr, gpa | flags | (P.PTE_PS if level == 2 else 0))
        return addr

    def map_tables(self) -> None:
        done: set[int] = set()
        while set(self.tables) - done:
            for t in sorted(set(self.tables) - done):
                done.add(t)
                self.map(TABLE_WINDOW + t, t)

    def sregs(self, cr3: int | None = None) -> dict[str, int]:
        if self.mode == "pae":
            return {
                "cr0": CR0,
                "cr3": self.cr3 if cr3 is None else cr3,
                "cr4": P.CR4_PAE,
                "efer": P.EFER_NXE,
            }
        return {"cr0": CR0, "cr3": self.cr3 if cr3 is None else cr3, "cr4": P.CR4_PSE, "efer": 0}

    def start(self, *vcpus: kvmmu.vcpu.VCpu) -> None:
        for v in vcpus or tuple(self.vm.vcpus):
            v.set_sregs(**self.sregs())


def guest_store(v: kvmmu.vcpu.VCpu, gt: LegacyTables, entry: int, value: int) -> object:
    """The guest stores a whole gPTE (4 or 8 bytes) through its table window."""
    return v.access(TABLE_WINDOW + entry, "write", gt.size, value.to_bytes(gt.size, "little"))


def build(mode: str, vendor: str = "vmx", page_level: int = 1) -> tuple[kvmmu.VM, LegacyTables]:
    if page_level == 1:
        vm = make_vm(vendor)
    else:  # guest memory backed by 2 MiB host pages: huge shadow leaves allowed
        vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, tdp=False, vcpus=2))
        vm.host.mmap_anon(HVA, GUEST_SIZE, page_level=page_level)
        vm.set_user_memory_region(0, 0, 0, GUEST_SIZE, HVA)
    gt = LegacyTables(vm, mode)
    for i in range(16):
        gt.map(0x400000 + i * 0x1000, DATA + i * 0x1000)
    gt.map(0x401000, DATA + 0x1000, P.PTE_P | P.PTE_US)  # read-only
    gt.map(0x402000, DATA + 0x2000, P.PTE_P | P.PTE_RW)  # supervisor
    gt.map(0xC0000000, HUGE_GPA, URW, level=2)
    gt.map_tables()
    gt.start()
    return vm, gt


def expect(v: kvmmu.vcpu.VCpu, gva: int, kind: str) -> P.WalkResult:
    return v.walk(gva, kind)  # type: ignore[arg-type]


def check_access(v: kvmmu.vcpu.VCpu, gva: int, kind: str) -> None:
    """The shadow access agrees with the architectural walk."""
    w = expect(v, gva, kind)
    data = b"\xa5" if kind == "write" else None
    r = v.access(gva, kind, 1, data)  # type: ignore[arg-type]
    if w.fault:
        assert r.fault is not None, (hex(gva), kind)
        assert (r.fault.vector, r.fault.error_code) == (w.vector, w.error_code), hex(gva)
    else:
        assert r.fault is None, (hex(gva), kind, r.fault)
        assert r.gpa == w.gpa, (hex(gva), kind)


def pae_root(vm: kvmmu.VM, v: kvmmu.vcpu.VCpu) -> ShadowPage:
    root = vm.mmu.vstate(v).root
    assert root is not None and root.pae is not None
    return root


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("mode", MODES)
def test_accesses_match_the_guest_walker(mode: str, vendor: str) -> None:
    vm, gt = build(mode, vendor)
    rng = random.Random(f"{mode}{vendor}")
    gvas = [0x400000 + i * 0x1000 for i in range(17)] + [0x4FF000, 0x800000, 0x12345000]
    gvas += [0xC0000000 + rng.randrange(0, 0x400000, 0x1000) for _ in range(8)]
    gvas += [rng.randrange(0, 1 << 32, 0x1000) for _ in range(12)]
    for n in range(120):
        v = vm.vcpus[n % 2]
        v.set_sregs(cpl=rng.choice([0, 3]))
        check_access(v, rng.choice(gvas) | rng.randrange(0x1000), rng.choice(["read", "write"]))
        assert vm.check_invariants() == []
    v = vm.vcpus[0]
    root = pae_root(vm, v)
    tops = [sp for sp in root.pae or [] if sp is not None]
    assert len(tops) == 4 and all(sp.role.level == 2 for sp in tops)
    if mode == "32":
        assert {sp.role.quadrant for sp in tops} == {0, 1, 2, 3}
        assert {sp.gfn for sp in tops} == {gt.cr3 >> 12}
        assert all(sp.role.has_4_byte_gpte for sp in tops)
    else:
        assert [sp.gfn for sp in tops] == [gt.read(gt.cr3 + 8 * q) >> 12 for q in range(4)]


def test_32bit_page_table_is_shadowed_by_two_quadrants() -> None:
    """A 1024-entry guest PT is covered by 2 level-1 sps (quadrant = bit 21)."""
    vm, gt = build("32")
    v = vm.vcpus[0]
    gt.map(0x1000000, DATA, URW)
    gt.map(0x1200000, DATA + 0x3000, URW)
    assert v.access(0x1000000, "read").gpa == DATA
    assert v.access(0x1200000, "read").gpa == DATA + 0x3000
    pt = gt.entry(0x1000000, 1) >> 12
    sps = sorted(
        (sp.role.quadrant, sp.role.level)
        for sp in vm.mmu.active.values()
        if sp.gfn == pt and not sp.role.direct
    )
    assert sps == [(0, 1), (1, 1)]
    assert vm.check_invariants() == []


@pytest.mark.parametrize("page_level", [1, 2])
@pytest.mark.parametrize("vendor", VENDORS)
def test_pse_4m_page_maps_two_2m_halves(vendor: str, page_level: int) -> None:
    """A guest 4 MiB page: two 2 MiB shadow leaves (host 2 MiB pages) or two
    direct level-1 sps of 4K leaves, each with its half's gfn."""
    vm, _gt = build("32", vendor, page_level)
    v = vm.vcpus[0]
    lo = v.access(0xC0000123, "write", 1, b"\x11")
    hi = v.access(0xC0212345, "write", 1, b"\x22")
    assert lo.gpa == HUGE_GPA + 0x123 and hi.gpa == HUGE_GPA + 0x212345
    assert lo.level == hi.level == page_level
    assert vm.read_guest(HUGE_GPA + 0x212345, 1) == b"\x22"
    top = pae_root(vm, v).pae[3]  # type: ignore[index]
    assert top is not None and top.role.quadrant == 3
    i = (0xC0000000 >> 21) & 511
    halves = {}
    for k in (i, i + 1):
        spte = vm.mmu.spte(top, k)
        if lo.level == 2:
            halves[k] = top.gfns[k]
        else:
            halves[k] = vm.mmu.child_sp(spte).gfn
            assert vm.mmu.child_sp(spte).role.direct
    assert halves == {i: HUGE_GPA >> 12, i + 1: (HUGE_GPA >> 12) + 512}
    assert vm.check_invariants() == []


@pytest.mark.parametrize("mode", MODES)
def test_pse36_and_pae_huge_leaf_translate(mode: str) -> None:
    vm, gt = build(mode)
    v = vm.vcpus[0]
    if mode == "32":
        # PSE-36: PDE bits 20:13 are address bits 39:32 (beyond the memslot).
        gt.write(gt.entry(0x80000000, 2), (1 << 13) | P.PTE_PS | URW)
        w = v.walk(0x80000010, "read")
        assert w.gpa == (1 << 32) + 0x10
        r = v.access(0x80000010, "read")
        assert r.gpa == w.gpa and r.emulated
    else:
        gt.map(0x80000000, HUGE_GPA, URW, level=2)
        assert v.access(0x80123456, "read").gpa == HUGE_GPA + 0x123456
    assert vm.check_invariants() == []


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("mode", MODES)
def test_guest_pte_edits_update_the_shadow(mode: str, vendor: str) -> None:
    """A store to a shadowed guest table is emulated and zaps the shadow entry."""
    vm, gt = build(mode, vendor)
    v = vm.vcpus[0]
    for gva in (0x400000, 0x405000, 0xC0000000, 0xC0200000):
        v.access(gva, "read")
    # PTE: the 4K table goes unsync on the store (or the store is emulated);
    # either way the guest's INVLPG makes the new mapping visible.
    pte = gt.entry(0x405000, 1)
    w = guest_store(v, gt, pte, (DATA + 0xA000) | URW)
    assert v.access(0x405000, "read").gpa in (DATA + 0x5000, DATA + 0xA000)
    vm.mmu.invlpg(v, 0x405000)
    assert v.access(0x405000, "read").gpa == DATA + 0xA000
    assert w is not None and vm.check_invariants() == []
    assert vm.check_invariants() == []
    # PDE (write-tracked, always emulated): the huge page moves.
    pde = gt.entry(0xC0000000, 2)
    new_huge = 0x400000 if mode == "32" else 0x600000
    r = guest_store(v, gt, pde, new_huge | URW | P.PTE_PS)
    assert r.emulated  # type: ignore[attr-defined]
    assert vm.check_invariants() == []
    assert v.access(0xC0000010, "read").gpa == new_huge + 0x10
    if mode == "32":
        # Both 2 MiB halves of the old 4 MiB mapping were zapped.
        assert v.access(0xC0200010, "read").gpa == new_huge + 0x200010
    for gva in (0x400000, 0x405000, 0xC0000000, 0xC0200000):
        check_access(v, gva, "write")
    assert vm.check_invariants() == []


def test_32bit_pde_write_zaps_two_shadow_pdes() -> None:
    """``get_written_sptes``: a 4-byte PDE maps 4 MiB = two shadow PDEs, and
    only the sp of the written quadrant is touched."""
    vm, gt = build("32")
    v = vm.vcpus[0]
    v.access(0xC0000000, "read")
    v.access(0xC0200000, "read")
    top = pae_root(vm, v).pae[3]  # type: ignore[index]
    assert top is not None
    i = (0xC0000000 >> 21) & 511
    assert vm.mmu.spte(top, i) and vm.mmu.spte(top, i + 1)
    v.access(TABLE_WINDOW + gt.cr3, "read")  # the window's own quadrant (1)
    v.access(0x400000, "read")
    others = [sp for sp in pae_root(vm, v).pae or [] if sp is not None and sp is not top]
    before = [vm.mmu._data[sp.idx].copy() for sp in others]
    r = guest_store(v, gt, gt.entry(0xC0000000, 2), 0)
    assert r.emulated  # type: ignore[attr-defined]
    assert not vm.mmu.spte(top, i) and not vm.mmu.spte(top, i + 1)
    assert all((vm.mmu._data[sp.idx] == b).all() for sp, b in zip(others, before, strict=True))
    assert v.access(0xC0000000, "read").fault is not None
    assert vm.check_invariants() == []


def test_pae_half_entry_write_is_widened() -> None:
    """§3.13: a 4-byte write to a PAE table is widened to the aligned 8 bytes."""
    vm, gt = build("pae")
    v = vm.vcpus[0]
    v.access(0xC0000000, "fetch")
    pde = gt.entry(0xC0000000, 2)
    flooded = vm.stats["mmu_flooded"]
    # The high half: set NX (bit 63 = bit 31 of the upper dword).
    r = v.access(TABLE_WINDOW + pde + 4, "write", 4, (1 << 31).to_bytes(4, "little"))
    assert r.emulated
    assert vm.stats["mmu_flooded"] == flooded  # widened, hence aligned: no whole-sp zap
    assert vm.check_invariants() == []
    w = v.walk(0xC0000000, "fetch")
    f = v.access(0xC0000000, "fetch").fault
    assert w.fault and f is not None and f.error_code == w.error_code
    assert f.error_code & P.PFERR_FETCH
    # The low half: move the frame.
    low = (0x600000 | URW | P.PTE_PS).to_bytes(4, "little")
    assert v.access(TABLE_WINDOW + pde, "write", 4, low).emulated
    assert v.access(0xC0000010, "read").gpa == 0x600010
    assert vm.check_invariants() == []


def test_32bit_gpte_write_is_not_widened() -> None:
    """In a 32-bit guest a 4-byte write is one whole gPTE: only it is zapped."""
    vm, gt = build("32")
    v = vm.vcpus[0]
    for gva in (0x400000, 0x403000):
        v.access(gva, "read")
    pt = gt.entry(0x400000, 1) >> 12
    sp = next(s for s in vm.mmu.active.values() if s.gfn == pt and s.role.level == 1)
    assert vm.mmu.spte(sp, 0) and vm.mmu.spte(sp, 3)
    vm.page_track.add_gfn(pt)  # an external write-tracker: stores are emulated
    assert guest_store(v, gt, gt.entry(0x403000, 1), (DATA + 0xB000) | URW).emulated  # type: ignore[attr-defined]
    assert vm.mmu.spte(sp, 0) and not vm.mmu.spte(sp, 3)
    assert vm.stats["mmu_flooded"] == 0
    assert v.access(0x403000, "read").gpa == DATA + 0xB000
    assert vm.check_invariants() == []


@pytest.mark.parametrize("mode", MODES)
def test_unsync_leaf_invlpg_and_cr3_switch(mode: str) -> None:
    """A 4K table goes unsync when the guest maps it writable and writes it;
    the stale entry stays until INVLPG, or a CR3 switch syncs it."""
    vm, gt = build(mode)
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == DATA
    pte = gt.entry(0x400000, 1)
    # Touch the window page for write (maps it writable: the PT goes unsync).
    w = guest_store(v, gt, pte, DATA | URW | P.PTE_A)
    pt_sps = [s for s in vm.mmu.active.values() if s.gfn == pte >> 12 and s.role.level == 1]
    assert pt_sps and any(s.unsync for s in pt_sps)
    assert not w.emulated  # type: ignore[attr-defined]
    guest_store(v, gt, pte, (DATA + 0xC000) | URW | P.PTE_A)
    assert v.access(0x400000, "read").gpa == DATA  # stale until flushed
    assert vm.check_invariants() == []
    vm.mmu.invlpg(v, 0x400000)
    assert v.access(0x400000, "read").gpa == DATA + 0xC000
    guest_store(v, gt, pte, (DATA + 0xD000) | URW | P.PTE_A)
    other = LegacyTables(vm, mode, base=0x90000)
    other.map(0x400000, DATA + 0xE000)
    v.set_sregs(cr3=other.cr3)
    assert v.access(0x400000, "read").gpa == DATA + 0xE000
    v.set_sregs(cr3=gt.cr3)
    assert v.access(0x400000, "read").gpa == DATA + 0xD000
    assert vm.check_invariants() == []


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("mode", MODES)
def test_guest_faults_carry_the_walker_error_code(mode: str, vendor: str) -> None:
    vm, gt = build(mode, vendor)
    v = vm.vcpus[0]
    cases: list[tuple[int, str, int]] = [
        (0x500000, "read", 0),  # not present
        (0x401000, "write", 0),  # read-only, CR0.WP=1
        (0x402000, "read", 3),  # supervisor page, user access
        (0x401000, "write", 3),
    ]
    if mode == "pae":
        gt.write(gt.entry(0x403000, 1), (DATA + 0x3000) | URW | P.PTE_NX)
        cases.append((0x403000, "fetch", 3))  # NX
        gt.write(gt.entry(0x404000, 1), (DATA + 0x4000) | URW | (1 << 51))
        cases.append((0x404000, "read", 0))  # reserved bit
    else:
        gt.write(gt.entry(0x80000000, 2), P.PTE_PS | URW | (1 << 21))
        cases.append((0x80000000, "read", 0))  # reserved bit 21 of a 4 MiB PDE
    for gva, kind, cpl in cases:
        v.set_sregs(cpl=cpl)
        w = v.walk(gva, kind)  # type: ignore[arg-type]
        assert w.fault, (hex(gva), kind)
        check_access(v, gva, kind)
        assert vm.check_invariants() == []


def test_pdptes_are_loaded_at_cr3_load() -> None:
    """``load_pdptrs``: a PDPTE edit takes effect at the next CR3 load only."""
    vm, gt = build("pae")
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == DATA
    pd = gt.read(gt.cr3) & 0xFFFFF000
    vm.write_guest(gt.cr3, bytes(8))  # PDPTE 0 not present in memory
    assert v.access(0x400000, "read").gpa == DATA  # the cached PDPTE
    assert vm.check_invariants() == []
    v.set_sregs(cr3=gt.cr3 | 0x20)
    v.set_sregs(cr3=gt.cr3)
    assert pae_root(vm, v).pae[0] is None  # type: ignore[index]
    f = v.access(0x400000, "read").fault
    assert f is not None and f.error_code == 0
    gt.write(gt.cr3, pd | P.PTE_P)
    v.set_sregs(cr3=gt.cr3 | 0x20)
    v.set_sregs(cr3=gt.cr3)
    assert v.access(0x400000, "read").gpa == DATA
    assert vm.check_invariants() == []


GVAS = [0x400000 + i * 0x1000 for i in range(4)] + [0x600000, 0xC0000000, 0xC0200000]
FRAMES = [DATA + i * 0x1000 for i in range(6)]

step = st.one_of(
    st.tuples(
        st.just("access"),
        st.integers(0, 1),
        st.sampled_from(GVAS),
        st.sampled_from(["read", "write", "fetch"]),
    ),
    st.tuples(
        st.just("edit"),
        st.integers(0, 1),
        st.sampled_from(GVAS),
        st.sampled_from([1, 2]),
        st.integers(0, 6),
    ),
    st.tuples(st.just("half"), st.integers(0, 1), st.sampled_from(GVAS), st.integers(0, 1)),
    st.tuples(st.just("cr3"), st.integers(0, 1)),
)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=20))
def test_random_gpte_edits_follow_the_walker(mode: str, steps: list[tuple[object, ...]]) -> None:
    """Random guest stores to its PTEs/PDEs (then INVLPG, as a guest would)
    interleaved with accesses and CR3 reloads: every access agrees with the
    walker and the invariants hold after each step."""
    vm, gt = build(mode)
    spare = gt.alloc()
    gt.write(spare, FRAMES[3] | URW)
    gt.map_tables()
    for s in steps:
        v = vm.vcpus[int(s[1])]  # type: ignore[call-overload]
        if s[0] == "access":
            check_access(v, int(s[2]), str(s[3]))  # type: ignore[call-overload]
        elif s[0] in ("edit", "half"):
            gva = int(s[2])  # type: ignore[call-overload]
            if s[0] == "edit":
                level, choice = int(s[3]), int(s[4])  # type: ignore[call-overload]
                pde = gt.read(gt.entry(gva, 2))
                if level == 1 and (not pde & P.PTE_P or pde & P.PTE_PS):
                    continue
                if level == 1:
                    value = 0 if choice == 0 else FRAMES[choice % 6] | URW
                elif choice == 0:
                    value = 0
                elif choice < 4:
                    value = spare | URW
                else:
                    value = HUGE_GPA | URW | P.PTE_PS
                guest_store(v, gt, gt.entry(gva, level), value)
            else:
                pde = gt.read(gt.entry(gva, 2))
                if not pde & P.PTE_P or pde & P.PTE_PS:
                    continue
                entry = gt.entry(gva, 1)
                if s[3]:  # the upper dword (NX in PAE; the next gPTE in 32-bit)
                    part = (1 << 31) if gt.size == 8 else 0
                    v.access(TABLE_WINDOW + entry + 4, "write", 4, part.to_bytes(4, "little"))
                else:
                    part = FRAMES[4] | URW
                    v.access(TABLE_WINDOW + entry, "write", 4, part.to_bytes(4, "little"))
            for other in vm.vcpus:
                for g in GVAS:
                    vm.mmu.invlpg(other, g)
        else:
            v.set_sregs(cr3=gt.cr3 | 0x8 if not v.cr3 & 0x8 else gt.cr3)
        assert vm.check_invariants() == [], s


@pytest.mark.parametrize("mode", MODES)
def test_prefetch_reads_gptes_of_the_guest_size(mode: str) -> None:
    """``FNAME(pte_prefetch)`` from the 8 gPTEs ``gpte_changed`` re-read
    (4-byte ones for 32-bit), here in the upper 2 MiB half (quadrant 1)."""
    vm, gt = build(mode)
    v = vm.vcpus[0]
    base = 0x1200000
    for k in range(8):
        gt.map(base + k * 0x1000, DATA + (7 - k) * 0x1000, URW | P.PTE_A)
        vm.write_guest(DATA + k * 0x1000, b"\x01")  # populated host pages only
    assert v.access(base, "read").gpa == DATA + 0x7000
    pt = gt.entry(base, 1) >> 12
    sp = next(s for s in vm.mmu.active.values() if s.gfn == pt and s.role.level == 1)
    assert sp.role.quadrant == (1 if mode == "32" else 0)
    assert [sp.gfns.get(k) for k in range(8)] == [(DATA >> 12) + 7 - k for k in range(8)]
    assert vm.stats["mmu_prefetched"] >= 7
    for k in range(8):
        check_access(v, base + k * 0x1000, "read")
    assert vm.check_invariants() == []


@pytest.mark.parametrize("mode", MODES)
def test_fault_steps_and_gpte_changed_race(mode: str) -> None:
    """The step points stay (walk, sp per level, install); a gPTE cleared in
    the walk window is caught by ``gpte_changed`` (4- or 8-byte re-read)."""
    from kvmmu.mmu.fault import RET_PF_FIXED, RET_PF_RETRY
    from kvmmu.mmu.shadow import drive

    vm, gt = build(mode)
    v = vm.vcpus[0]
    vm.mmu.reload(v)
    names: list[tuple[str, int]] = []
    r = drive(vm.mmu.page_fault_steps(v, 0x407000, 0), lambda s: names.append((s.name, s.level)))
    assert r == RET_PF_FIXED and names == [("walk", 1), ("sp", 1), ("install", 1)]
    pte = gt.entry(0x40A000, 1)

    def racer(step: object) -> None:
        if getattr(step, "name", "") == "walk":
            gt.write(pte, 0)  # lands unseen (host side), after the walk read it

    assert drive(vm.mmu.page_fault_steps(v, 0x40A000, 0), racer) == RET_PF_RETRY
    assert vm.check_invariants() == []
    assert v.access(0x40A000, "read").fault is not None
