"""Shadow paging (``tdp = false``): spec/kvm-mmu.md §2.3–2.4, §3.7–3.9, §3.12–3.15.

``GuestTables`` is a tiny builder of 4-level guest page tables in guest
memory (host-side writes, before the shadow MMU has seen them); the tables
themselves are mapped at ``TABLE_WINDOW + gpa`` so a vCPU can rewrite them.
"""

from __future__ import annotations

import errno

import kvmmu
import pytest
from kvmmu import paging as P
from kvmmu.mmu.fault import RET_PF_FIXED
from kvmmu.mmu.shadow import ShadowMmu
from kvmmu.spte import PT_WRITABLE_MASK

__all__ = ["GUEST_SIZE", "TABLE_WINDOW", "GuestTables", "make_vm"]

GUEST_SIZE = 16 << 20
HVA = 0x7F0000000000
#: The guest's own page tables are mapped here (gva = TABLE_WINDOW + gpa).
TABLE_WINDOW = 0x40000000
URW = P.PTE_P | P.PTE_RW | P.PTE_US
CR0 = P.CR0_PG | 1 | P.CR0_WP


def make_vm(vendor: str = "vmx", vcpus: int = 2, **cfg: object) -> kvmmu.VM:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=vendor, tdp=False, vcpus=vcpus, **cfg))
    vm.host.mmap_anon(HVA, GUEST_SIZE)
    vm.set_user_memory_region(0, 0, 0, GUEST_SIZE, HVA)
    return vm


class GuestTables:
    """4-level guest page tables in guest memory, built from the host side."""

    def __init__(self, vm: kvmmu.VM, base: int = 0x10000) -> None:
        self.vm = vm
        self.next = base
        self.tables: list[int] = []
        #: A spare table a test may point an entry at.
        self.spare = 0
        self.cr3 = self.alloc()

    def alloc(self) -> int:
        gpa = self.next
        self.next += 0x1000
        self.vm.write_guest(gpa, bytes(0x1000))
        self.tables.append(gpa)
        return gpa

    def read(self, gpa: int) -> int:
        return int.from_bytes(self.vm.read_guest(gpa, 8), "little")

    def write(self, gpa: int, value: int) -> None:
        self.vm.write_guest(gpa, value.to_bytes(8, "little"))

    def entry(self, gva: int, level: int) -> int:
        """The gpa of the level-``level`` entry for ``gva`` (tables made on the way)."""
        table = self.cr3
        for lvl in range(4, level, -1):
            addr = table + ((gva >> (12 + 9 * (lvl - 1))) & 511) * 8
            pte = self.read(addr)
            if not pte & P.PTE_P:
                pte = self.alloc() | URW
                self.write(addr, pte)
            table = pte & 0xFFFFFFFFFF000
        return table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8

    def map(self, gva: int, gpa: int, flags: int = URW, level: int = 1) -> int:
        """Map ``gva`` -> ``gpa``; returns the leaf entry's gpa."""
        addr = self.entry(gva, level)
        self.write(addr, gpa | flags | (P.PTE_PS if level > 1 else 0))
        return addr

    def map_tables(self) -> None:
        """Map every table page at ``TABLE_WINDOW + gpa`` (writable)."""
        done: set[int] = set()
        while set(self.tables) - done:
            for t in sorted(set(self.tables) - done):
                done.add(t)
                self.map(TABLE_WINDOW + t, t)

    def start(self, *vcpus: object) -> None:
        for v in vcpus or tuple(self.vm.vcpus):
            v.set_sregs(cr0=CR0, cr3=self.cr3, cr4=P.CR4_PAE, efer=P.EFER_LME | P.EFER_NXE)  # type: ignore[attr-defined]


def guest_write_entry(vcpu: object, entry_gpa: int, value: int) -> kvmmu.vcpu.AccessResult:
    """The guest (on ``vcpu``) stores ``value`` into its own page-table entry."""
    return vcpu.access(TABLE_WINDOW + entry_gpa, "write", 8, value.to_bytes(8, "little"))  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def env() -> tuple[kvmmu.VM, GuestTables]:
    vm = make_vm()
    gt = GuestTables(vm)
    for i in range(16):
        gt.map(0x400000 + i * 0x1000, 0x200000 + i * 0x1000)
    gt.map_tables()
    gt.start()
    return vm, gt


def test_shadow_mmu_is_built_without_tdp() -> None:
    vm = make_vm()
    assert isinstance(vm.mmu, ShadowMmu) and vm.mmu.shadow
    assert vm.spte_format.name == "shadow"


def test_fetch_builds_shadow_pages_level_by_level(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    r = vm.vcpus[0].access(0x400000, "write", 8, b"12345678")
    assert r.fault is None and r.gpa == 0x200000 and r.exits == 1
    assert vm.read_guest(0x200000, 8) == b"12345678"
    sps = sorted((sp.role.level, sp.gfn) for sp in vm.mmu.active.values())
    pt = gt.entry(0x400000, 1) >> 12
    pd = gt.entry(0x400000, 2) >> 12
    assert (1, pt) in sps and (2, pd) in sps and (4, gt.cr3 >> 12) in sps
    assert vm.check_invariants() == []


def test_account_shadowed_tracks_upper_levels_only(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """spec/kvm-mmu.md §2.4: non-leaf tables are write-tracked; a 4K table only write-protected."""
    vm, gt = env
    vm.vcpus[0].access(0x400000, "read")
    pd, pt = gt.entry(0x400000, 2) >> 12, gt.entry(0x400000, 1) >> 12
    assert vm.page_track.count(gt.cr3 >> 12) == 1
    assert vm.page_track.count(pd) == 1
    assert vm.page_track.count(pt) == 0
    slot = vm.slot_of(0)
    assert slot is not None and slot.lpage_disallowed(pt, 2)


def test_walk_sets_accessed_and_dirty(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    leaf = gt.entry(0x401000, 1)
    vm.vcpus[0].access(0x401000, "read")
    assert gt.read(leaf) & P.PTE_A and not gt.read(leaf) & P.PTE_D
    vm.vcpus[0].access(0x401000, "write", 1, b"x")
    assert gt.read(leaf) & P.PTE_D
    assert gt.read(gt.entry(0x401000, 2)) & P.PTE_A


def test_clean_gpte_maps_read_only_until_written(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """``protect_clean_gpte``: a read of a clean page gives a read-only SPTE (§3.7)."""
    vm, _gt = env
    r = vm.vcpus[0].access(0x402000, "read")
    assert r.spte is not None and not r.spte & PT_WRITABLE_MASK
    w = vm.vcpus[0].access(0x402000, "write", 1, b"y")
    assert w.exits == 1 and w.spte is not None and w.spte & PT_WRITABLE_MASK


def test_guest_fault_injected_with_error_code(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    v = vm.vcpus[0]
    r = v.access(0x900000, "write", 1, b"z")
    assert r.fault is not None and r.fault.vector == 14
    assert r.fault.error_code == P.PFERR_WRITE
    gt.map(0x403000 + 0x100000, 0x203000, P.PTE_P | P.PTE_US)
    v.set_sregs(cpl=3)
    r = v.access(0x503000, "write", 1, b"z")
    assert r.fault is not None
    assert r.fault.error_code == P.PFERR_PRESENT | P.PFERR_WRITE | P.PFERR_USER
    gt.map(0x504000, 0x204000, P.PTE_P | P.PTE_RW)
    r = v.access(0x504000, "read")
    assert r.fault is not None and r.fault.error_code == P.PFERR_PRESENT | P.PFERR_USER


def test_upper_table_write_is_emulated_and_zaps(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.13: a write to a write-tracked PD is emulated; the shadow PDE is zapped."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    new_pt = gt.alloc()
    gt.write(new_pt, 0x205000 | URW)
    w = guest_write_entry(v, pde, new_pt | URW)
    assert w.emulated and vm.stats["emulated_writes"] == 1
    r = v.access(0x400000, "read")
    assert r.gpa == 0x205000
    assert vm.check_invariants() == []


def test_misaligned_write_zaps_whole_sp(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    pd_sp = [sp for sp in vm.mmu.active.values() if sp.gfn == pde >> 12 and sp.role.level == 2]
    assert len(pd_sp) == 1
    # detect_write_misaligned: a 2-byte write (bytes < 4) is misaligned; a
    # 4-byte one would be widened to the aligned 8 bytes under PAE/long mode.
    v.access(TABLE_WINDOW + pde + 6, "write", 2, b"\0\0")
    assert pd_sp[0].invalid and vm.stats["mmu_flooded"] == 1


def test_pae_4_byte_write_is_widened_even_across_two_gptes(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """mmu_pte_write_fetch_gpte: is_pae && bytes == 4 -> gpa &= ~7, bytes = 8."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    pd_sp = [sp for sp in vm.mmu.active.values() if sp.gfn == pde >> 12 and sp.role.level == 2]
    v.access(TABLE_WINDOW + pde + 6, "write", 4, b"\0\0\0\0")
    assert not pd_sp[0].invalid and vm.stats["mmu_flooded"] == 0


def test_write_flooding_zaps_upper_sp(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """``detect_write_flooding``: the third write to a PD without a fault through it."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde1 = gt.entry(0x400000, 2) + 8 * 100
    for n in range(3):
        guest_write_entry(v, pde1, 0)
        flooded = vm.stats["mmu_flooded"]
        assert flooded == (1 if n == 2 else 0)


def test_unsync_leaf_synced_by_invlpg(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.12/§3.15: a 4K table goes unsync on a write; INVLPG syncs the entry."""
    vm, gt = env
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == 0x200000
    pte = gt.entry(0x400000, 1)
    w = guest_write_entry(v, pte, 0x20A000 | URW | P.PTE_A)
    assert not w.emulated
    pt_sp = next(sp for sp in vm.mmu.active.values() if sp.gfn == pte >> 12 and sp.role.level == 1)
    assert pt_sp.unsync and vm.stats["mmu_unsync"] == 1
    assert vm.check_invariants() == []
    assert v.access(0x400000, "read").gpa == 0x200000  # stale until the guest flushes
    vm.mmu.invlpg(v, 0x400000)
    assert v.access(0x400000, "read").gpa == 0x20A000


def test_unsync_leaf_synced_on_cr3_switch(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pte = gt.entry(0x400000, 1)
    guest_write_entry(v, pte, 0x20B000 | URW | P.PTE_A)
    old = gt.cr3
    other = GuestTables(vm, base=0x80000)
    other.map(0x400000, 0x20C000)
    v.set_sregs(cr3=other.cr3)
    assert v.access(0x400000, "read").gpa == 0x20C000
    v.set_sregs(cr3=old)
    assert v.access(0x400000, "read").gpa == 0x20B000
    assert vm.check_invariants() == []


def test_roots_per_cr3_cached(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    root = vm.mmu.vstate(v).root
    other = GuestTables(vm, base=0x80000)
    other.map(0x400000, 0x20C000)
    v.set_sregs(cr3=other.cr3)
    assert vm.mmu.vstate(v).root is not root
    assert vm.mmu.vstate(v).prev_roots[0][1] is root
    v.set_sregs(cr3=gt.cr3)
    assert vm.mmu.vstate(v).root is root
    v.set_sregs(cr0=CR0 & ~P.CR0_WP)
    assert vm.mmu.vstate(v).root is not root
    assert vm.mmu.vstate(v).root.role.cr0_wp is False  # type: ignore[union-attr]


def test_pte_prefetch_fills_the_8_entry_window(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.9: the aligned 8-entry window, from the gPTEs gpte_changed re-read."""
    vm, gt = env
    for i in range(16):
        gt.write(gt.entry(0x400000 + i * 0x1000, 1), (0x200000 + i * 0x1000) | URW | P.PTE_A)
        vm.read_guest(0x200000 + i * 0x1000, 1)
    v = vm.vcpus[0]
    v.access(0x403000, "read")
    assert vm.stats["mmu_prefetched"] == 7
    for i in range(16):
        r = v.access(0x400000 + i * 0x1000, "read")
        assert r.exits == (1 if i == 8 else 0), i
    assert vm.stats["mmu_prefetched"] == 14
    assert vm.check_invariants() == []


def test_prefetch_never_unsyncs(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """``mmu_try_to_unsync_pages``: a prefetch gets -EEXIST, so it maps read-only."""
    vm, gt = env
    pt = gt.entry(0x400000, 1) & ~0xFFF
    gt.map(0x401000, pt, URW | P.PTE_A | P.PTE_D)
    vm.read_guest(pt, 1)
    vm.vcpus[0].access(0x400000, "read")
    sp = next(s for s in vm.mmu.active.values() if s.gfn == pt >> 12 and s.role.level == 1)
    assert not sp.unsync
    assert not vm.mmu.spte(sp, 1) & PT_WRITABLE_MASK


def test_pre_fault_memory_refused() -> None:
    vm = make_vm()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.pre_fault_memory(0, 0x1000)
    assert e.value.errno == errno.EOPNOTSUPP


def test_zap_all_fast_obsoletes_roots(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, _gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    root = vm.mmu.vstate(v).root
    vm.zap_all_fast()
    assert root is not None and root.invalid
    r = v.access(0x400000, "read")
    assert r.gpa == 0x200000 and vm.mmu.vstate(v).root is not root
    assert vm.check_invariants() == []


def test_zaps_flush_their_range(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, _gt = env
    seen: list[tuple[int, int]] = []

    class Spy:
        @kvmmu.hookimpl
        def kvmmu_flush_remote_tlbs_range(self, vm: object, gfn: int, nr_pages: int) -> None:
            seen.append((gfn, nr_pages))

    vm.register_plugin(Spy(), "spy")
    vm.vcpus[0].access(0x400000, "read")
    vm.zap_gfn_range(0x200, 0x201)
    assert seen == [(0x200, 1)]
    assert vm.vcpus[0].access(0x400000, "read").exits == 1


def test_invariant_checker_sees_unnotified_table_change(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """A host-side table edit bypasses write-protection: the checker must notice."""
    vm, gt = env
    vm.vcpus[0].access(0x400000, "read")
    gt.write(gt.entry(0x400000, 2), 0)
    assert any("guest entry is not" in m for m in vm.check_invariants())


def test_mmio_gpa_emulated(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """No memslot: an MMIO SPTE (RSVD) is cached, later accesses emulate (§3.10)."""
    vm, gt = env
    gt.map(0x600000, 0x4000000)
    v = vm.vcpus[0]
    r = v.access(0x600000, "read", 4)
    assert r.emulated and r.data == b"\xff" * 4 and r.gpa == 0x4000000
    r = v.access(0x600000, "read", 4)
    assert r.emulated and vm.stats["pf_mmio_emulate"] == 1


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_both_vendors_shadow_memtype_is_host_mtrr(vendor: str) -> None:
    """§4.2: shadow SPTEs select host PAT0 (WB); the guest's PAT bits have no effect."""
    vm = make_vm(vendor)
    gt = GuestTables(vm)
    gt.map(0x400000, 0x200000, URW | P.PTE_PCD | P.PTE_PWT)
    gt.start()
    r = vm.vcpus[0].access(0x400000, "write", 8, b"abcdefgh")
    assert r.fault is None and r.memtype == kvmmu.memtype.MemType.WB
    assert r.spte is not None and not r.spte & (P.PTE_PCD | P.PTE_PWT | P.PTE_PAT)
    assert vm.check_invariants() == []


def test_page_fault_returns_ret_pf(env: tuple[kvmmu.VM, GuestTables]) -> None:
    vm, _gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    assert vm.mmu.page_fault(v, 0x405000, 0) == RET_PF_FIXED


def _unsync_mmio_entry(vm: kvmmu.VM, gt: GuestTables, gva: int, new: int) -> tuple[object, int]:
    """An MMIO SPTE for ``gva`` in a 4K table made unsync by the guest writing
    ``new`` into ``gva``'s gPTE; returns (leaf sp, index)."""
    gt.map(gva, 0x4000000, URW | P.PTE_A | P.PTE_D)
    gt.map_tables()
    v = vm.vcpus[0]
    assert v.access(gva, "read", 4).emulated
    pte = gt.entry(gva, 1)
    assert not guest_write_entry(v, pte, new).emulated
    sp = next(s for s in vm.mmu.active.values() if s.gfn == pte >> 12 and s.role.level == 1)
    i = (gva >> 12) & 511
    assert sp.unsync and kvmmu.spte.is_mmio_spte(vm.mmu.fmt, vm.mmu.spte(sp, i))
    return sp, i


def test_invlpg_syncs_unsync_mmio_spte(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.15 INVLPG: ``kvm_sync_spte`` syncs every non-zero entry of an unsync
    table, MMIO SPTEs included (``sync_mmio_spte``): a gPTE now pointing at
    RAM clears the MMIO SPTE, so the next access maps RAM instead of emulating
    the old MMIO gpa."""
    vm, gt = env
    sp, i = _unsync_mmio_entry(vm, gt, 0x600000, 0x205000 | URW | P.PTE_A)
    v = vm.vcpus[0]
    vm.mmu.invlpg(v, 0x600000)
    assert vm.mmu.spte(sp, i) == 0
    r = v.access(0x600000, "read", 4)
    assert not r.emulated and r.gpa == 0x205000
    assert vm.check_invariants() == []


def test_sync_mmio_spte_same_gfn_is_remarked(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.15 ``sync_mmio_spte``: same gfn -> the MMIO SPTE is re-marked with
    the new access (current generation), not dropped: no new fault."""
    vm, gt = env
    sp, i = _unsync_mmio_entry(vm, gt, 0x600000, 0x4000000 | P.PTE_P | P.PTE_US | P.PTE_A)
    v = vm.vcpus[0]
    old = vm.mmu.spte(sp, i)
    assert kvmmu.spte.get_mmio_spte_access(vm.mmu.fmt, old) & kvmmu.spte.ACC_WRITE_MASK
    vm.mmu.invlpg(v, 0x600000)
    spte = vm.mmu.spte(sp, i)
    assert kvmmu.spte.is_mmio_spte(vm.mmu.fmt, spte)
    assert kvmmu.spte.get_mmio_spte_gfn(spte) == 0x4000
    assert not kvmmu.spte.get_mmio_spte_access(vm.mmu.fmt, spte) & kvmmu.spte.ACC_WRITE_MASK
    created = vm.stats["pf_mmio_spte_created"]
    assert v.access(0x600000, "read", 4).emulated
    assert vm.stats["pf_mmio_spte_created"] == created


def test_invlpg_of_non_canonical_address_is_a_nop(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.15 ``kvm_mmu_invalidate_addr``: INVLPG of a non-canonical address does
    nothing, even though its table indices alias a canonical one."""
    vm, gt = env
    v = vm.vcpus[0]
    assert v.access(0x400000, "read").gpa == 0x200000
    pte = gt.entry(0x400000, 1)
    guest_write_entry(v, pte, 0x20A000 | URW | P.PTE_A)
    vm.mmu.invlpg(v, 0xFFFF000000400000)
    assert v.access(0x400000, "read").gpa == 0x200000
    vm.mmu.invlpg(v, 0x400000)
    assert v.access(0x400000, "read").gpa == 0x20A000


def test_prefetch_gpte_needs_a_writable_pfn() -> None:
    """§3.9 ``FNAME(prefetch_gpte)``: ``gfn_to_pfn_memslot_atomic`` asks for a
    writable pfn, so nothing in a read-only memslot is prefetched (the scan
    stops at the first failure); the faulting page itself is mapped."""
    vm = make_vm()
    ro_hva = HVA + (64 << 20)
    vm.host.mmap_anon(ro_hva, 1 << 20)
    vm.set_user_memory_region(1, kvmmu.KVM_MEM_READONLY, 0x2000000, 1 << 20, ro_hva)
    gt = GuestTables(vm)
    for i in range(8):
        gt.map(0x400000 + i * 0x1000, 0x2000000 + i * 0x1000, URW | P.PTE_A)
        vm.read_guest(0x2000000 + i * 0x1000, 1)
    gt.start()
    r = vm.vcpus[0].access(0x403000, "read")
    assert r.fault is None and r.gpa == 0x2003000
    assert vm.stats["mmu_prefetched"] == 0
    assert vm.check_invariants() == []


def test_pte_prefetch_of_direct_sp(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.9: ``FNAME(pte_prefetch)`` delegates a direct sp (a guest 2M page
    mapped at 4K because the host page is 4K) to ``__direct_pte_prefetch``:
    the window's runs of populated host pages are mapped too."""
    vm, gt = env
    gt.map(0x800000, 0x600000, URW | P.PTE_A | P.PTE_D, level=2)
    for i in range(8):
        if i != 5:
            vm.read_guest(0x600000 + i * 0x1000, 1)
    v = vm.vcpus[0]
    r = v.access(0x803000, "read")
    assert r.gpa == 0x603000 and r.level == 1
    # 0..2 (run before the faulting entry), then 4 (5 is not populated: the
    # second run pins only its prefix, 4).
    assert vm.stats["mmu_prefetched"] == 4
    for i in range(8):
        exits = v.access(0x800000 + i * 0x1000, "read").exits
        assert exits == (1 if i == 5 else 0), i  # 5's fault prefetches 6 and 7
    assert vm.stats["mmu_prefetched"] == 6
    assert vm.check_invariants() == []


def test_pte_prefetch_with_guest_paging_off() -> None:
    """§3.9: with guest paging off the fault is ``direct_map``, whose leaf sp
    is direct: ``direct_pte_prefetch`` fills the window from populated pages."""
    vm = make_vm()
    for i in range(8):
        vm.read_guest(0x300000 + i * 0x1000, 1)
    v = vm.vcpus[0]
    v.set_sregs(cr0=1, cr3=0, cr4=0, efer=0)
    assert v.access(0x302000, "read").gpa == 0x302000
    assert vm.stats["mmu_prefetched"] == 7
    assert v.access(0x307000, "read").exits == 0


def test_unaccount_shadowed_reverses_account_shadowed(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§2.4 ``unaccount_shadowed``: zapping the sps drops the write-track count
    of an upper table and re-allows large pages over a 4K table's gfn."""
    vm, gt = env
    vm.vcpus[0].access(0x400000, "read")
    pd, pt = gt.entry(0x400000, 2) >> 12, gt.entry(0x400000, 1) >> 12
    n = vm.mmu.indirect_shadow_pages
    slot = vm.slot_of(0)
    assert slot is not None
    disallowed = int(slot.lpage_info[2][pt >> 9])
    for sp in [s for s in vm.mmu.active.values() if s.gfn in (pd, pt)]:
        vm.mmu.zap_page(sp)
    assert vm.mmu.indirect_shadow_pages == n - 2
    assert vm.page_track.count(pd) == 0
    assert pd >> 9 == pt >> 9  # one 2M frame: both sps counted in it
    assert int(slot.lpage_info[2][pt >> 9]) == disallowed - 2


def test_cr0_wp0_supervisor_write_to_read_only_gpte() -> None:
    """§3.7 step 7: CR0.WP=0, a supervisor write to a read-only guest page
    gets ``pte_access |= W, &= ~U`` (and ``&= ~X`` with SMEP)."""
    vm = make_vm()
    gt = GuestTables(vm)
    gt.map(0x400000, 0x200000, P.PTE_P | P.PTE_US | P.PTE_A | P.PTE_D)
    v = vm.vcpus[0]
    v.set_sregs(
        cr0=CR0 & ~P.CR0_WP, cr3=gt.cr3, cr4=P.CR4_PAE | P.CR4_SMEP, efer=P.EFER_LME | P.EFER_NXE
    )
    r = v.access(0x400000, "write", 1, b"w")
    assert r.fault is None and not r.emulated
    assert r.spte is not None and r.spte & PT_WRITABLE_MASK
    assert not r.spte & vm.mmu.fmt.user_mask and r.spte & vm.mmu.fmt.nx_mask
    assert vm.read_guest(0x200000, 1) == b"w"


def test_fault_through_an_sp_clears_its_write_flooding_count(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """§3.8 step 2: ``FNAME(fetch)`` clears the flooding count of every sp on
    the path, so writes separated by faults through the PD never flood it."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pd = gt.entry(0x400000, 2)
    pd_sp = next(s for s in vm.mmu.active.values() if s.gfn == pd >> 12 and s.role.level == 2)
    for _n in range(2):
        guest_write_entry(v, pd + 8 * 100, 0)
    assert pd_sp.write_flooding_count == 2
    v.access(0x408000, "read")
    assert pd_sp.write_flooding_count == 0
    guest_write_entry(v, pd + 8 * 100, 0)
    assert not pd_sp.invalid and vm.stats["mmu_flooded"] == 0


def test_prefetch_invalid_gpte_stops_at_an_unaccessed_gpte(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """§3.9 ``prefetch_invalid_gpte``: a gPTE with A clear (the guest has A/D)
    is not prefetched and ends the scan; prefetched SPTEs lack Accessed."""
    vm, gt = env
    for i in range(8):
        flags = URW if i == 5 else URW | P.PTE_A
        gt.write(gt.entry(0x400000 + i * 0x1000, 1), (0x200000 + i * 0x1000) | flags)
        vm.read_guest(0x200000 + i * 0x1000, 1)
    v = vm.vcpus[0]
    v.access(0x402000, "read")
    assert vm.stats["mmu_prefetched"] == 4  # 0, 1, (2 faulted), 3, 4; stops at 5
    sp = next(s for s in vm.mmu.active.values() if s.role.level == 1 and not s.role.direct)
    assert vm.mmu.spte(sp, 5) == 0 and vm.mmu.spte(sp, 6) == 0
    assert not vm.mmu.spte(sp, 0) & vm.mmu.fmt.accessed_mask
    assert vm.mmu.spte(sp, 2) & vm.mmu.fmt.accessed_mask


def test_one_byte_write_at_a_gpte_start_is_not_misaligned(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """§3.13 ``detect_write_misaligned``: a 1-byte write at a gPTE-aligned
    offset (``clear_bit``) zaps only that SPTE, not the whole sp."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pde = gt.entry(0x400000, 2)
    pd_sp = next(s for s in vm.mmu.active.values() if s.gfn == pde >> 12 and s.role.level == 2)
    i = (pde & 0xFFF) // 8
    assert vm.mmu.spte(pd_sp, i)
    assert v.access(TABLE_WINDOW + pde, "write", 1, bytes([URW])).emulated
    assert not pd_sp.invalid and vm.stats["mmu_flooded"] == 0
    assert vm.mmu.spte(pd_sp, i) == 0
    v.access(TABLE_WINDOW + pde + 1, "write", 1, b"\0")
    assert pd_sp.invalid and vm.stats["mmu_flooded"] == 1


def test_validate_direct_spte_rebuilds_when_the_dirty_bit_changes(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """§3.8 ``validate_direct_spte``: a read of a clean guest 2M page builds a
    direct sp without W; the first write sets D, so the direct child of the
    other access is dropped and a writable one linked."""
    vm, gt = env
    gt.map(0x800000, 0x600000, URW | P.PTE_A, level=2)
    v = vm.vcpus[0]
    v.access(0x801000, "read")
    old = next(s for s in vm.mmu.active.values() if s.role.direct and s.gfn == 0x600)
    assert not old.role.access & kvmmu.spte.ACC_WRITE_MASK
    r = v.access(0x801000, "write", 1, b"d")
    assert r.fault is None and r.spte is not None and r.spte & PT_WRITABLE_MASK
    new = next(
        s for s in vm.mmu.active.values() if s.role.direct and s.gfn == 0x600 and s is not old
    )
    assert new.role.access & kvmmu.spte.ACC_WRITE_MASK and new.parent_ptes
    assert not old.parent_ptes
    assert vm.check_invariants() == []


def test_track_write_counts_pde_zapped_by_the_new_gpte(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.13 ``kvm_mmu_track_write``: ``mmu_pde_zapped`` counts each written
    entry of an upper-level sp when the new gPTE (``mmu_pte_write_fetch_gpte``)
    is non-zero, whether or not a SPTE was there; a zero gPTE is not counted."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pd = gt.entry(0x400000, 2)
    spare = gt.alloc()
    guest_write_entry(v, pd + 8 * 100, spare | URW)  # no SPTE there
    assert vm.stats["mmu_pde_zapped"] == 1
    guest_write_entry(v, pd, 0)  # a present SPTE, but gentry == 0
    assert vm.stats["mmu_pde_zapped"] == 1
    assert vm.stats["mmu_pte_write"] == 2


def test_track_write_without_indirect_shadow_pages_does_nothing() -> None:
    """§3.13: ``indirect_shadow_pages == 0`` -> return at once (no stat)."""
    vm = make_vm()
    assert vm.mmu.indirect_shadow_pages == 0
    vm.mmu.track_write(0x10000, b"\0" * 8)
    assert vm.stats["mmu_pte_write"] == 0


def test_walk_skips_a_d_update_of_tables_in_a_read_only_slot() -> None:
    """§3.7 ``update_accessed_dirty_bits``: tables in read-only host mappings
    (``walker->pte_writable`` false: a ``KVM_MEM_READONLY`` slot) are skipped;
    the walk still succeeds and the guest memory is left unchanged."""
    vm = make_vm()
    ro = HVA + (64 << 20)
    base = 0x2000000
    vm.host.mmap_anon(ro, 1 << 20)
    vm.set_user_memory_region(1, kvmmu.KVM_MEM_READONLY, base, 1 << 20, ro)

    def host_write(gpa: int, value: int) -> None:
        pfn = vm.host.hva_to_pfn(ro + (gpa & ~0xFFF) - base, write=True)
        vm.host.write_phys((pfn << 12) + (gpa & 0xFFF), value.to_bytes(8, "little"))

    host_write(base, (base + 0x1000) | URW)
    host_write(base + 0x1000, (base + 0x2000) | URW)
    host_write(base + 0x2000 + 2 * 8, (base + 0x3000) | URW)
    host_write(base + 0x3000, 0x200000 | URW)
    v = vm.vcpus[0]
    v.set_sregs(cr0=CR0, cr3=base, cr4=P.CR4_PAE, efer=P.EFER_LME | P.EFER_NXE)
    r = v.access(0x400000, "write", 1, b"a")
    assert r.fault is None and r.gpa == 0x200000
    assert vm.read_guest(0x200000, 1) == b"a"
    for gpa in (base, base + 0x1000, base + 0x2000 + 16, base + 0x3000):
        assert not int.from_bytes(vm.read_guest(gpa, 8), "little") & (P.PTE_A | P.PTE_D)


def test_new_pgd_clears_the_root_write_flooding_count(env: tuple[kvmmu.VM, GuestTables]) -> None:
    """§3.15 ``kvm_mmu_new_pgd``: switching to a cached root resets its
    write-flooding count (``__clear_sp_write_flooding_count``)."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    root = vm.mmu.vstate(v).root
    assert root is not None
    for _n in range(2):
        vm.mmu.track_write(gt.cr3 + 8 * 300, bytes(8))
    assert root.write_flooding_count == 2
    other = GuestTables(vm, base=0x80000)
    v.set_sregs(cr3=other.cr3)
    v.set_sregs(cr3=gt.cr3)
    assert vm.mmu.vstate(v).root is root and root.write_flooding_count == 0


def test_direct_upper_lookup_zaps_unsync_sps_of_the_gfn() -> None:
    """§3.15/§2.4 ``kvm_mmu_find_shadow_page``: a lookup above 4K zaps unsync
    sps of the same gfn, also for a direct role (guest paging off: the
    direct root of gfn 0 zaps an unsync guest PT at gfn 0)."""
    vm = make_vm()
    gt = GuestTables(vm, base=0x10000)
    gt.write(gt.entry(0x400000, 2), 0x0 | URW)  # 0x400000's page table is at gpa 0
    gt.write(0x0, 0x200000 | URW | P.PTE_A)
    gt.map(0x600000, 0x0, URW | P.PTE_A | P.PTE_D)  # and is writable at 0x600000
    gt.start()
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pt = next(s for s in vm.mmu.active.values() if s.gfn == 0 and s.role.level == 1)
    assert v.access(0x600000, "write", 1, b"\0").fault is None
    assert pt.unsync
    v.set_sregs(cr0=1, cr3=0, cr4=0, efer=0)
    v.access(0x1000, "read")
    assert pt.invalid


def test_unprotect_page_zaps_every_indirect_sp_of_the_gfn(
    env: tuple[kvmmu.VM, GuestTables],
) -> None:
    """§3.13 ``kvm_mmu_unprotect_page``: all indirect sps of the gfn are
    zapped (the PD's write-track goes with them); the next fault rebuilds."""
    vm, gt = env
    v = vm.vcpus[0]
    v.access(0x400000, "read")
    pd = gt.entry(0x400000, 2) >> 12
    sps = [s for s in vm.mmu.active.values() if s.gfn == pd]
    assert sps and vm.page_track.count(pd) == 1
    assert vm.mmu.unprotect_page(pd) is True
    assert all(s.invalid for s in sps) and vm.page_track.count(pd) == 0
    assert vm.mmu.unprotect_page(pd) is False
    assert v.access(0x400000, "read").gpa == 0x200000
    assert vm.check_invariants() == []


def test_mmio_generation_wrap_zaps_all_fast_under_shadow_paging() -> None:
    """§3.10: kvm_arch_memslots_updated is generic x86 code: a wrap of the MMIO
    generation obsoletes the shadow MMU's roots too."""
    from kvmmu.spte import MMIO_SPTE_GEN_MASK

    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", tdp=False))
    vm.host.mmap_anon(0x7000_0000_0000, 4 << 20)
    vm.set_user_memory_region(0, 0, 0, 2 << 20, 0x7000_0000_0000)
    vm.memslots._gen[0] = MMIO_SPTE_GEN_MASK + 1 - vm.memslots.nr_as_ids
    vm.set_user_memory_region(1, 0, 2 << 20, 2 << 20, 0x7000_0020_0000)
    assert vm.stats["mmu_zap_all_fast"] == 1


def test_dirty_log_enable_flushes_whole_slot_and_disable_recovers_huge_pages() -> None:
    """kvm-mmu-2 §7.1: enabling logging write-protects and always flushes the
    whole slot; disabling zaps collapsible 4K SPTEs of direct sps (§5.3) so the
    next fault maps the guest's 2M page huge again."""
    flushes: list[tuple[int, int]] = []

    class Rec:
        @kvmmu.hookimpl
        def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
            flushes.append((gfn, nr_pages))

    hva = 0x7000_0000_0000
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", tdp=False))
    vm.host.mmap_anon(hva, 8 << 20, page_level=2)
    vm.set_user_memory_region(0, 0, 0, 8 << 20, hva)
    vm.register_plugin(Rec(), "rec")
    v = vm.vcpus[0]  # guest paging off: direct shadow pages, huge where possible
    v.access(0x40_0000, "read")
    assert v.access(0x40_0000, "read").level == 2
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, hva)
    assert (0, 2048) in flushes  # the whole slot
    v.access(0x40_1000, "write", 8, b"\x01" * 8)  # logging: 4K
    assert v.access(0x40_1000, "read").level == 1
    vm.set_user_memory_region(0, 0, 0, 8 << 20, hva)  # disable: recover huge pages
    assert v.access(0x40_1000, "read").level == 2
    assert vm.check_invariants() == []
