"""Guest MTRRs: MSRs, SDM precedence, KVM's per-era lookups (spec/memtype.md §4, §6, §8)."""

from __future__ import annotations

import pytest
from kvmmu.errors import GuestFault
from kvmmu.memtype import (
    ALL_GFNS_END,
    FIXED_MTRR_MSRS,
    MSR_MTRR_CAP,
    MSR_MTRR_DEF_TYPE,
    MemType,
    MtrrState,
    mtrr_physbase,
    mtrr_physmask,
)

UC, WC, WT, WP, WB = MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB
E, FE = 1 << 11, 1 << 10
V = 1 << 11
GIB = 1 << 30


def mtrrs(default: MemType = WB, *, fe: bool = False, e: bool = True) -> MtrrState:
    m = MtrrState()
    m.set_msr(MSR_MTRR_DEF_TYPE, (E if e else 0) | (FE if fe else 0) | int(default))
    return m


def add_var(m: MtrrState, n: int, base: int, size: int, t: MemType) -> None:
    """A contiguous variable range [base, base + size) of type t."""
    m.set_msr(mtrr_physbase(n), base | int(t))
    mask = ((1 << m.maxphyaddr) - 1) & ~(size - 1)
    m.set_msr(mtrr_physmask(n), mask | V)


def gp(m: MtrrState, index: int, value: int) -> None:
    with pytest.raises(GuestFault) as e:
        m.set_msr(index, value)
    assert (e.value.vector, e.value.error_code) == (13, 0)


# ----------------------------------------------------------------- MSRs


def test_mtrrcap_reads_0x508_and_is_read_only() -> None:
    m = MtrrState()
    assert m.get_msr(MSR_MTRR_CAP) == 0x508  # VCNT 8, FIX, WC
    gp(m, MSR_MTRR_CAP, 0x508)


def test_def_type_reserved_bits_gp() -> None:
    m = MtrrState()
    gp(m, MSR_MTRR_DEF_TYPE, 0x1000 | 6)  # bit 12 outside 0xcff
    gp(m, MSR_MTRR_DEF_TYPE, 0x100 | 6)  # bit 8 outside 0xcff
    gp(m, MSR_MTRR_DEF_TYPE, E | 7)  # UC- is PAT-only
    m.set_msr(MSR_MTRR_DEF_TYPE, E | FE | 6)
    assert m.get_msr(MSR_MTRR_DEF_TYPE) == 0xC06


@pytest.mark.parametrize("bad", [2, 3, 7, 8])
def test_fixed_range_invalid_type_gp(bad: int) -> None:
    m = MtrrState()
    gp(m, 0x26F, 0x0606060606060600 | bad)
    gp(m, 0x250, bad << 56)


def test_variable_range_reserved_bits_gp() -> None:
    m = MtrrState(maxphyaddr=40)
    gp(m, mtrr_physbase(0), 0x100 | 6)  # bits 11:8
    gp(m, mtrr_physbase(0), (1 << 40) | 6)  # above MAXPHYADDR
    gp(m, mtrr_physbase(0), 0x1000 | 2)  # reserved type
    gp(m, mtrr_physmask(0), 0x7FF & 0x10)  # bits 10:0
    gp(m, mtrr_physmask(0), (1 << 40) | V)
    m.set_msr(mtrr_physbase(7), 0xFFFF_F000 | 6)
    m.set_msr(mtrr_physmask(7), 0xFF_FFFF_F000 | V)
    assert m.get_msr(mtrr_physbase(7)) == 0xFFFF_F006
    assert m.get_msr(mtrr_physmask(7)) == 0xFF_FFFF_F800


def test_non_mtrr_msr_gp() -> None:
    gp(MtrrState(), 0x277, 0)
    gp(MtrrState(), 0x210, 0)  # past the 8 variable pairs


# The 11 fixed-range MSRs: (msr, first address, granule) per SDM Table 11-9.
FIXED_LAYOUT = [
    (0x250, 0x00000, 0x10000),
    (0x258, 0x80000, 0x4000),
    (0x259, 0xA0000, 0x4000),
    *[(0x268 + i, 0xC0000 + i * 0x8000, 0x1000) for i in range(8)],
]


@pytest.mark.parametrize(("msr", "start", "granule"), FIXED_LAYOUT)
def test_fixed_range_msr_bytes_cover_ascending_subranges(
    msr: int, start: int, granule: int
) -> None:
    assert msr in FIXED_MTRR_MSRS
    m = mtrrs(WB, fe=True)
    types = [UC, WC, WT, WP, WB, UC, WC, WT]
    m.set_msr(msr, sum(int(t) << (8 * i) for i, t in enumerate(types)))
    assert m.get_msr(msr) == sum(int(t) << (8 * i) for i, t in enumerate(types))
    for i, t in enumerate(types):
        for gpa in (start + i * granule, start + (i + 1) * granule - 0x1000):
            assert m.mtrr_type(gpa) is t
            assert m.guest_memory_type(gpa >> 12, "6.8") is t


def test_fixed_ranges_cover_exactly_first_mib() -> None:
    assert len(FIXED_MTRR_MSRS) == 11
    m = mtrrs(WB, fe=True)  # fixed ranges all UC (0)
    assert m.mtrr_type(0xFF000) is UC
    assert m.mtrr_type(0x100000) is WB


# ------------------------------------------------- SDM precedence rules


def test_rule1_disabled_is_uc_sdm() -> None:
    m = mtrrs(WB, fe=True, e=False)
    add_var(m, 0, 0, GIB, WB)
    assert m.mtrr_type(0x1000) is UC
    assert m.mtrr_type(2 * GIB) is UC


def test_rule2_fixed_ranges_take_precedence_below_1mib() -> None:
    m = mtrrs(WB, fe=True)
    m.set_msr(0x250, 0x0505050505050505)  # WP
    add_var(m, 0, 0, GIB, UC)
    assert m.mtrr_type(0x1000) is WP
    assert m.guest_memory_type(1, "6.10") is WP
    assert m.guest_memory_type(1, "4.1") is WP


def test_rule2_fe_clear_ignores_fixed_ranges() -> None:
    m = mtrrs(WB, fe=False)
    m.set_msr(0x250, 0x0505050505050505)
    add_var(m, 0, 0, GIB, WT)
    assert m.mtrr_type(0x1000) is WT
    assert m.guest_memory_type(1, "6.10") is WT


def test_rule3_single_variable_match() -> None:
    m = mtrrs(UC)
    add_var(m, 0, GIB, GIB, WC)
    assert m.mtrr_type(GIB + 0x5000) is WC
    assert m.guest_memory_type((GIB >> 12) + 5, "6.10") is WC
    assert m.guest_memory_type((GIB >> 12) + 5, "4.1") is WC


def test_rule4_equal_overlap() -> None:
    m = mtrrs(UC)
    add_var(m, 0, 0, 2 * GIB, WP)
    add_var(m, 1, GIB, GIB, WP)
    for era in ("4.1", "5.10", "6.10"):
        assert m.guest_memory_type(GIB >> 12, era) is WP
    assert m.mtrr_type(GIB) is WP


@pytest.mark.parametrize("era", ["3.13", "4.2", "6.10"])
def test_rule5_uc_overlap_wins_when_kvm_meets_uc_last(era: str) -> None:
    m = mtrrs(WB)
    add_var(m, 0, 0, 4 * GIB, UC)
    add_var(m, 1, GIB, GIB, WB)  # higher base: first in KVM's list
    assert m.mtrr_type(GIB) is UC
    assert m.guest_memory_type(GIB >> 12, era) is UC


def test_rule5_uc_inside_wb_is_uc_every_era_by_default() -> None:
    """spec/memtype.md §4 rule 5 and §6: "In every era, UC in any overlapping
    range wins" - the model's default."""
    m = mtrrs(WB)
    add_var(m, 0, 0, 4 * GIB, WB)
    add_var(m, 1, GIB, GIB, UC)
    assert m.mtrr_type(GIB) is UC
    for era in ("4.1", "4.2", "5.10", "6.10"):
        assert m.guest_memory_type(GIB >> 12, era) is UC


def test_rule5_kvm_visit_order_uc_met_first_then_wb_gives_wb() -> None:
    """``kvm_mtrr_get_guest_memory_type`` checks only the *current* type for UC.

    KVM keeps enabled ranges ordered by descending base (``set_var_mtrr_msr``),
    so an inner UC range (higher base) is met before the enclosing WB range;
    the pair then falls to the "undefined" branch and returns WB. The SDM
    (and the pre-4.2 ``get_mtrr_type``, which checks both) give UC. Opt-in:
    ``kvm_visit_order`` (``[plugins.vmx] mtrr_kvm_visit_order``).
    """
    m = mtrrs(WB)
    add_var(m, 0, 0, 4 * GIB, WB)
    add_var(m, 1, GIB, GIB, UC)
    assert m.guest_memory_type(GIB >> 12, "4.1", kvm_visit_order=True) is UC
    assert m.guest_memory_type(GIB >> 12, "4.2", kvm_visit_order=True) is WB
    assert m.guest_memory_type(GIB >> 12, "6.10", kvm_visit_order=True) is WB
    # visited the other way round (UC has the lower base) KVM does give UC
    m2 = mtrrs(WB)
    add_var(m2, 0, GIB, GIB, WB)
    add_var(m2, 1, 0, 4 * GIB, UC)
    assert m2.guest_memory_type(GIB >> 12, "6.10", kvm_visit_order=True) is UC


@pytest.mark.parametrize("era", ["3.13", "4.2", "6.10"])
def test_rule6_wt_wb_overlap_is_wt_every_era(era: str) -> None:
    m = mtrrs(UC)
    add_var(m, 0, 0, 4 * GIB, WB)
    add_var(m, 1, GIB, GIB, WT)
    assert m.mtrr_type(GIB) is WT
    assert m.guest_memory_type(GIB >> 12, era) is WT


def test_rule7_other_overlap_undefined_sdm_uc_before_4_2_wb_after() -> None:
    m = mtrrs(UC)
    add_var(m, 0, 0, 4 * GIB, WC)
    add_var(m, 1, GIB, GIB, WP)
    assert m.mtrr_type(GIB) is None
    assert m.guest_memory_type(GIB >> 12, "4.1") is UC
    assert m.guest_memory_type(GIB >> 12, "4.2") is WB
    assert m.guest_memory_type(GIB >> 12, "6.10") is WB


def test_rule8_no_match_is_default_type() -> None:
    m = mtrrs(WT)
    add_var(m, 0, 0, GIB, WB)
    assert m.mtrr_type(3 * GIB) is WT
    for era in ("4.1", "4.2", "6.10"):
        assert m.guest_memory_type((3 * GIB) >> 12, era) is WT


def test_disabled_mtrrs_per_era_spec_6() -> None:
    m = mtrrs(WT, e=False)
    assert m.guest_memory_type(0x100, "4.1") is WB  # 0xFF -> WB
    assert m.guest_memory_type(0x100, "4.2") is WT  # the default-type field
    assert m.guest_memory_type(0x100, "5.10") is UC  # mtrr_disabled_type
    m.guest_has_mtrr = False
    assert m.guest_memory_type(0x100, "6.10") is WB  # no CPUID.MTRR -> WB


def test_guest_mtrrs_ignored_from_6_11() -> None:
    m = mtrrs(UC)
    add_var(m, 0, 0, GIB, UC)
    assert m.guest_memory_type(0x100, "6.10") is UC
    assert m.guest_memory_type(0x100, "6.11") is WB
    assert m.get_msr(mtrr_physbase(0)) == 0  # still stored and read back


def test_kvm_var_list_descends_by_base() -> None:
    m = mtrrs(WB)
    add_var(m, 0, GIB, GIB, UC)
    add_var(m, 1, 2 * GIB, GIB, UC)
    add_var(m, 2, 0, GIB, UC)
    assert m.var_order == [1, 0, 2]
    m.set_msr(mtrr_physmask(1), 0)  # V cleared: leaves the list
    assert m.var_order == [0, 2]


# ------------------------------------------- kvm_mtrr_check_gfn_range_consistency


def test_consistency_uniform_range() -> None:
    m = mtrrs(WB)
    assert m.check_gfn_range_consistency(0x40000, 512)
    add_var(m, 0, 0, 4 * GIB, WB)
    assert m.check_gfn_range_consistency(0x40000, 512 * 512)


def test_consistency_mixed_types_inside_2m() -> None:
    m = mtrrs(WB)
    add_var(m, 0, GIB + 0x1000 * 16, 0x1000 * 16, UC)
    gfn = GIB >> 12
    assert not m.check_gfn_range_consistency(gfn, 512)
    assert m.check_gfn_range_consistency(gfn, 16)


def test_consistency_partial_cover_equal_to_default() -> None:
    m = mtrrs(WB)
    add_var(m, 0, GIB, 0x100000, WB)  # 1 MiB of WB inside a 2 MiB page
    assert m.check_gfn_range_consistency(GIB >> 12, 512)
    m2 = mtrrs(UC)
    add_var(m2, 0, GIB, 0x100000, WB)
    assert not m2.check_gfn_range_consistency(GIB >> 12, 512)


def test_consistency_disabled_is_true() -> None:
    m = mtrrs(WB, e=False, fe=True)
    add_var(m, 0, GIB, 0x1000, UC)
    assert m.check_gfn_range_consistency(GIB >> 12, 512)


def test_consistency_fixed_ranges_in_first_2m() -> None:
    m = mtrrs(WB, fe=True)
    for msr in FIXED_MTRR_MSRS:
        m.set_msr(msr, 0x0606060606060606)
    add_var(m, 0, 0, 0x200000, WB)
    assert m.check_gfn_range_consistency(0, 512)
    m.set_msr(0x259, 0x0606060606060600)  # one 16K range UC at 0xA0000
    assert not m.check_gfn_range_consistency(0, 512)
    assert m.max_mapping_level(0, 3) == 1


def test_max_mapping_level_lowers_until_consistent() -> None:
    m = mtrrs(WB)
    add_var(m, 0, GIB + 0x200000, 0x200000, UC)  # 2 MiB UC inside the 2nd 1G page
    gfn = (GIB + 0x200000) >> 12
    assert m.max_mapping_level(gfn, 3) == 2
    assert m.max_mapping_level(gfn - 512, 3) == 2
    assert m.max_mapping_level(0, 3) == 3


# --------------------------------------------------- update_mtrr zap ranges


def test_zap_range_fixed_msr_span_only_with_fe() -> None:
    m = mtrrs(WB, fe=True)
    m.set_msr(0x259, 0)
    assert m.zap_range_after_write(0x259) == (0xA0, 0xC0)
    assert m.zap_range_after_write(0x26F) == (0xF8, 0x100)
    m.set_msr(MSR_MTRR_DEF_TYPE, E | 6)
    assert m.zap_range_after_write(0x259) is None


def test_zap_range_def_type_is_everything_even_when_disabling() -> None:
    m = mtrrs(WB, e=False)
    assert m.zap_range_after_write(MSR_MTRR_DEF_TYPE) == (0, ALL_GFNS_END)
    assert m.zap_range_after_write(mtrr_physbase(0)) is None  # disabled: no zap


def test_zap_range_variable_span() -> None:
    m = mtrrs(WB)
    add_var(m, 3, 2 * GIB, GIB, UC)
    assert m.zap_range_after_write(mtrr_physmask(3)) == ((2 * GIB) >> 12, (3 * GIB) >> 12)
    assert m.zap_range_after_write(0x277) is None


@pytest.mark.parametrize(("maxphy", "ok"), [(46, False), (52, True)])
def test_variable_range_reserved_bits_follow_vm_maxphyaddr(maxphy: int, ok: bool) -> None:
    """``kvm_mtrr_valid``: bits above the guest MAXPHYADDR are reserved (spec §4).

    The vCPU's MTRRs use the VM's physical-address width, not a fixed 46.
    """
    import kvmmu
    from kvmmu.errors import KvmError

    v = kvmmu.VM(kvmmu.VMConfig(host_maxphyaddr=maxphy))
    mask = (1 << 50) | (1 << 11)
    if ok:
        v.vcpus[0].set_msr(mtrr_physmask(0), mask)
        assert v.vcpus[0].get_msr(mtrr_physmask(0)) == mask
    else:
        with pytest.raises(KvmError):
            v.vcpus[0].set_msr(mtrr_physmask(0), mask)
