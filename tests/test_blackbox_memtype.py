"""Black-box memory-type tests written from spec/memtype.md (and kvm-mmu.md §4).

Every case drives a real ``kvmmu.VM`` through its public surface (VMConfig,
``vcpu.set_msr``/``get_msr``, ``vcpu.set_sregs``, ``vcpu.access``,
``register_noncoherent_dma``, ``disable_quirks``) and checks a value the spec
determines. The cases target what the per-module tests do not: boundaries,
era edges, MTRR overlaps and fixed ranges, PAT index bits at 4K vs 2M, the
MAXPHYADDR-dependent reserved bits, invalid writes, and per-era/vendor zaps.
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvmmu.guest_pt import GuestPageTables
from kvmmu.memtype import CR0_CD, MemType, effective_type
from kvmmu.quirks import KVM_X86_QUIRK_CD_NW_CLEARED, KVM_X86_QUIRK_IGNORE_GUEST_PAT

UC, WC, WT, WP, WB, UCM = 0, 1, 4, 5, 6, 7
MTRR_TYPES = (UC, WC, WT, WP, WB)
PAT_TYPES = (UC, WC, WT, WP, WB, UCM)

MSR_PAT = 0x277
MSR_MTRRCAP = 0xFE
MSR_DEF_TYPE = 0x2FF
DEF_E, DEF_FE = 1 << 11, 1 << 10
FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
#: (MSR, first address, granule) for the 11 fixed-range MSRs (spec §4 table).
FIXED_LAYOUT = [(0x250, 0x0, 0x10000), (0x258, 0x80000, 0x4000), (0x259, 0xA0000, 0x4000)] + [
    (0x268 + i, 0xC0000 + i * 0x8000, 0x1000) for i in range(8)
]
PAT_RESET = 0x0007040600070406
MIB = 1 << 20
RAM_HVA, RAM_SIZE = 0x7F00_0000_0000, 16 * MIB
PT_GPA, PT_SIZE = 12 * MIB, 0x4_0000
MMIO_HVA, MMIO_GPA, MMIO_HPA, MMIO_SIZE = 0x7E00_0000_0000, 0xC000_0000, 0xFE00_0000, 0x1_0000
PWT, PCD, PAT4K, PS, PAT2M = 1 << 3, 1 << 4, 1 << 7, 1 << 7, 1 << 12
P_RW_US = 0x7
IPAT = 1 << 6


def spec_table_11_7(mtrr: int, pat: int) -> int:
    """spec/memtype.md §3, the Python sketch verbatim."""
    if pat == UC:
        return UC
    if pat == WC:
        return WC
    if pat == UCM:
        return WC if mtrr in (WC, WP) else UC
    if pat in (WT, WP):
        return UC if mtrr in (UC, WC) else pat
    assert pat == WB
    return mtrr


def make_pat(*types: int) -> int:
    v = 0
    for i, t in enumerate(types):
        v |= t << (8 * i)
    return v


class G:
    """A VM with 16 MiB of THP-backed RAM, a UC host BAR, and guest page tables."""

    def __init__(
        self,
        vendor: str = "vmx",
        era: str = "6.8",
        *,
        tdp: bool = True,
        quirks: dict[str, bool] | None = None,
        snoop: bool = True,
        maxphy: int = 46,
        noncoh: bool = False,
        paging: bool = True,
    ) -> None:
        self.vm: Any = kvmmu.VM(
            kvmmu.VMConfig(
                vendor=vendor,
                era=era,
                tdp=tdp,
                host_self_snoop=snoop,
                host_maxphyaddr=maxphy,
                quirks=quirks or {},
            )
        )
        self.vm.host.mmap_anon(RAM_HVA, RAM_SIZE, page_level=2)
        self.vm.set_user_memory_region(0, 0, 0, RAM_SIZE, RAM_HVA)
        self.vm.host.map_mmio(MMIO_HVA, MMIO_SIZE, hpa=MMIO_HPA, memtype=MemType.UC)
        self.vm.set_user_memory_region(1, 0, MMIO_GPA, MMIO_SIZE, MMIO_HVA)
        self.vcpu: Any = self.vm.vcpus[0]
        self.pt = GuestPageTables(self.vm, PT_GPA, PT_SIZE)
        if noncoh:
            self.vm.register_noncoherent_dma()
        if paging:
            self.vcpu.set_sregs(**self.pt.long_mode_sregs())

    # guest page tables (identity maps), written as raw entries
    def map4k(self, gpa: int, flags: int = 0) -> None:
        addr = self.pt.entry_address(gpa, 1)
        self.vm.write_guest(addr, (gpa | P_RW_US | flags).to_bytes(8, "little"))

    def map2m(self, gpa: int, flags: int = 0) -> None:
        addr = self.pt.entry_address(gpa, 2)
        self.vm.write_guest(addr, (gpa | P_RW_US | PS | flags).to_bytes(8, "little"))

    def read(self, gpa: int) -> Any:
        r = self.vcpu.access(gpa, "read")
        assert r.fault is None and r.memtype is not None and r.spte is not None, r
        return r

    def mapped(self, gpa: int) -> bool:
        """TDP: the leaf is still there. Shadow paging: no zap covered the gfn."""
        if self.vm.config.tdp:
            return self.vm.mmu.translate(gpa) is not None
        return not any(s <= gpa >> 12 < e for s, e in self.zaps)

    def record_zaps(self) -> None:
        """Record ``kvm_zap_gfn_range`` calls on the MMU (shadow paging has no translate)."""
        self.zaps: list[tuple[int, int]] = []
        mmu = self.vm.mmu
        orig = mmu.zap_gfn_range

        def zap(start: int, end: int) -> None:
            self.zaps.append((start, end))
            orig(start, end)

        mmu.zap_gfn_range = zap

    def var(self, n: int, base: int, size: int, mt: int, *, valid: bool = True) -> None:
        mask = ((1 << self.vm.config.host_maxphyaddr) - 1) & ~(size - 1)
        self.vcpu.set_msr(0x200 + 2 * n, base | mt)
        self.vcpu.set_msr(0x201 + 2 * n, mask | (1 << 11 if valid else 0))

    def deftype(self, mt: int, *, e: bool = True, fe: bool = False) -> None:
        self.vcpu.set_msr(MSR_DEF_TYPE, mt | (DEF_E if e else 0) | (DEF_FE if fe else 0))

    def set_cd(self, cd: bool) -> None:
        cr0 = self.vcpu.cr0
        self.vcpu.set_sregs(cr0=(cr0 | CR0_CD) if cd else (cr0 & ~CR0_CD))


def ept(spte: int) -> tuple[int, bool]:
    """EPT leaf memtype (bits 5:3) and IPAT (bit 6), kvm-mmu.md §4.1."""
    return (spte >> 3) & 7, bool(spte & IPAT)


# ------------------------------------------------------------ §1 / §2 PAT MSR


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_pat_power_up_value(vendor: str) -> None:
    """§2: IA32_PAT resets to 0x0007040600070406 (MSR_IA32_CR_PAT_DEFAULT)."""
    g = G(vendor, paging=False)
    assert g.vcpu.get_msr(MSR_PAT) == PAT_RESET


@pytest.mark.parametrize("byte", range(8))
@pytest.mark.parametrize("bad", [2, 3, 8, 0x0E, 0x10, 0x80, 0xFF])
def test_pat_invalid_byte_refused_and_unchanged(byte: int, bad: int) -> None:
    """§1: kvm_pat_valid rejects types 2/3 and any byte with bits 7:3 set (#GP)."""
    g = G(paging=False)
    value = (PAT_RESET & ~(0xFF << (8 * byte))) | (bad << (8 * byte))
    with pytest.raises(kvmmu.KvmError) as ei:
        g.vcpu.set_msr(MSR_PAT, value)
    assert ei.value.errno == errno.EINVAL
    assert g.vcpu.get_msr(MSR_PAT) == PAT_RESET


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=8, max_size=8))
def test_pat_validity_property(bytes_: list[int]) -> None:
    """§1: a PAT value is accepted iff every byte is one of 0,1,4,5,6,7."""
    value = make_pat(*bytes_)
    ok = all(b in PAT_TYPES for b in bytes_)
    vcpu = _PAT_VM.vcpus[0]
    vcpu.set_msr(MSR_PAT, PAT_RESET)
    if ok:
        vcpu.set_msr(MSR_PAT, value)
        assert vcpu.get_msr(MSR_PAT) == value
    else:
        with pytest.raises(kvmmu.KvmError):
            vcpu.set_msr(MSR_PAT, value)
        assert vcpu.get_msr(MSR_PAT) == PAT_RESET


_PAT_VM: Any = kvmmu.VM(kvmmu.VMConfig())


def _honour_pat_vm(vendor: str = "vmx", **kw: Any) -> G:
    """A VM whose RAM SPTEs are WB without IPAT, so guest PAT decides (§5)."""
    if vendor == "vmx":
        return G("vmx", "6.16", quirks={"ignore_guest_pat": False}, **kw)
    return G("svm", "6.16", **kw)


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
@pytest.mark.parametrize("index", range(8))
def test_pat_index_4k_pte_bits_3_4_7(vendor: str, index: int) -> None:
    """§2 Table 11-11: a 4K PTE selects PA[4*PAT(bit 7) + 2*PCD + PWT]."""
    g = _honour_pat_vm(vendor)
    gpa = 0x40_0000 + index * 0x1000
    flags = (PWT if index & 1 else 0) | (PCD if index & 2 else 0) | (PAT4K if index & 4 else 0)
    g.map4k(gpa, flags)
    pat = make_pat(*[WC if i == index else WB for i in range(8)])
    g.vcpu.set_msr(MSR_PAT, pat)
    assert g.read(gpa).memtype == WC
    # Any other entry being WC does not matter.
    g.vcpu.set_msr(MSR_PAT, make_pat(*[WB if i == index else WC for i in range(8)]))
    assert g.read(gpa).memtype == WB


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
@pytest.mark.parametrize("index", range(8))
def test_pat_index_2m_pde_bit_12_not_bit_7(vendor: str, index: int) -> None:
    """§2: in a 2M PDE the PAT bit is bit 12; bit 7 is PS and does not select PA4..7."""
    g = _honour_pat_vm(vendor)
    gpa = 0x60_0000
    flags = (PWT if index & 1 else 0) | (PCD if index & 2 else 0) | (PAT2M if index & 4 else 0)
    g.map2m(gpa, flags)
    g.vcpu.set_msr(MSR_PAT, make_pat(*[WC if i == index else UC for i in range(8)]))
    for off in (0, 0x1F_F000):
        assert g.read(gpa + off).memtype == WC


def test_pat_write_takes_effect_without_zap() -> None:
    """§11.2: a guest PAT write never zaps; the CPU applies the new PAT at once (§2, §5)."""
    g = _honour_pat_vm("vmx")
    g.map4k(0x40_0000)
    r = g.read(0x40_0000)
    assert (ept(r.spte), r.memtype) == ((WB, False), WB)
    g.vcpu.set_msr(MSR_PAT, make_pat(UC, WT, UCM, UC, WB, WT, UCM, UC))
    assert g.mapped(0x40_0000)
    assert g.read(0x40_0000).memtype == UC


# ------------------------------------------------------------ §3 Table 11-7


@pytest.mark.parametrize("mtrr", MTRR_TYPES)
@pytest.mark.parametrize("pat", PAT_TYPES)
def test_effective_type_function_is_table_11_7(mtrr: int, pat: int) -> None:
    assert int(effective_type(MemType(mtrr), MemType(pat))) == spec_table_11_7(mtrr, pat)


@pytest.mark.parametrize("mtrr", MTRR_TYPES)
def test_table_11_7_through_guest_mtrr_and_2m_pat(mtrr: int) -> None:
    """§5/§7 (6.7-6.10, noncoherent DMA): SPTE = guest MTRR type, no IPAT; the
    access type is Table 11-7(that, guest PAT), here through 2M guest pages."""
    g = G("vmx", "6.9", noncoh=True)
    g.deftype(mtrr)
    pat = make_pat(WB, WC, UCM, UC, WT, WP, UCM, UC)
    g.vcpu.set_msr(MSR_PAT, pat)
    for i, t in enumerate((WB, WC, UCM, UC, WT, WP)):
        gpa = 2 * MIB * (i + 1)
        flags = (PWT if i & 1 else 0) | (PCD if i & 2 else 0) | (PAT2M if i & 4 else 0)
        g.map2m(gpa, flags)
        r = g.read(gpa)
        assert ept(r.spte) == (mtrr, False)
        assert int(r.memtype) == spec_table_11_7(mtrr, t), (i, t)


# ------------------------------------------------------ §4 MTRR MSR writes


def test_mtrrcap_reads_0x508() -> None:
    assert G(paging=False).vcpu.get_msr(MSR_MTRRCAP) == 0x508


@pytest.mark.parametrize(
    "value",
    [1 << 8, 1 << 9, 1 << 12, 1 << 63, DEF_E | 2, DEF_E | 3, DEF_E | 7, 8, 0x16, 0x87],
)
def test_def_type_invalid_write(value: int) -> None:
    """§4: DEF_TYPE bits outside 0xcff are reserved; the type must be 0,1,4,5,6."""
    g = G(paging=False)
    g.vcpu.set_msr(MSR_DEF_TYPE, DEF_E | DEF_FE | WT)
    with pytest.raises(kvmmu.KvmError):
        g.vcpu.set_msr(MSR_DEF_TYPE, value)
    assert g.vcpu.get_msr(MSR_DEF_TYPE) == DEF_E | DEF_FE | WT


@pytest.mark.parametrize("value", [0, 6, DEF_E | DEF_FE | WP, DEF_FE | WC, 0xC06])
def test_def_type_valid_write_reads_back(value: int) -> None:
    g = G(paging=False)
    g.vcpu.set_msr(MSR_DEF_TYPE, value)
    assert g.vcpu.get_msr(MSR_DEF_TYPE) == value


@pytest.mark.parametrize("msr", FIXED)
@pytest.mark.parametrize("byte", [0, 3, 7])
@pytest.mark.parametrize("bad", [2, 3, 7, 8, 0x40])
def test_fixed_mtrr_invalid_byte(msr: int, byte: int, bad: int) -> None:
    """§4: every fixed-range byte must be a valid MTRR type (UC- = 7 included)."""
    g = G(paging=False)
    good = make_pat(*[WB] * 8)
    g.vcpu.set_msr(msr, good)
    with pytest.raises(kvmmu.KvmError):
        g.vcpu.set_msr(msr, (good & ~(0xFF << 8 * byte)) | (bad << 8 * byte))
    assert g.vcpu.get_msr(msr) == good


@pytest.mark.parametrize("maxphy", [36, 39, 46, 52])
def test_var_mtrr_reserved_bits_follow_maxphyaddr(maxphy: int) -> None:
    """§4: PHYSBASE bits 11:8 and PHYSMASK bits 10:0 are reserved, and so is
    every bit at or above MAXPHYADDR (kvm_mtrr_valid)."""
    g = G(paging=False, maxphy=maxphy)
    top = 1 << (maxphy - 1)
    g.vcpu.set_msr(0x200, top | WB)
    assert g.vcpu.get_msr(0x200) == top | WB
    g.vcpu.set_msr(0x201, top | (1 << 11))
    assert g.vcpu.get_msr(0x201) == top | (1 << 11)
    bad_base = [(1 << 8) | WB, (1 << 11) | WB, UCM]
    if maxphy < 64:
        bad_base.append((1 << maxphy) | WB)
        bad_base.append((1 << 63) | WB)
    for v in bad_base:
        with pytest.raises(kvmmu.KvmError):
            g.vcpu.set_msr(0x200, v)
    for bad_type in (2, 3):
        with pytest.raises(kvmmu.KvmError):
            g.vcpu.set_msr(0x200, bad_type)
    bad_mask = [1, 1 << 10, 0x7FF | (1 << 11)]
    if maxphy < 64:
        bad_mask.append((1 << maxphy) | (1 << 11))
    for v in bad_mask:
        with pytest.raises(kvmmu.KvmError):
            g.vcpu.set_msr(0x201, v)
    assert g.vcpu.get_msr(0x200) == top | WB
    assert g.vcpu.get_msr(0x201) == top | (1 << 11)


def test_var_mtrr_all_eight_pairs_writable() -> None:
    """§4: VCNT = 8 (KVM_NR_VAR_MTRR): PHYSBASE0..7 / PHYSMASK0..7 are 0x200..0x20f."""
    g = G(paging=False)
    for n in range(8):
        g.vcpu.set_msr(0x200 + 2 * n, (n << 12) | WT)
        g.vcpu.set_msr(0x201 + 2 * n, 0xFFF_FFFF_F000 | (1 << 11))
    for n in range(8):
        assert g.vcpu.get_msr(0x200 + 2 * n) == (n << 12) | WT


# ------------------------------------------------ §4 / §6 MTRR precedence
# In 6.7-6.10 with noncoherent DMA, an EPT RAM SPTE carries the guest MTRR type
# (§7), so the SPTE's memtype bits expose kvm_mtrr_get_guest_memory_type.


def _mtrr_vm(era: str = "6.8") -> G:
    g = G("vmx", era, noncoh=True)
    return g


BASE = 4 * MIB


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ((WC,), WC),
        ((WP,), WP),
        ((WC, WC), WC),
        ((UC, WB), UC),
        ((WB, UC), UC),
        ((WT, UC), UC),
        ((WC, UC), UC),
        ((WT, WB), WT),
        ((WB, WT), WT),
        ((WB, WT, WB), WT),
        # UC on the innermost range, which has the highest base: KVM's loop
        # visits it first (descending base) and would end in "undefined" -> WB
        # (opt-in kvm_visit_order); the spec says UC wins in every era.
        ((WB, WB, UC), UC),
        ((WT, WT, UC), UC),
        ((WC, WB), WB),
        ((WP, WT), WB),
        ((WC, WP), WB),
    ],
)
@pytest.mark.parametrize("era", ["4.19", "6.8", "6.10"])
def test_mtrr_overlap_precedence(era: str, types: tuple[int, ...], expected: int) -> None:
    """§4 rules 3-7 (4.2-6.10): UC wins, WT+WB = WT, same type = that type,
    any other overlap = WB. The ranges nest (different bases), so the
    result must not depend on the order KVM walks them."""
    g = _mtrr_vm(era)
    g.deftype(WB)
    # Nested ranges: 2M at BASE, 1M at BASE, 64K at BASE + 64K ...; all cover gpa.
    gpa = BASE + 0x1_0000
    sizes = [2 * MIB, 1 * MIB, 0x1_0000]
    bases = [BASE, BASE, BASE + 0x1_0000]
    for n, t in enumerate(types):
        g.var(n, bases[n], sizes[n], t)
    g.map4k(gpa)
    assert ept(g.read(gpa).spte) == (expected, False)


def test_mtrr_uc_visited_first_gives_wb_only_with_kvm_visit_order() -> None:
    """[plugins.vmx] mtrr_kvm_visit_order: the literal 4.2-6.10 loop of
    kvm_mtrr_get_guest_memory_type (arch/x86/kvm/mtrr.c) checks only the range
    being visited for UC, so an inner UC range met before the enclosing WB
    range falls to the "undefined" branch and gives WB."""
    g = _mtrr_vm("6.8")
    vm = kvmmu.VM(
        kvmmu.VMConfig(vendor="vmx", era="6.8", plugins={"vmx": {"mtrr_kvm_visit_order": True}})
    )
    g.vm = vm
    vm.host.mmap_anon(RAM_HVA, RAM_SIZE, page_level=2)
    vm.set_user_memory_region(0, 0, 0, RAM_SIZE, RAM_HVA)
    g.vcpu = vm.vcpus[0]
    g.pt = GuestPageTables(vm, PT_GPA, PT_SIZE)
    vm.register_noncoherent_dma()
    g.vcpu.set_sregs(**g.pt.long_mode_sregs())
    g.deftype(WB)
    g.var(0, BASE, 2 * MIB, WB)
    g.var(1, BASE + 0x1_0000, 0x1_0000, UC)
    g.map4k(BASE + 0x1_0000)
    assert ept(g.read(BASE + 0x1_0000).spte) == (WB, False)


@pytest.mark.parametrize(
    ("types", "expected"),
    [((WC, WB), UC), ((WP, WT), UC), ((UC, WB), UC), ((WT, WB), WT), ((WC, WC), WC)],
)
def test_mtrr_overlap_undefined_is_uc_before_4_2(types: tuple[int, ...], expected: int) -> None:
    """§6: up to 4.1 get_mtrr_type resolves an undefined overlap to UC."""
    g = _mtrr_vm("3.13")
    g.deftype(WB)
    g.var(0, BASE, 2 * MIB, types[0])
    g.var(1, BASE, 1 * MIB, types[1])
    g.map4k(BASE)
    assert ept(g.read(BASE).spte) == (expected, False)


@pytest.mark.parametrize("deftype", MTRR_TYPES)
def test_mtrr_unmatched_page_gets_default_type(deftype: int) -> None:
    """§4 rule 8: no enabled range covers the page -> DEF_TYPE bits 7:0."""
    g = _mtrr_vm()
    g.deftype(deftype)
    g.var(0, BASE, 2 * MIB, UC)
    g.var(1, BASE + 2 * MIB, 2 * MIB, WC, valid=False)  # V = 0: ignored
    for gpa in (BASE - 0x1000, BASE + 2 * MIB, BASE + 4 * MIB - 0x1000):
        g.map4k(gpa)
        assert ept(g.read(gpa).spte) == (deftype, False), hex(gpa)
    g.map4k(BASE + 2 * MIB - 0x1000)
    assert ept(g.read(BASE + 2 * MIB - 0x1000).spte) == (UC, False)


@pytest.mark.parametrize(
    ("era", "expected"),
    [("3.13", WB), ("5.10", UC), ("6.8", UC), ("6.10", UC)],
)
def test_mtrr_disabled_type_by_era(era: str, expected: int) -> None:
    """§4 rule 1 / §6: E = 0 -> UC (mtrr_disabled_type, guest CPUID has MTRR)
    in 5.x-6.10; <= 4.1 WB (0xFE). FE, the type field and ranges are ignored."""
    g = _mtrr_vm(era)
    g.var(0, BASE, 2 * MIB, WT)
    g.deftype(WP, e=False, fe=True)
    for gpa in (BASE, 0x1000, 8 * MIB):
        g.map4k(gpa)
        assert ept(g.read(gpa).spte) == (expected, False), hex(gpa)


def test_mtrr_disabled_4_2_uses_default_type_field() -> None:
    """§6: the 4.2 rewrite returned the DEF_TYPE type field when E = 0."""
    g = _mtrr_vm("4.2")
    g.deftype(WP, e=False)
    g.map4k(BASE)
    assert ept(g.read(BASE).spte) == (WP, False)


@pytest.mark.parametrize(("msr", "start", "gran"), FIXED_LAYOUT)
def test_fixed_ranges_byte_per_subrange(msr: int, start: int, gran: int) -> None:
    """§4: byte i of a fixed MSR is the type of its i-th sub-range; with E = FE = 1
    it beats a variable range covering the same page (rule 2)."""
    g = _mtrr_vm()
    g.deftype(WB, fe=True)
    g.var(0, 0, MIB, UC)  # would make everything below 1 MiB UC
    types = [WT, WP, WC, WB, WT, WP, WC, WB]
    g.vcpu.set_msr(msr, make_pat(*types))
    for i in (0, 2, 5, 7):
        gpa = start + i * gran + (gran - 0x1000)  # last 4K page of the sub-range
        g.map4k(gpa)
        assert ept(g.read(gpa).spte) == (types[i], False), (hex(msr), i)


def test_fixed_ranges_ignored_when_fe_clear() -> None:
    """§4 rule 2 needs FE = 1: with FE = 0, < 1 MiB uses the variable ranges/default."""
    g = _mtrr_vm()
    g.vcpu.set_msr(0x250, make_pat(*[WC] * 8))
    g.var(0, 0, 0x8_0000, WT)
    g.deftype(WB, fe=False)
    g.map4k(0x1_0000)
    g.map4k(0x9_0000)
    assert ept(g.read(0x1_0000).spte) == (WT, False)
    assert ept(g.read(0x9_0000).spte) == (WB, False)


def test_fixed_ranges_stop_at_1mib() -> None:
    """§4: fixed ranges cover only the first MiB; 0x100000 uses variable/default."""
    g = _mtrr_vm()
    g.vcpu.set_msr(0x26F, make_pat(*[WC] * 8))
    g.deftype(WT, fe=True)
    g.map4k(0xFF000)
    g.map4k(0x100000)
    assert ept(g.read(0xFF000).spte) == (WC, False)
    assert ept(g.read(0x100000).spte) == (WT, False)


def test_var_range_start_is_base_page_not_mask_aligned() -> None:
    """§4: KVM's var_mtrr_range uses start = base & PAGE_MASK and
    end = (start | ~mask) + 1, so an unaligned base starts the range there."""
    g = _mtrr_vm()
    g.deftype(WB)
    g.var(0, BASE + 0x1000, 2 * MIB, WT)  # KVM range [BASE + 4K, BASE + 2M)
    for gpa, t in ((BASE, WB), (BASE + 0x1000, WT), (BASE + 2 * MIB - 0x1000, WT)):
        g.map4k(gpa)
        assert ept(g.read(gpa).spte) == (t, False), hex(gpa)


@pytest.mark.parametrize("era", ["6.11", "6.12", "6.16"])
def test_mtrrs_stored_but_ignored_from_6_11(era: str) -> None:
    """§4: from 6.11 guest MTRR values read back but never affect the memtype."""
    g = G("vmx", era, noncoh=True)
    g.var(0, 0, 16 * MIB, UC)
    g.vcpu.set_msr(0x250, make_pat(*[WC] * 8))
    g.deftype(UC, fe=True)
    assert g.vcpu.get_msr(0x200) == UC
    assert g.vcpu.get_msr(0x250) == make_pat(*[WC] * 8)
    assert g.vcpu.get_msr(MSR_DEF_TYPE) == DEF_E | DEF_FE | UC
    for gpa in (0x1000, BASE):
        g.map4k(gpa)
        r = g.read(gpa)
        assert ept(r.spte) == (WB, False)
        assert r.memtype == WB


# -------------------------------------------------------------- §7 era edges


@pytest.mark.parametrize(
    ("era", "snoop", "noncoh", "expected"),
    [
        ("6.6.30", True, False, (WB, True)),
        ("6.10.14", True, True, (WT, False)),
        ("6.11", False, True, (WB, False)),
        ("6.11.11", True, False, (WB, False)),
        ("6.11", False, False, (WB, True)),
        ("6.12", False, False, (WB, True)),
        ("6.15.9", True, False, (WB, True)),
        ("6.16", False, True, (WB, False)),
        ("6.16", False, False, (WB, True)),
    ],
)
def test_mt_mask_era_edges(era: str, snoop: bool, noncoh: bool, expected: tuple[int, bool]) -> None:
    """§7 rows, with patch-level versions at the boundaries (guest MTRR WT)."""
    g = G("vmx", era, snoop=snoop, noncoh=noncoh)
    g.deftype(WT)
    g.map4k(BASE)
    assert ept(g.read(BASE).spte) == expected


@pytest.mark.parametrize("era", ["3.13", "4.2", "6.6", "6.8", "6.11", "6.14", "6.16"])
@pytest.mark.parametrize("noncoh", [False, True])
def test_mmio_always_uc_without_ipat(era: str, noncoh: bool) -> None:
    """§7: host MMIO gets UC with IPAT = 0 in every era; guest WC survives (§5)."""
    g = G("vmx", era, noncoh=noncoh, snoop=era != "6.11")
    g.deftype(WB)
    g.map4k(MMIO_GPA)
    g.map4k(MMIO_GPA + 0x1000, PWT)  # PA1
    g.vcpu.set_msr(MSR_PAT, make_pat(WB, WC, UCM, UC, WB, WT, UCM, UC))
    r = g.read(MMIO_GPA)
    assert (ept(r.spte), int(r.memtype)) == ((UC, False), UC)
    r = g.read(MMIO_GPA + 0x1000)
    assert (ept(r.spte), int(r.memtype)) == ((UC, False), WC)


def test_6_16_quirk_cannot_be_disabled_without_self_snoop() -> None:
    """§7/§11.4: without self-snoop IGNORE_GUEST_PAT is not a supported quirk."""
    with pytest.raises(kvmmu.KvmError) as ei:
        G("vmx", "6.16", snoop=False, quirks={"ignore_guest_pat": False}, paging=False)
    assert ei.value.errno == errno.EINVAL
    g = G("vmx", "6.16", snoop=False, paging=False)
    with pytest.raises(kvmmu.KvmError):
        g.vm.disable_quirks(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    # KVM_CAP_DISABLE_QUIRKS (v1) silently drops the unsupported bit.
    g.vm.disable_quirks(KVM_X86_QUIRK_IGNORE_GUEST_PAT, cap2=False)
    assert g.vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT)


def test_6_16_ignore_guest_pat_disabled_at_runtime_affects_new_sptes() -> None:
    """§7 (>= 6.16): with the quirk disabled, RAM SPTEs are WB without IPAT."""
    g = G("vmx", "6.16", paging=False)
    g.vm.disable_quirks(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    assert not g.vm.has_quirk(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    g.vcpu.set_sregs(**g.pt.long_mode_sregs())
    g.map4k(BASE, PCD | PWT)  # PA3 = UC
    r = g.read(BASE)
    assert ept(r.spte) == (WB, False)
    assert r.memtype == UC


# ------------------------------------------------------------ §11.4 quirks


def test_quirk_reenable_before_6_16_but_not_after() -> None:
    """§11.4: before 6.16 the cap assigns the disabled set; 6.16 ORs (one-way)."""
    g = G("vmx", "6.8", paging=False)
    g.vm.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED)
    assert not g.vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)
    g.vm.disable_quirks(0)
    assert g.vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)
    g = G("svm", "6.16", paging=False)
    assert g.vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)
    g.vm.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED)
    g.vm.disable_quirks(0)
    assert not g.vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED)


@pytest.mark.parametrize("era", ["6.8", "6.16"])
def test_disable_quirks2_refuses_unknown_bits(era: str) -> None:
    """§11.4: KVM_CAP_DISABLE_QUIRKS2 fails with EINVAL on unsupported bits."""
    g = G("vmx", era, paging=False)
    with pytest.raises(kvmmu.KvmError) as ei:
        g.vm.disable_quirks(KVM_X86_QUIRK_CD_NW_CLEARED | (1 << 40))
    assert ei.value.errno == errno.EINVAL
    assert g.vm.has_quirk(KVM_X86_QUIRK_CD_NW_CLEARED) == (era != "6.16")


def test_ignore_guest_pat_not_a_quirk_before_6_16() -> None:
    g = G("vmx", "6.15", paging=False)
    with pytest.raises(kvmmu.KvmError):
        g.vm.disable_quirks(KVM_X86_QUIRK_IGNORE_GUEST_PAT)


# --------------------------------------------------- §8 huge pages and MTRRs


def _huge_level(vendor: str, era: str, *, noncoh: bool, split: bool) -> int:
    g = G(vendor, era, noncoh=noncoh)
    g.deftype(WB)
    g.var(0, BASE, 2 * MIB, WT)
    if split:
        g.var(1, BASE + 0x10_0000, 0x1000, UC)
    g.map2m(BASE)
    return int(g.read(BASE).level)


@pytest.mark.parametrize(
    ("vendor", "era", "noncoh", "level"),
    [
        # 4.2-5.19: the consistency check runs on every TDP fault (EPT and NPT).
        ("vmx", "5.10", False, 1),
        ("svm", "5.10", False, 1),
        ("vmx", "5.19", True, 1),
        # 6.0-6.6: only shadow_memtype_mask (EPT) && noncoherent DMA.
        ("vmx", "6.1", False, 2),
        ("vmx", "6.6", True, 1),
        ("svm", "6.1", True, 2),
        # 6.7-6.10: __kvm_mmu_honors_guest_mtrrs(noncoherent).
        ("vmx", "6.8", False, 2),
        ("vmx", "6.10", True, 1),
        ("svm", "6.8", True, 2),
        # 6.11+: removed with MTRR virtualization.
        ("vmx", "6.11", True, 2),
        ("vmx", "6.16", True, 2),
    ],
)
def test_huge_page_mtrr_consistency_by_era(vendor: str, era: str, noncoh: bool, level: int) -> None:
    """§8: a 2M guest page whose MTRRs are not uniform maps 4K while the check runs."""
    assert _huge_level(vendor, era, noncoh=noncoh, split=True) == level
    assert _huge_level(vendor, era, noncoh=noncoh, split=False) == 2


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_huge_page_partial_coverage_equal_to_default_is_consistent(era: str) -> None:
    """§4: partial coverage is consistent when the covering type equals the default."""
    g = G("vmx", era, noncoh=True)
    g.deftype(WT)
    g.var(0, BASE + 0x10_0000, 0x10_0000, WT)
    g.map2m(BASE)
    assert g.read(BASE).level == 2
    g = G("vmx", era, noncoh=True)
    g.deftype(WB)
    g.var(0, BASE + 0x10_0000, 0x10_0000, WT)
    g.map2m(BASE)
    assert g.read(BASE).level == 1


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_huge_page_mtrrs_disabled_is_consistent(era: str) -> None:
    """§4: with MTRRs disabled the range is consistent (one type everywhere)."""
    g = G("vmx", era, noncoh=True)
    g.var(0, BASE + 0x10_0000, 0x1000, UC)
    g.deftype(WB, e=False)
    g.map2m(BASE)
    assert g.read(BASE).level == 2


# ----------------------------------------------------------- §11.2 zaps


def _zap_vm(vendor: str, era: str, **kw: Any) -> G:
    """Guest MTRRs set up first (var range 0 = [BASE, BASE+2M) WB), then pages mapped."""
    g = G(vendor, era, **kw)
    g.var(0, BASE, 2 * MIB, WB)
    g.deftype(WB, fe=True)
    for gpa in (0x1000, 0x9_0000, BASE, 8 * MIB):
        g.map4k(gpa)
        g.read(gpa)
    g.record_zaps()
    return g


@pytest.mark.parametrize(
    ("vendor", "era", "tdp", "zaps"),
    [
        ("vmx", "4.2", True, True),
        ("vmx", "6.6", True, True),
        ("svm", "5.10", True, True),
        ("svm", "6.6", True, True),
        ("vmx", "6.8", True, True),
        ("vmx", "6.10", True, True),
        ("svm", "6.8", True, False),
        ("vmx", "6.8", False, False),
        ("vmx", "5.10", False, False),
        ("vmx", "6.11", True, False),
        ("vmx", "6.16", True, False),
    ],
)
def test_var_mtrr_write_zaps_its_range(vendor: str, era: str, tdp: bool, zaps: bool) -> None:
    """§4 / §11.2: a variable-MTRR write zaps that range only, and only with
    TDP and noncoherent DMA (6.7-6.10: guest MTRRs honoured = EPT); never 6.11+."""
    g = _zap_vm(vendor, era, tdp=tdp, noncoh=True)
    g.vcpu.set_msr(0x200, BASE | WT)  # PHYSBASE0 only: the range stays [BASE, BASE+2M)
    assert g.mapped(BASE) is not zaps
    assert g.mapped(8 * MIB)
    assert g.mapped(0x1000)


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_mtrr_write_no_zap_without_noncoherent_dma(era: str) -> None:
    g = _zap_vm("vmx", era)
    g.vcpu.set_msr(0x200, BASE | WT)
    g.deftype(UC)
    assert g.mapped(BASE) and g.mapped(8 * MIB)


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_def_type_write_zaps_everything(era: str) -> None:
    g = _zap_vm("vmx", era, noncoh=True)
    g.deftype(WT, fe=True)
    assert not any(g.mapped(a) for a in (0x1000, 0x9_0000, BASE, 8 * MIB))


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_fixed_mtrr_write_zaps_its_span(era: str) -> None:
    """§4: a fixed-range write zaps that MSR's span (0x250: [0, 0x80000))."""
    g = _zap_vm("vmx", era, noncoh=True)
    g.vcpu.set_msr(0x250, make_pat(*[WT] * 8))
    assert not g.mapped(0x1000)
    assert g.mapped(0x9_0000) and g.mapped(BASE)
    r = g.read(0x1000)
    assert ept(r.spte) == (WT, False)


def test_pat_write_never_zaps_even_with_noncoherent_dma() -> None:
    g = _zap_vm("vmx", "6.8", noncoh=True)
    g.vcpu.set_msr(MSR_PAT, make_pat(*[UC] * 8))
    assert all(g.mapped(a) for a in (0x1000, 0x9_0000, BASE, 8 * MIB))


@pytest.mark.parametrize(
    ("vendor", "era", "tdp", "quirk_off", "zaps"),
    [
        ("vmx", "5.10", True, True, True),
        ("vmx", "5.10", True, False, False),
        ("vmx", "6.6", False, True, True),  # pre-6.7: noncoherent DMA, no TDP test
        ("svm", "6.6", True, True, True),
        ("vmx", "6.8", True, True, True),
        ("vmx", "6.8", True, False, False),
        ("vmx", "6.8", False, True, False),  # 6.7+: guest MTRRs honoured = EPT
        ("svm", "6.8", True, True, False),
        ("vmx", "6.11", True, True, False),
    ],
)
def test_cr0_cd_toggle_zap(vendor: str, era: str, tdp: bool, quirk_off: bool, zaps: bool) -> None:
    """§11.2: toggling CR0.CD zaps all with noncoherent DMA and CD_NW_CLEARED
    disabled (6.7+: and guest MTRRs honoured); removed in 6.11."""
    quirks = {"cd_nw_cleared": False} if quirk_off else {}
    g = _zap_vm(vendor, era, tdp=tdp, noncoh=True, quirks=quirks)
    g.set_cd(True)
    assert g.mapped(BASE) is not zaps
    assert g.mapped(8 * MIB) is not zaps


def test_cr0_nw_only_change_does_not_zap() -> None:
    g = _zap_vm("vmx", "6.8", noncoh=True, quirks={"cd_nw_cleared": False})
    g.vcpu.set_sregs(cr0=g.vcpu.cr0 | (1 << 29))
    assert g.mapped(BASE)


@pytest.mark.parametrize(
    ("vendor", "era", "tdp", "quirks", "zaps"),
    [
        ("vmx", "6.6", True, {}, False),
        ("vmx", "6.7", True, {}, True),
        ("vmx", "6.15", True, {}, True),
        ("vmx", "6.8", False, {}, False),  # shadow_memtype_mask = 0 without EPT
        ("svm", "6.8", True, {}, False),
        ("vmx", "6.16", True, {}, True),
        ("vmx", "6.16", True, {"ignore_guest_pat": False}, False),
        ("svm", "6.16", True, {}, False),
        # 6.16: the quirk check alone; shadow paging cannot disable it (!tdp_enabled).
        ("vmx", "6.16", False, {}, True),
        # SVM: inapplicable with NPT, but enabled (unsupported) with shadow paging.
        ("svm", "6.8", False, {}, False),
        ("svm", "6.16", False, {}, True),
    ],
)
def test_noncoherent_transitions_zap(
    vendor: str, era: str, tdp: bool, quirks: dict[str, bool], zaps: bool
) -> None:
    """§11.1: only the 0->1 and 1->0 transitions zap, and only when
    kvm_mmu_may_ignore_guest_pat() (6.7-6.15 EPT; 6.16 the quirk)."""
    g = _zap_vm(vendor, era, tdp=tdp, quirks=quirks)
    g.vm.register_noncoherent_dma()
    assert g.mapped(BASE) is not zaps
    g.read(BASE)
    g.zaps.clear()
    g.vm.register_noncoherent_dma()  # 1 -> 2
    assert g.mapped(BASE)
    g.vm.unregister_noncoherent_dma()  # 2 -> 1
    assert g.mapped(BASE)
    g.vm.unregister_noncoherent_dma()  # 1 -> 0
    assert g.mapped(BASE) is not zaps


# ------------------------------------------------- §9 SVM / §11.3 CR0.CD


@pytest.mark.parametrize("era", ["4.19", "5.19", "6.1", "6.16"])
def test_npt_leaf_never_sets_pwt_pcd_pat(era: str) -> None:
    """§9 / kvm-mmu.md §4.2: NPT leaves select host PAT0, even for MMIO and 2M."""
    g = G("svm", era)
    g.map2m(BASE, PCD | PWT | PAT2M)
    g.map4k(MMIO_GPA, PCD)
    for gpa in (BASE, MMIO_GPA):
        r = g.read(gpa)
        spte = int(r.spte)
        assert spte & (PWT | PCD) == 0
        bit_pat = PAT4K if r.level == 1 else PAT2M
        assert spte & bit_pat == 0


def test_svm_guest_mtrrs_play_no_part() -> None:
    """§9: guest MTRRs never count on SVM, even with noncoherent DMA in 6.8."""
    g = G("svm", "6.8", noncoh=True)
    g.deftype(UC)
    g.var(0, BASE, 2 * MIB, UC)
    g.map4k(BASE)
    assert g.read(BASE).memtype == WB
    g.map4k(MMIO_GPA)
    assert g.read(MMIO_GPA).memtype == UC


@pytest.mark.parametrize("era", ["4.2", "6.8", "6.16"])
def test_svm_cr0_cd_real_only_with_quirk_disabled(era: str) -> None:
    """§9/§11.3: svm_set_cr0 clears CD/NW in hardware CR0 while CD_NW_CLEARED is
    on; with it off the guest's CD reaches hardware and every access is UC."""
    g = G("svm", era)
    g.map4k(BASE)
    g.set_cd(True)
    assert g.vcpu.cr0 & CR0_CD
    assert not g.vcpu.hw_cr0 & CR0_CD
    assert g.read(BASE).memtype == WB
    g = G("svm", era, quirks={"cd_nw_cleared": False})
    g.map4k(BASE)
    g.set_cd(True)
    assert g.vcpu.hw_cr0 & CR0_CD
    assert g.read(BASE).memtype == UC


def test_svm_shadow_guest_pat_ignored_but_cd_real() -> None:
    """§13: shadow paging = host MTRR type with PAT0; guest PAT ignored.
    On AMD the guest CD reaches hardware when the quirk is disabled (§11.3)."""
    g = G("svm", "6.8", tdp=False, quirks={"cd_nw_cleared": False})
    g.vcpu.set_msr(MSR_PAT, make_pat(*[UC] * 8))
    g.map4k(BASE, PCD | PWT)
    r = g.read(BASE)
    assert r.memtype == WB
    assert int(r.spte) & (PWT | PCD | PAT4K) == 0
    g.set_cd(True)
    assert g.read(BASE).memtype == UC


@pytest.mark.parametrize("era", ["4.2", "6.8", "6.16"])
@pytest.mark.parametrize("quirk_off", [False, True])
def test_vmx_hardware_cr0_never_has_cd_nw(era: str, quirk_off: bool) -> None:
    """§11.3: KVM_VM_CR0_ALWAYS_OFF = NW | CD on VMX."""
    quirks = {"cd_nw_cleared": False} if quirk_off and era != "6.16" else {}
    g = G("vmx", era, quirks=quirks)
    g.vcpu.set_sregs(cr0=g.vcpu.cr0 | CR0_CD | (1 << 29))
    assert g.vcpu.cr0 & CR0_CD
    assert not g.vcpu.hw_cr0 & (CR0_CD | (1 << 29))


@pytest.mark.parametrize("era", ["5.10", "6.8", "6.16"])
def test_vmx_shadow_paging_no_memtype_and_guest_pat_cd_ignored(era: str) -> None:
    """§13 / kvm-mmu.md §4.3, §4.6: without EPT no memtype is folded in; the
    effective type is the host MTRR type (WB RAM, UC BAR); guest PAT/CD ignored."""
    quirks = {} if era == "6.16" else {"cd_nw_cleared": False}
    g = G("vmx", era, tdp=False, noncoh=True, quirks=quirks)
    g.vcpu.set_msr(MSR_PAT, make_pat(*[UC] * 8))
    g.deftype(UC)
    g.map4k(BASE, PCD)
    g.map4k(MMIO_GPA, PWT)
    g.set_cd(True)
    r = g.read(BASE)
    assert r.memtype == WB
    assert int(r.spte) & (PWT | PCD | PAT4K) == 0
    assert g.read(MMIO_GPA).memtype == UC


@pytest.mark.parametrize("era", ["4.2", "6.6"])
def test_vmx_noncoh_cd_quirk_off_uc_ipat_overrides_guest_pat(era: str) -> None:
    """§7 (4.2-6.10): noncoherent + guest CD + quirk off = UC|IPAT, so even a
    guest WC page is UC (§5: IPAT ignores PAT)."""
    g = G("vmx", era, noncoh=True, quirks={"cd_nw_cleared": False})
    g.vcpu.set_msr(MSR_PAT, make_pat(WB, WC, UCM, UC, WB, WC, UCM, UC))
    g.map4k(BASE, PWT)
    g.set_cd(True)
    r = g.read(BASE)
    assert (ept(r.spte), int(r.memtype)) == ((UC, True), UC)


def test_mtrrcap_write_refused() -> None:
    """§4: IA32_MTRRCAP is read-only (msr_mtrr_valid lacks it): a write is #GP."""
    g = G(paging=False)
    with pytest.raises(kvmmu.KvmError):
        g.vcpu.set_msr(MSR_MTRRCAP, 0x508)
    assert g.vcpu.get_msr(MSR_MTRRCAP) == 0x508


@pytest.mark.parametrize("era", ["5.10", "6.8"])
def test_mtrr_write_while_disabled_zaps_only_for_def_type(era: str) -> None:
    """update_mtrr (MTRR-42/late): with E = 0 only a DEF_TYPE write zaps; with
    FE = 0 a fixed-range write does not zap."""
    g = _zap_vm("vmx", era, noncoh=True)
    g.deftype(WB, e=True, fe=False)  # DEF_TYPE write: zaps everything
    for gpa in (0x1000, BASE):
        g.read(gpa)
    g.vcpu.set_msr(0x250, make_pat(*[WT] * 8))  # FE = 0: no zap
    g.vcpu.set_msr(0x200, BASE | WT)  # E = 1: zaps [BASE, BASE + 2M)
    assert g.mapped(0x1000) and not g.mapped(BASE)
    g.read(BASE)
    g.deftype(WB, e=False, fe=True)  # zaps everything
    for gpa in (0x1000, BASE):
        g.read(gpa)
    g.vcpu.set_msr(0x200, BASE | WP)
    g.vcpu.set_msr(0x250, make_pat(*[WC] * 8))
    assert g.mapped(0x1000) and g.mapped(BASE)


# ------------------------------------------- §5 + §7 as one property (oracle)

_ERAS = ["3.13", "4.2", "4.19", "5.10", "6.1", "6.6", "6.7", "6.10"]
_ERAS += ["6.11", "6.12", "6.15", "6.16"]


def _ver(era: str) -> tuple[int, ...]:
    return tuple(int(x) for x in era.split("."))


def spec_mt_mask(
    era: str,
    *,
    mmio: bool,
    noncoh: bool,
    cd: bool,
    quirk_cd: bool,
    snoop: bool,
    igp: bool,
    mtrr: int,
) -> tuple[int, bool]:
    """spec/memtype.md §7 table, row by row: (EPT memtype, IPAT)."""
    v = _ver(era)
    if mmio:
        return UC, False
    if v < (4, 2):
        return (mtrr, False) if noncoh else (WB, True)
    if v < (6, 11):
        if not noncoh:
            return WB, True
        if cd:
            if not quirk_cd:
                return UC, True
            return (WB, True) if v < (6, 7) else (WB, False)
        return mtrr, False
    if v < (6, 12):
        return (WB, True) if not noncoh and not snoop else (WB, False)
    if v < (6, 16):
        return (WB, False) if noncoh else (WB, True)
    return (WB, True) if not noncoh and igp else (WB, False)


@settings(max_examples=120, deadline=None)
@given(
    era=st.sampled_from(_ERAS),
    mmio=st.booleans(),
    noncoh=st.booleans(),
    cd=st.booleans(),
    quirk_cd=st.booleans(),
    snoop=st.booleans(),
    igp=st.booleans(),
    mtrr=st.sampled_from(MTRR_TYPES),
    pat=st.lists(st.sampled_from(PAT_TYPES), min_size=8, max_size=8),
    index=st.integers(0, 7),
    huge=st.booleans(),
)
def test_vmx_memtype_oracle(
    era: str,
    mmio: bool,
    noncoh: bool,
    cd: bool,
    quirk_cd: bool,
    snoop: bool,
    igp: bool,
    mtrr: int,
    pat: list[int],
    index: int,
    huge: bool,
) -> None:
    """§5 + §7: SPTE (memtype, IPAT) is the §7 cell; the access type is the EPT
    memtype under IPAT, else Table 11-7(EPT memtype, guest PA[index])."""
    v = _ver(era)
    quirks: dict[str, bool] = {}
    if not quirk_cd and (4, 2) <= v < (6, 16):
        quirks["cd_nw_cleared"] = False
    if v >= (6, 16) and snoop and not igp:
        quirks["ignore_guest_pat"] = False
    if v >= (6, 16):
        quirk_cd = False  # inapplicable on VMX: starts disabled (§11.4)
    igp = igp or not snoop
    if v < (4, 2):
        quirk_cd = True  # no quirk yet: CD not considered
    g = G("vmx", era, snoop=snoop, noncoh=noncoh, quirks=quirks)
    g.deftype(mtrr)
    g.vcpu.set_msr(MSR_PAT, make_pat(*pat))
    base = MMIO_GPA if mmio else BASE
    bits = (PWT if index & 1 else 0) | (PCD if index & 2 else 0)
    if huge and not mmio:
        g.map2m(base, bits | (PAT2M if index & 4 else 0))
    else:
        g.map4k(base, bits | (PAT4K if index & 4 else 0))
    g.set_cd(cd)
    expected = spec_mt_mask(
        era, mmio=mmio, noncoh=noncoh, cd=cd, quirk_cd=quirk_cd, snoop=snoop, igp=igp, mtrr=mtrr
    )
    r = g.read(base)
    assert ept(r.spte) == expected
    mt, ipat = expected
    assert int(r.memtype) == (mt if ipat else spec_table_11_7(mt, pat[index]))


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_guest_paging_off_pat_type_is_wb(vendor: str) -> None:
    """§5: with guest paging off the PAT type is WB, so the access type is the
    host-side type: WB for RAM (SPTE WB, no IPAT), UC for the host BAR."""
    g = _honour_pat_vm(vendor, paging=False)
    g.vcpu.set_msr(MSR_PAT, make_pat(*[UC] * 8))
    assert g.read(BASE).memtype == WB
    assert g.read(MMIO_GPA).memtype == UC


@pytest.mark.parametrize(
    ("fixed", "fe", "level"),
    [((WB,) * 8, True, 2), ((WB,) * 7 + (WT,), True, 1), ((WB,) * 7 + (WT,), False, 2)],
)
def test_huge_page_at_gpa_0_checks_fixed_ranges(
    fixed: tuple[int, ...], fe: bool, level: int
) -> None:
    """§4/§8: consistency over [0, 2M) walks the fixed ranges (when FE = 1) and
    then the default type for the uncovered rest."""
    g = G("vmx", "6.8", noncoh=True)
    for msr in FIXED:
        g.vcpu.set_msr(msr, make_pat(*[WB] * 8))
    g.vcpu.set_msr(0x26F, make_pat(*fixed))
    g.deftype(WB, fe=fe)
    g.map2m(0)
    assert g.read(0x1000).level == level


# ------------------------- kvm-mmu.md §4.6: the memtype is fixed at SPTE creation


def test_huge_split_copies_memtype_bits() -> None:
    """kvm-mmu.md §4.6: make_small_spte copies memtype/IPAT unchanged."""
    g = G("vmx", "6.8", noncoh=True)
    g.deftype(WT)
    g.map2m(BASE)
    r = g.read(BASE)
    assert (r.level, ept(r.spte)) == (2, (WT, False))
    g.vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, RAM_SIZE, RAM_HVA)
    leaf = g.vm.mmu.translate(BASE + 0x5000)
    assert leaf is not None
    spte, level = leaf
    assert level == 1
    assert ept(spte) == (WT, False)


def test_cd_toggle_with_quirk_keeps_old_sptes() -> None:
    """§7/§11.2 (6.7-6.10): guest CD with the quirk on is not a zap trigger, so
    an existing SPTE keeps its guest-MTRR memtype; a new one is WB (no IPAT)."""
    g = G("vmx", "6.8", noncoh=True)
    g.deftype(WT)
    g.map4k(BASE)
    g.map4k(8 * MIB)
    assert ept(g.read(BASE).spte) == (WT, False)
    g.set_cd(True)
    assert ept(g.read(BASE).spte) == (WT, False)
    assert ept(g.read(8 * MIB).spte) == (WB, False)


def test_noncoh_registration_before_6_7_does_not_rebuild() -> None:
    """§11.1: before 6.7 no zap on registration; old SPTEs keep WB|IPAT."""
    g = G("vmx", "6.6")
    g.deftype(WT)
    g.map4k(BASE)
    g.map4k(8 * MIB)
    assert ept(g.read(BASE).spte) == (WB, True)
    g.vm.register_noncoherent_dma()
    assert ept(g.read(BASE).spte) == (WB, True)
    assert ept(g.read(8 * MIB).spte) == (WT, False)


def test_6_16_disable_quirk_does_not_zap_old_sptes() -> None:
    """§11.4: KVM_CAP_DISABLE_QUIRKS2 zaps nothing; new SPTEs see the new quirk set."""
    g = G("vmx", "6.16")
    g.map4k(BASE)
    g.map4k(8 * MIB)
    assert ept(g.read(BASE).spte) == (WB, True)
    g.vm.disable_quirks(KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    assert ept(g.read(BASE).spte) == (WB, True)
    assert ept(g.read(8 * MIB).spte) == (WB, False)


def test_physbase_write_with_zero_mask_zaps_from_base_up() -> None:
    """§4 var_mtrr_range: with PHYSMASK still 0 the extended mask is ~0 << MAXPHYADDR,
    so update_mtrr zaps [base, base + 2^MAXPHYADDR): everything above the base."""
    g = _zap_vm("vmx", "6.8", noncoh=True)
    g.vcpu.set_msr(0x202, (6 * MIB) | WT)  # PHYSBASE1, PHYSMASK1 = 0
    assert g.mapped(BASE) and g.mapped(0x1000)
    assert not g.mapped(8 * MIB)


@pytest.mark.parametrize("era", ["6.11", "6.12", "6.16"])
def test_no_mtrr_zaps_from_6_11(era: str) -> None:
    g = _zap_vm("vmx", era, noncoh=True)
    g.deftype(UC, fe=True)
    g.vcpu.set_msr(0x250, make_pat(*[WT] * 8))
    assert all(g.mapped(a) for a in (0x1000, BASE, 8 * MIB))


def test_svm_pat_msr_validation_and_reset() -> None:
    """§1/§2: the same kvm_pat_valid check and reset value on SVM (gPAT)."""
    g = G("svm", "6.8", paging=False)
    assert g.vcpu.get_msr(MSR_PAT) == PAT_RESET
    with pytest.raises(kvmmu.KvmError):
        g.vcpu.set_msr(MSR_PAT, PAT_RESET | (2 << 24))  # PA3: UC -> 2
    g.vcpu.set_msr(MSR_PAT, make_pat(WC, UCM, WP, WT, UC, WB, WC, UCM))
    assert g.vcpu.get_msr(MSR_PAT) == make_pat(WC, UCM, WP, WT, UC, WB, WC, UCM)
