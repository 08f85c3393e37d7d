"""Vendor plugins through real VMs: leaf SPTE memtypes, zaps and huge-page levels.

Every check runs a guest read (``vcpu.access``) through a real ``kvmmu.VM``:
a RAM memslot, a host BAR memslot (host mapping UC), long-mode page tables
in guest memory, the guest PAT and MTRRs written with ``vcpu.set_msr``.
Rules: spec/memtype.md §5 (EPT combination), §7 (``vmx_get_mt_mask`` per
era, ``arch/x86/kvm/vmx/vmx.c``), §8 (MTRR-consistent huge pages,
``arch/x86/kvm/mmu/mmu.c``), §9 (NPT), §11 (noncoherent DMA, CR0.CD zaps,
``arch/x86/kvm/x86.c``, ``arch/x86/kvm/mtrr.c: update_mtrr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import kvmmu
import pytest
from kvmmu.guest_pt import GuestPageTables
from kvmmu.memtype import (
    ALL_GFNS_END,
    CR0_CD,
    MSR_IA32_CR_PAT,
    MSR_MTRR_DEF_TYPE,
    MTRR_DEF_TYPE_E,
    MemType,
    effective_type,
    make_pat,
    mtrr_physbase,
    mtrr_physmask,
    pat_entries,
)
from kvmmu.quirks import KVM_X86_QUIRK_IGNORE_GUEST_PAT
from kvmmu.vcpu import AccessResult, VCpu

UC, WC, WT, WP, WB, UCM = (
    MemType.UC,
    MemType.WC,
    MemType.WT,
    MemType.WP,
    MemType.WB,
    MemType.UC_MINUS,
)
MIB = 1 << 20
RAM_HVA, RAM_SIZE = 0x7F00_0000_0000, 8 * MIB
PT_GPA, PT_SIZE = 0x10_0000, 0x1_0000
#: The 2 MiB guest region [4M, 6M): guest MTRR WT (one variable range).
HUGE_GPA = 4 * MIB
#: A RAM page inside it, and a 4K page whose own MTRR would split it.
RAM_GPA = HUGE_GPA
HOLE_GPA = HUGE_GPA + 0x10_0000
#: A RAM page outside every variable range (default type WB).
PLAIN_GPA = 6 * MIB
#: Pages at PAT_GPA + 4K * i use guest PAT entry i.
PAT_GPA = 0x30_0000
MMIO_HVA, MMIO_GPA, MMIO_HPA, MMIO_SIZE = 0x7E00_0000_0000, 0xC000_0000, 0xFE00_0000, 0x1_0000
#: Guest PAT: PA0..PA5 = WB, WC, UC-, UC, WT, WP (SDM Vol 3A Table 11-11).
GUEST_PAT = make_pat(WB, WC, UCM, UC, WT, WP)
PAT_INDEX = {t: pat_entries(GUEST_PAT).index(t) for t in MemType}
MTRR_V = 1 << 11
#: Variable-MTRR slots used below.
VAR_HUGE, VAR_HOLE, VAR_PLAIN = 0, 1, 2
#: x86 PTE PWT, PCD, and the PAT bit of a 4K leaf and of a 2M/1G leaf (SDM §11.12.3).
PWT, PCD, PAT4K, PAT_HUGE = 1 << 3, 1 << 4, 1 << 7, 1 << 12


@dataclass
class FlushRecorder:
    """A consumer plugin recording ``kvm_flush_remote_tlbs_range`` calls."""

    calls: list[tuple[int, int]] = field(default_factory=list)

    @kvmmu.hookimpl
    def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        self.calls.append((gfn, nr_pages))

    def covers(self, gpa: int) -> bool:
        gfn = gpa >> 12
        return any(start <= gfn < start + n for start, n in self.calls)


@dataclass
class Guest:
    vm: Any
    vcpu: VCpu
    flushes: FlushRecorder

    def read(self, gpa: int) -> AccessResult:
        r = self.vcpu.access(gpa, "read")
        assert r.fault is None and r.spte is not None and r.memtype is not None, r
        return r

    def mapped(self, gpa: int) -> bool:
        """Whether the MMU currently has a leaf SPTE for ``gpa``."""
        return self.vm.mmu.translate(gpa) is not None

    def set_var_mtrr(self, n: int, base: int, size: int, mt: MemType) -> None:
        mask = ((1 << self.vm.config.host_maxphyaddr) - 1) & ~(size - 1)
        self.vcpu.set_msr(mtrr_physbase(n), base | int(mt))
        self.vcpu.set_msr(mtrr_physmask(n), mask | MTRR_V)

    def set_cd(self, cd: bool) -> None:
        cr0 = self.vcpu.cr0
        self.vcpu.set_sregs(cr0=(cr0 | CR0_CD) if cd else (cr0 & ~CR0_CD))


def guest(
    vendor: str = "vmx",
    era: str = "6.16",
    *,
    disabled: tuple[str, ...] = (),
    noncoh: bool = False,
    cd: bool = False,
    self_snoop: bool = True,
    tdp: bool = True,
    hole: bool = False,
) -> Guest:
    """A VM as its VMM and guest set it up, before any access.

    RAM is THP-backed (2 MiB host pages). Guest MTRRs: default WB, [4M, 6M)
    WT, and with ``hole`` a 4K UC range inside it.
    """
    vm = kvmmu.VM(
        kvmmu.VMConfig(
            vendor=vendor,
            era=era,
            tdp=tdp,
            host_self_snoop=self_snoop,
            quirks=dict.fromkeys(disabled, False),
        )
    )
    vm.host.mmap_anon(RAM_HVA, RAM_SIZE, page_level=2)
    vm.set_user_memory_region(0, 0, 0, RAM_SIZE, RAM_HVA)
    vm.host.map_mmio(MMIO_HVA, MMIO_SIZE, hpa=MMIO_HPA, memtype=UC)
    vm.set_user_memory_region(1, 0, MMIO_GPA, MMIO_SIZE, MMIO_HVA)
    pt = GuestPageTables(vm, PT_GPA, PT_SIZE)
    pt.map(HUGE_GPA, HUGE_GPA, 2 * MIB, page_size=2 * MIB)
    for gpa in (PLAIN_GPA, MMIO_GPA):
        pt.map(gpa, gpa, 4096)
    for t, i in PAT_INDEX.items():
        pt.map(PAT_GPA + 4096 * i, PAT_GPA + 4096 * i, 4096, pat_index=i)
        assert pat_entries(GUEST_PAT)[i] is t
    flushes = FlushRecorder()
    vm.register_plugin(flushes, "flush-recorder")
    g = Guest(vm, vm.vcpus[0], flushes)
    g.vcpu.set_msr(MSR_IA32_CR_PAT, GUEST_PAT)
    g.set_var_mtrr(VAR_HUGE, HUGE_GPA, 2 * MIB, WT)
    if hole:
        g.set_var_mtrr(VAR_HOLE, HOLE_GPA, 4096, UC)
    g.vcpu.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | int(WB))
    if noncoh:
        vm.register_noncoherent_dma()
    sregs = pt.long_mode_sregs()
    g.vcpu.set_sregs(**{**sregs, "cr0": sregs["cr0"] | (CR0_CD if cd else 0)})
    flushes.calls.clear()
    return g


def ept_bits(spte: int) -> tuple[MemType, bool]:
    """EPT leaf memtype (bits 5:3) and IPAT (bit 6); SDM "EPT and Memory Typing"."""
    return MemType((spte >> 3) & 7), bool(spte & (1 << 6))


# ------------------------------------------------- spec/memtype.md §7 rows

_Q = "cd_nw_cleared"
_IGP = "ignore_guest_pat"
#: (id, era, disabled quirks, noncoherent DMA, guest CR0.CD, self-snoop, RAM memtype/IPAT).
#: The RAM page's guest MTRR type is WT, so "guest MTRR type" rows read WT.
MT_MASK_ROWS = [
    ("2_6_32_coherent_is_wb_ipat", "2.6.32", (), False, False, True, (WB, True)),
    ("2_6_32_noncoh_is_guest_mtrr_no_ipat", "2.6.32", (), True, False, True, (WT, False)),
    ("2_6_32_noncoh_cd_not_considered", "2.6.32", (), True, True, True, (WT, False)),
    ("3_13_coherent_is_wb_ipat", "3.13", (), False, False, True, (WB, True)),
    ("3_13_noncoh_is_guest_mtrr_no_ipat", "3.13", (), True, False, True, (WT, False)),
    ("3_13_noncoh_cd_not_considered", "3.13", (), True, True, True, (WT, False)),
    ("4_2_coherent_cd_quirk_off_is_wb_ipat", "4.2", (_Q,), False, True, True, (WB, True)),
    ("4_2_noncoh_cd_quirk_on_is_wb_ipat", "4.2", (), True, True, True, (WB, True)),
    ("4_2_noncoh_cd_quirk_off_is_uc_ipat", "4.2", (_Q,), True, True, True, (UC, True)),
    ("4_2_noncoh_is_guest_mtrr_no_ipat", "5.10", (), True, False, True, (WT, False)),
    ("6_7_coherent_is_wb_ipat", "6.7", (), False, False, True, (WB, True)),
    ("6_7_noncoh_cd_quirk_on_is_wb_no_ipat", "6.7", (), True, True, True, (WB, False)),
    ("6_7_noncoh_cd_quirk_off_is_uc_ipat", "6.8", (_Q,), True, True, True, (UC, True)),
    ("6_7_noncoh_is_guest_mtrr_no_ipat", "6.10", (), True, False, True, (WT, False)),
    ("6_11_coherent_self_snoop_is_wb_no_ipat", "6.11", (), False, False, True, (WB, False)),
    ("6_11_coherent_no_self_snoop_is_wb_ipat", "6.11", (), False, False, False, (WB, True)),
    ("6_11_noncoh_cd_quirk_off_is_wb_no_ipat", "6.11", (_Q,), True, True, True, (WB, False)),
    ("6_12_coherent_is_wb_ipat", "6.12", (), False, False, True, (WB, True)),
    ("6_12_noncoh_is_wb_no_ipat", "6.14", (), True, False, True, (WB, False)),
    ("6_12_noncoh_cd_quirk_off_is_wb_no_ipat", "6.15", (_Q,), True, True, True, (WB, False)),
    ("6_16_quirk_on_coherent_is_wb_ipat", "6.16", (), False, False, True, (WB, True)),
    ("6_16_quirk_off_is_wb_no_ipat", "6.16", (_IGP,), False, False, True, (WB, False)),
    ("6_16_noncoh_is_wb_no_ipat", "6.16", (), True, False, True, (WB, False)),
    ("6_16_noncoh_cd_quirk_off_is_wb_no_ipat", "6.16", (_Q,), True, True, True, (WB, False)),
]


@pytest.mark.parametrize(
    ("era", "disabled", "noncoh", "cd", "snoop", "ram"),
    [pytest.param(*row[1:], id=row[0]) for row in MT_MASK_ROWS],
)
def test_mt_mask_memtype_7_row_real_vm(
    era: str,
    disabled: tuple[str, ...],
    noncoh: bool,
    cd: bool,
    snoop: bool,
    ram: tuple[MemType, bool],
) -> None:
    """RAM leaf = the §7 cell; the host BAR is UC without IPAT in every row."""
    g = guest("vmx", era, disabled=disabled, noncoh=noncoh, cd=cd, self_snoop=snoop)
    r = g.read(RAM_GPA)
    assert ept_bits(r.spte or 0) == ram
    # Guest PAT WB: Table 11-7 gives the EPT memtype back, as IPAT does (§5).
    assert r.memtype is ram[0]
    m = g.read(MMIO_GPA)
    assert ept_bits(m.spte or 0) == (UC, False)
    assert m.memtype is UC


def test_mt_mask_6_7_noncoh_cd_quirk_on_is_wb_no_ipat_real_vm() -> None:
    """8925b3194512: with the quirk, guest CD maps WB without IPAT, so guest PAT counts."""
    g = guest("vmx", "6.8", noncoh=True, cd=True)
    for t, i in PAT_INDEX.items():
        r = g.read(PAT_GPA + 4096 * i)
        assert ept_bits(r.spte or 0) == (WB, False)
        assert r.memtype is effective_type(WB, t)


def test_mt_mask_mmio_uc_no_ipat_only_guest_wc_survives_real_vm() -> None:
    """§5/§7: host BAR UC without IPAT; guest WC stays WC, every other type is UC."""
    g = guest("vmx", "6.16")
    pt = GuestPageTables(g.vm, PT_GPA + PT_SIZE, PT_SIZE)
    for i in PAT_INDEX.values():
        pt.map(MMIO_GPA + 4096 * (i + 1), MMIO_GPA + 4096 * (i + 1), 4096, pat_index=i)
    g.vcpu.set_sregs(cr3=pt.cr3)
    for t, i in PAT_INDEX.items():
        r = g.read(MMIO_GPA + 4096 * (i + 1))
        assert ept_bits(r.spte or 0) == (UC, False)
        assert r.memtype is (WC if t is WC else UC)


# ------------------------------------ spec/memtype.md §11.1 noncoherent DMA


@pytest.mark.parametrize(
    ("era", "noncoh_ram"),
    [
        pytest.param("6.7", (WT, False), id="6_7_zaps_rebuilds_guest_mtrr"),
        pytest.param("6.11", (WB, False), id="6_11_zaps_rebuilds_wb"),
        pytest.param("6.14", (WB, False), id="6_12_zaps_rebuilds_wb_no_ipat"),
        pytest.param("6.16", (WB, False), id="6_16_quirk_on_zaps_rebuilds_wb_no_ipat"),
    ],
)
def test_noncoh_dma_first_and_last_registration_zap_all_real_vm(
    era: str, noncoh_ram: tuple[MemType, bool]
) -> None:
    """68c320298404: the 0->1 and 1->0 transitions zap every gfn (EPT / quirk on)."""
    g = guest("vmx", era, self_snoop=era != "6.11")
    before = ept_bits(g.read(RAM_GPA).spte or 0)
    g.read(MMIO_GPA)
    g.vm.register_noncoherent_dma()
    assert not g.mapped(RAM_GPA) and not g.mapped(MMIO_GPA)
    assert g.flushes.covers(RAM_GPA) and g.flushes.covers(MMIO_GPA)
    assert ept_bits(g.read(RAM_GPA).spte or 0) == noncoh_ram
    # 1 -> 2 and 2 -> 1 are not transitions: nothing is zapped.
    g.flushes.calls.clear()
    g.vm.register_noncoherent_dma()
    g.vm.unregister_noncoherent_dma()
    assert g.mapped(RAM_GPA) and g.flushes.calls == []
    g.vm.unregister_noncoherent_dma()
    assert not g.mapped(RAM_GPA) and g.flushes.covers(RAM_GPA)
    assert ept_bits(g.read(RAM_GPA).spte or 0) == before


@pytest.mark.parametrize(
    ("vendor", "era", "disabled", "tdp"),
    [
        pytest.param("vmx", "5.10", (), True, id="vmx_4_2_no_zap_before_6_7"),
        pytest.param("vmx", "3.13", (), True, id="vmx_3_13_no_zap_before_6_7"),
        pytest.param("vmx", "6.16", (_IGP,), True, id="vmx_6_16_quirk_off_no_zap"),
        pytest.param("vmx", "6.8", (), False, id="vmx_6_7_shadow_paging_no_zap"),
        pytest.param("svm", "6.8", (), True, id="svm_npt_no_memtype_mask_no_zap"),
        pytest.param("svm", "6.16", (), True, id="svm_6_16_quirk_inapplicable_no_zap"),
        pytest.param("vmx", "6.11", (), True, id="vmx_6_11_self_snoop_honours_pat_no_zap"),
    ],
)
def test_noncoh_dma_registration_does_not_zap_real_vm(
    vendor: str, era: str, disabled: tuple[str, ...], tdp: bool
) -> None:
    """§11.1: no zap before 6.7, without EPT (6.7–6.15) or with the quirk off (6.16+)."""
    g = guest(vendor, era, disabled=disabled, tdp=tdp)
    old = g.read(RAM_GPA).spte
    g.vm.register_noncoherent_dma()
    g.vm.unregister_noncoherent_dma()
    assert g.flushes.calls == []
    assert not tdp or g.mapped(RAM_GPA)
    assert g.read(RAM_GPA).spte == old


def test_noncoh_dma_before_6_7_leaves_stale_wb_ipat_real_vm() -> None:
    """§11.1 "Before 6.7 no zap": an SPTE built before registration keeps WB|IPAT."""
    g = guest("vmx", "5.10")
    g.read(RAM_GPA)
    g.vm.register_noncoherent_dma()
    assert ept_bits(g.read(RAM_GPA).spte or 0) == (WB, True)
    g.vm.zap_gfn_range(0, ALL_GFNS_END)
    assert ept_bits(g.read(RAM_GPA).spte or 0) == (WT, False)


# ------------------------------------------------ spec/memtype.md §11.2 CR0.CD


@pytest.mark.parametrize(
    ("vendor", "era", "after"),
    [
        pytest.param("vmx", "4.2", (UC, True), id="vmx_4_2_noncoh_quirk_off_zaps_uc_ipat"),
        pytest.param("vmx", "6.8", (UC, True), id="vmx_6_7_noncoh_quirk_off_zaps_uc_ipat"),
        pytest.param("svm", "5.10", None, id="svm_4_2_noncoh_quirk_off_zaps"),
    ],
)
def test_cr0_cd_toggle_zaps_all_4_2_to_6_10_real_vm(
    vendor: str, era: str, after: tuple[MemType, bool] | None
) -> None:
    """``kvm_post_set_cr0``: noncoherent DMA, CD_NW_CLEARED off (and EPT from 6.7)."""
    g = guest(vendor, era, disabled=(_Q,), noncoh=True)
    g.read(RAM_GPA)
    g.read(MMIO_GPA)
    g.set_cd(True)
    assert not g.mapped(RAM_GPA) and not g.mapped(MMIO_GPA)
    assert g.flushes.covers(RAM_GPA)
    r = g.read(RAM_GPA)
    if after is not None:
        assert ept_bits(r.spte or 0) == after
    else:  # SVM: hardware CR0.CD is the guest's once the quirk is off (§11.3).
        assert r.memtype is UC
    g.flushes.calls.clear()
    g.set_cd(False)
    assert not g.mapped(RAM_GPA) and g.flushes.covers(RAM_GPA)


@pytest.mark.parametrize(
    ("vendor", "era", "disabled", "noncoh"),
    [
        pytest.param("vmx", "5.10", (), True, id="vmx_4_2_quirk_on_no_zap"),
        pytest.param("vmx", "5.10", (_Q,), False, id="vmx_4_2_coherent_no_zap"),
        pytest.param("vmx", "6.8", (), True, id="vmx_6_7_quirk_on_no_zap"),
        pytest.param("vmx", "6.8", (_Q,), False, id="vmx_6_7_coherent_no_zap"),
        pytest.param("svm", "6.8", (_Q,), True, id="svm_6_7_not_ept_no_zap"),
        pytest.param("vmx", "6.11", (_Q,), True, id="vmx_6_11_removed_no_zap"),
        pytest.param("vmx", "6.16", (_Q,), True, id="vmx_6_16_removed_no_zap"),
        pytest.param("vmx", "3.13", (), True, id="vmx_3_13_before_quirk_no_zap"),
    ],
)
def test_cr0_cd_toggle_does_not_zap_real_vm(
    vendor: str, era: str, disabled: tuple[str, ...], noncoh: bool
) -> None:
    """§11.2: no CR0.CD zap outside its conditions, none from 6.11 (e1548088ff54)."""
    g = guest(vendor, era, disabled=disabled, noncoh=noncoh)
    old = g.read(RAM_GPA).spte
    g.set_cd(True)
    assert g.mapped(RAM_GPA) and g.flushes.calls == []
    assert g.read(RAM_GPA).spte == old


# ----------------------------------------- spec/memtype.md §4, §11.2 MTRR writes


@pytest.mark.parametrize(
    ("vendor", "era"),
    [
        pytest.param("vmx", "4.2", id="vmx_4_2_noncoh_zaps_range"),
        pytest.param("vmx", "6.8", id="vmx_6_7_noncoh_honoured_zaps_range"),
        pytest.param("svm", "5.10", id="svm_4_2_npt_noncoh_zaps_range"),
    ],
)
def test_mtrr_write_zaps_its_range_4_2_to_6_10_real_vm(vendor: str, era: str) -> None:
    """``update_mtrr``: a variable-range write zaps that range; DEF_TYPE zaps all."""
    g = guest(vendor, era, noncoh=True)
    # PHYSBASE first: the range is not valid yet (its zap span is computed
    # from base/mask regardless, as var_mtrr_range does); then PHYSMASK.V.
    g.vcpu.set_msr(mtrr_physbase(VAR_PLAIN), PLAIN_GPA | int(UC))
    g.read(PLAIN_GPA)
    g.read(MMIO_GPA)
    g.flushes.calls.clear()
    mask = ((1 << g.vm.config.host_maxphyaddr) - 1) & ~0xFFF
    g.vcpu.set_msr(mtrr_physmask(VAR_PLAIN), mask | MTRR_V)
    assert not g.mapped(PLAIN_GPA) and g.flushes.covers(PLAIN_GPA)
    assert g.mapped(MMIO_GPA) and not g.flushes.covers(MMIO_GPA)
    r = g.read(PLAIN_GPA)
    if vendor == "vmx":
        assert ept_bits(r.spte or 0) == (UC, False)
    g.flushes.calls.clear()
    g.vcpu.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | int(WT))
    assert not g.mapped(PLAIN_GPA) and not g.mapped(MMIO_GPA)
    assert g.flushes.covers(MMIO_GPA)


@pytest.mark.parametrize(
    ("vendor", "era", "noncoh"),
    [
        pytest.param("vmx", "5.10", False, id="vmx_4_2_coherent_no_zap"),
        pytest.param("vmx", "6.8", False, id="vmx_6_7_not_honoured_no_zap"),
        pytest.param("svm", "6.8", True, id="svm_6_7_not_honoured_no_zap"),
        pytest.param("vmx", "3.13", True, id="vmx_3_13_before_update_mtrr_no_zap"),
        pytest.param("vmx", "6.11", True, id="vmx_6_11_mtrr_virt_removed_no_zap"),
        pytest.param("vmx", "6.16", True, id="vmx_6_16_mtrr_virt_removed_no_zap"),
    ],
)
def test_mtrr_write_does_not_zap_real_vm(vendor: str, era: str, noncoh: bool) -> None:
    """§11.2: no MTRR-write zap outside 4.2–6.10 or without its conditions."""
    g = guest(vendor, era, noncoh=noncoh)
    old = g.read(PLAIN_GPA).spte
    g.set_var_mtrr(VAR_PLAIN, PLAIN_GPA, 4096, UC)
    g.vcpu.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | int(WT))
    assert g.mapped(PLAIN_GPA) and g.flushes.calls == []
    assert g.read(PLAIN_GPA).spte == old


def test_pat_write_never_zaps_real_vm() -> None:
    """§11.2: hardware reads the guest PAT directly; a PAT write zaps nothing."""
    g = guest("vmx", "6.8", noncoh=True)
    g.read(RAM_GPA)
    g.vcpu.set_msr(MSR_IA32_CR_PAT, make_pat(UC))
    assert g.mapped(RAM_GPA) and g.flushes.calls == []
    assert g.read(RAM_GPA).memtype is effective_type(WT, UC)


# ------------------------------------------------------ spec/memtype.md §8


@pytest.mark.parametrize(
    ("vendor", "era", "noncoh", "hole", "level"),
    [
        pytest.param("vmx", "6.8", True, True, 1, id="vmx_6_8_noncoh_non_uniform_lowers_to_4k"),
        pytest.param("vmx", "6.8", True, False, 2, id="vmx_6_8_noncoh_uniform_keeps_2m"),
        pytest.param("vmx", "6.8", False, True, 2, id="vmx_6_8_coherent_not_checked"),
        pytest.param("vmx", "5.10", False, True, 1, id="vmx_4_2_checked_on_every_fault"),
        pytest.param("vmx", "6.16", True, True, 2, id="vmx_6_16_mtrr_virt_removed_keeps_2m"),
        pytest.param("svm", "5.10", False, True, 1, id="svm_4_2_checked_on_every_fault"),
        pytest.param("svm", "6.8", True, True, 2, id="svm_6_0_not_ept_keeps_2m"),
    ],
)
def test_mtrr_huge_page_level_real_vm(
    vendor: str, era: str, noncoh: bool, hole: bool, level: int
) -> None:
    """``kvm_mtrr_check_gfn_range_consistency`` caps the TDP level (4.2–6.10)."""
    g = guest(vendor, era, noncoh=noncoh, hole=hole)
    r = g.read(RAM_GPA)
    assert r.level == level
    if vendor == "vmx" and noncoh and era == "6.8":
        assert ept_bits(r.spte or 0) == (WT, False)


# ------------------------------------------------------ spec/memtype.md §9


@pytest.mark.parametrize("era", ["5.10", "6.16"])
def test_npt_leaf_has_no_memtype_bits_real_vm(era: str) -> None:
    """NPT leaves never set PWT/PCD/PAT: host PAT entry 0 (WB) for RAM and MMIO."""
    g = guest("svm", era, noncoh=True)
    assert g.vm.spte_format.memtype_mask == 0
    for gpa in (PLAIN_GPA, MMIO_GPA):
        r = g.read(gpa)
        pat_bit = PAT4K if r.level == 1 else PAT_HUGE
        assert (r.spte or 0) & (PWT | PCD | pat_bit) == 0


@pytest.mark.parametrize("era", ["5.10", "6.8", "6.16"])
def test_npt_effective_type_follows_guest_pat_on_ram_real_vm(era: str) -> None:
    """gPAT = guest PAT (15038e147247); host RAM WB; guest MTRRs play no part."""
    g = guest("svm", era, noncoh=True)
    g.set_var_mtrr(VAR_PLAIN, PAT_GPA, 0x1_0000, UC)
    for t, i in PAT_INDEX.items():
        r = g.read(PAT_GPA + 4096 * i)
        assert r.memtype is effective_type(WB, t)
        assert r.memtype is (UC if t is UCM else t)


def test_npt_mmio_host_uc_only_guest_wc_survives_real_vm() -> None:
    """§9: the host BAR's host MTRR type (UC) decides; guest WC stays WC."""
    g = guest("svm", "6.16")
    assert g.read(MMIO_GPA).memtype is UC
    pt = GuestPageTables(g.vm, PT_GPA + PT_SIZE, PT_SIZE)
    pt.map(MMIO_GPA, MMIO_GPA, 4096, pat_index=PAT_INDEX[WC])
    g.vcpu.set_sregs(cr3=pt.cr3)
    assert g.read(MMIO_GPA).memtype is WC


def test_noncoh_dma_registration_zaps_svm_6_16_shadow_paging_real_vm() -> None:
    """§11.1, 6.16: ``kvm_mmu_may_ignore_guest_pat`` is the quirk check, and
    without TDP IGNORE_GUEST_PAT is unsupported, so it is not made
    inapplicable on SVM: the first and last registration zap every gfn."""
    g = guest("svm", "6.16", tdp=False)
    assert g.vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    g.read(RAM_GPA)
    g.vm.register_noncoherent_dma()
    assert g.flushes.covers(RAM_GPA)
    g.read(RAM_GPA)
    g.flushes.calls.clear()
    g.vm.unregister_noncoherent_dma()
    assert g.flushes.covers(RAM_GPA)
