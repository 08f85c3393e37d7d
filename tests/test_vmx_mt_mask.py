"""``vmx_get_mt_mask`` for every era row and column of spec/memtype.md §7."""

from __future__ import annotations

import pytest
from kvmmu.era import KernelVersion
from kvmmu.memtype import MSR_MTRR_DEF_TYPE, MemType
from kvmmu.plugins.vmx import VmxPlugin, vmx_get_mt_mask
from kvmmu.plugins.vmx.mt_mask import mt_value
from test_memtype_fakes import CR0_PE_PG, FakeVM

CD = 1 << 30
WB_IPAT, WB, UC, UC_IPAT = 0x70, 0x30, 0x00, 0x40
#: The guest MTRR type the fake guest programs (default type WT): 0x20 in the SPTE.
MTRR_WT = int(MemType.WT) << 3


def _mask(
    era: str,
    *,
    mmio: bool = False,
    noncoh: bool = False,
    cd: bool = False,
    disabled: tuple[str, ...] = (),
    self_snoop: bool = True,
) -> int | None:
    vm = FakeVM(era=era, noncoherent=int(noncoh), disabled=disabled, self_snoop=self_snoop)
    vcpu = vm.vcpus[0]
    vcpu.mtrr.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | int(MemType.WT))
    vcpu.cr0 = CR0_PE_PG | (CD if cd else 0)
    return VmxPlugin(vm).kvmmu_get_mt_mask(vm, vcpu, 0x12345, mmio)


# (era version, row name, mmio, !noncoh, noncoh&&CD quirk on, noncoh&&CD quirk off, noncoh&&!CD)
ROWS = [
    ("3.0", "2_6_3x", UC, WB_IPAT, MTRR_WT, MTRR_WT, MTRR_WT),
    ("3.13", "3_13", UC, WB_IPAT, MTRR_WT, MTRR_WT, MTRR_WT),
    ("4.2", "4_2", UC, WB_IPAT, WB_IPAT, UC_IPAT, MTRR_WT),
    ("6.6", "4_2_to_6_6", UC, WB_IPAT, WB_IPAT, UC_IPAT, MTRR_WT),
    ("6.7", "6_7", UC, WB_IPAT, WB, UC_IPAT, MTRR_WT),
    ("6.10", "6_7_to_6_10", UC, WB_IPAT, WB, UC_IPAT, MTRR_WT),
    ("6.11", "6_11_self_snoop", UC, WB, WB, WB, WB),
    ("6.12", "6_12", UC, WB_IPAT, WB, WB, WB),
    ("6.15", "6_12_to_6_15", UC, WB_IPAT, WB, WB, WB),
    ("6.16", "6_16", UC, WB_IPAT, WB, WB, WB),
]
_QUIRK_CD = ("cd_nw_cleared",)


def _cells() -> list[object]:
    out: list[object] = []
    for era, row, mmio, no_nc, cd_on, cd_off, no_cd in ROWS:
        quirk_off = _QUIRK_CD if KernelVersion(era) >= (4, 2) else ()
        out += [
            pytest.param(era, {"mmio": True, "noncoh": True}, mmio, id=f"{row}_mmio_is_uc_no_ipat"),
            pytest.param(era, {}, no_nc, id=f"{row}_no_noncoh"),
            pytest.param(era, {"noncoh": True, "cd": True}, cd_on, id=f"{row}_noncoh_cd_quirk_on"),
            pytest.param(
                era,
                {"noncoh": True, "cd": True, "disabled": quirk_off},
                cd_off,
                id=f"{row}_noncoh_cd_quirk_off",
            ),
            pytest.param(era, {"noncoh": True}, no_cd, id=f"{row}_noncoh_no_cd"),
        ]
    return out


@pytest.mark.parametrize(("era", "kw", "expected"), _cells())
def test_mt_mask_spec_memtype_7(era: str, kw: dict[str, object], expected: int) -> None:
    assert _mask(era, **kw) == expected  # type: ignore[arg-type]


def test_mt_mask_6_7_noncoh_cd_quirk_on_is_wb_no_ipat() -> None:
    assert _mask("6.8", noncoh=True, cd=True) == 0x30


def test_mt_mask_4_2_noncoh_cd_quirk_off_is_uc_ipat() -> None:
    assert _mask("5.4", noncoh=True, cd=True, disabled=_QUIRK_CD) == 0x40


def test_mt_mask_6_11_without_self_snoop_is_wb_ipat() -> None:
    assert _mask("6.11", self_snoop=False) == WB_IPAT
    assert _mask("6.11", self_snoop=False, noncoh=True) == WB


def test_mt_mask_6_16_ignore_guest_pat_disabled_is_wb_no_ipat() -> None:
    assert _mask("6.16", disabled=("ignore_guest_pat",)) == WB
    assert _mask("6.16", disabled=("ignore_guest_pat",), mmio=True) == UC


def test_mt_mask_mmio_never_ipat_any_era() -> None:
    for era in ("3.0", "4.2", "6.7", "6.11", "6.16"):
        for noncoh in (False, True):
            assert _mask(era, mmio=True, noncoh=noncoh) == 0


def test_mt_mask_noncoh_uses_per_gfn_guest_mtrr_type() -> None:
    vm = FakeVM(era="6.8", noncoherent=1)
    m = vm.vcpus[0].mtrr
    m.set_msr(MSR_MTRR_DEF_TYPE, (1 << 11) | int(MemType.WB))
    m.set_msr(0x200, 0x8000_0000 | int(MemType.UC))
    m.set_msr(0x201, ((1 << 46) - 1) & ~(0x1000_0000 - 1) | (1 << 11))
    plugin = VmxPlugin(vm)
    assert plugin.kvmmu_get_mt_mask(vm, None, 0x8000_0, False) == 0x00  # UC range
    assert plugin.kvmmu_get_mt_mask(vm, None, 0x1000, False) == 0x30  # default WB


def test_mt_mask_without_vcpu_uses_vcpu0() -> None:
    vm = FakeVM(era="6.8", noncoherent=1, vcpus=2)
    vm.vcpus[0].cr0 |= CD
    plugin = VmxPlugin(vm)
    assert plugin.kvmmu_get_mt_mask(vm, None, 1, False) == 0x30
    assert plugin.kvmmu_get_mt_mask(vm, vm.vcpus[1], 1, False) == 0x00  # MTRRs off: UC


@pytest.mark.parametrize("era", ["4.2", "5.19", "6.8", "6.15", "6.16"])
def test_mt_mask_none_without_ept_every_era(era: str) -> None:
    """No memtype is folded into shadow SPTEs (spec/kvm-mmu.md §4.6)."""
    vm = FakeVM(era=era, tdp=False, noncoherent=1)
    assert VmxPlugin(vm).kvmmu_get_mt_mask(vm, None, 1, True) is None


def test_pure_function_calls_guest_mtrr_only_when_consulted() -> None:
    calls: list[int] = []

    def mtrr() -> MemType:
        calls.append(1)
        return MemType.WP

    kw = {"cd_nw_cleared": True, "ignore_guest_pat": True, "self_snoop": True}
    assert vmx_get_mt_mask(
        "6.8", is_mmio=False, noncoherent_dma=False, guest_cd=False, guest_mtrr_type=mtrr, **kw
    ) == mt_value(MemType.WB, True)
    assert calls == []
    assert (
        vmx_get_mt_mask(
            "6.8", is_mmio=False, noncoherent_dma=True, guest_cd=False, guest_mtrr_type=mtrr, **kw
        )
        == int(MemType.WP) << 3
    )
    assert calls == [1]
