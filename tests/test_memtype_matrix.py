"""The ``kvmmu memtype`` matrix: shape, key cells per spec, plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kvmmu.memtype_matrix import MATRIX_KEYS, memtype_matrix, plot_matrix


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return memtype_matrix(("vmx", "svm"))


def _cell(rows: list[dict[str, Any]], **kw: object) -> dict[str, Any]:
    found = [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(found) == 1, (kw, len(found))
    return found[0]


def test_matrix_row_keys_and_labels(rows: list[dict[str, Any]]) -> None:
    assert all(tuple(r) == MATRIX_KEYS for r in rows)
    assert {r["effective"] for r in rows} <= {"UC", "WC", "WT", "WP", "WB", "UC-"}
    assert {r["era"] for r in rows if r["vendor"] == "vmx"} == {
        "2.6.32",
        "3.13",
        "4.2",
        "6.7",
        "6.11",
        "6.12",
        "6.16",
    }


def test_matrix_era_named_by_first_version() -> None:
    out = memtype_matrix(("vmx",), ("6.8",))
    assert {r["era"] for r in out} == {"6.7"}


def test_matrix_vmx_6_16_default_wc_on_ram_is_wb_ipat(rows: list[dict[str, Any]]) -> None:
    c = _cell(
        rows,
        vendor="vmx",
        era="6.16",
        quirks="default",
        noncoherent_dma=False,
        guest_cr0_cd=False,
        slot_kind="RAM",
        guest_pat="WC",
        guest_mtrr="WB",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("WB", True, "WB")


def test_matrix_vmx_6_16_quirk_off_honours_guest_wc(rows: list[dict[str, Any]]) -> None:
    c = _cell(
        rows,
        vendor="vmx",
        era="6.16",
        quirks="ignore_guest_pat",
        noncoherent_dma=False,
        guest_cr0_cd=False,
        slot_kind="RAM",
        guest_pat="WC",
        guest_mtrr="WB",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("WB", False, "WC")


def test_matrix_vmx_6_7_noncoh_guest_mtrr_and_cd(rows: list[dict[str, Any]]) -> None:
    c = _cell(
        rows,
        vendor="vmx",
        era="6.7",
        quirks="default",
        noncoherent_dma=True,
        guest_cr0_cd=False,
        slot_kind="RAM",
        guest_pat="WB",
        guest_mtrr="WT",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("WT", False, "WT")
    c = _cell(
        rows,
        vendor="vmx",
        era="6.7",
        quirks="cd_nw_cleared",
        noncoherent_dma=True,
        guest_cr0_cd=True,
        slot_kind="RAM",
        guest_pat="WC",
        guest_mtrr="WB",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("UC", True, "UC")


def test_matrix_mmio_uc_no_ipat_only_wc_survives(rows: list[dict[str, Any]]) -> None:
    for pat, eff in (("WC", "WC"), ("WB", "UC"), ("UC-", "UC")):
        c = _cell(
            rows,
            vendor="vmx",
            era="6.16",
            quirks="default",
            noncoherent_dma=False,
            guest_cr0_cd=False,
            slot_kind="MMIO",
            guest_pat=pat,
            guest_mtrr="WB",
        )
        assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("UC", False, eff)


def test_matrix_svm_no_spte_memtype_gpat_honoured(rows: list[dict[str, Any]]) -> None:
    c = _cell(
        rows,
        vendor="svm",
        era="6.16",
        quirks="default",
        noncoherent_dma=False,
        guest_cr0_cd=False,
        slot_kind="RAM",
        guest_pat="WC",
        guest_mtrr="UC",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == (None, None, "WC")
    c = _cell(
        rows,
        vendor="svm",
        era="6.16",
        quirks="cd_nw_cleared",
        noncoherent_dma=False,
        guest_cr0_cd=True,
        slot_kind="RAM",
        guest_pat="WB",
        guest_mtrr="WB",
    )
    assert c["effective"] == "UC"


def test_matrix_skips_quirk_sets_the_kernel_refuses() -> None:
    out = memtype_matrix(("vmx",), ("6.16",), host_self_snoop=False)
    assert {r["quirks"] for r in out} == {"default", "cd_nw_cleared"}


def test_plot_matrix_writes_png(tmp_path: Path) -> None:
    out = plot_matrix(memtype_matrix(("vmx", "svm"), ("6.8", "6.16")), tmp_path / "m.png")
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_matrix_refuses_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_matrix([], tmp_path / "m.png")


def test_matrix_rows_are_real_guest_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "No toys": each row is one ``vcpu.access`` read through a real ``kvmmu.VM``."""
    from kvmmu.vcpu import VCpu

    calls: list[tuple[int, str]] = []
    real = VCpu.access

    def counting(self: VCpu, gva: int, kind: Any = "read", *a: Any, **kw: Any) -> Any:
        calls.append((gva, kind))
        return real(self, gva, kind, *a, **kw)

    monkeypatch.setattr(VCpu, "access", counting)
    out = memtype_matrix(("vmx", "svm"), ("6.16",))
    assert len(calls) == len(out) and {k for _, k in calls} == {"read"}


def test_matrix_3_13_noncoh_uses_guest_variable_mtrr(rows: list[dict[str, Any]]) -> None:
    """memtype.md §7 row 3.13: noncoherent DMA -> guest MTRR type without IPAT;
    guest UC- over MTRR WC is WC (SDM Table 11-7)."""
    c = _cell(
        rows,
        vendor="vmx",
        era="3.13",
        quirks="default",
        noncoherent_dma=True,
        guest_cr0_cd=True,
        slot_kind="RAM",
        guest_pat="UC-",
        guest_mtrr="WC",
    )
    assert (c["spte_memtype"], c["ipat"], c["effective"]) == ("WC", False, "WC")


def test_matrix_6_11_without_self_snoop_is_wb_ipat() -> None:
    """memtype.md §7 row 6.11: WB|IPAT only when the CPU lacks self-snoop."""
    out = memtype_matrix(("vmx",), ("6.11",), host_self_snoop=False)
    coherent_ram = [r for r in out if r["slot_kind"] == "RAM" and not r["noncoherent_dma"]]
    assert {(r["spte_memtype"], r["ipat"], r["effective"]) for r in coherent_ram} == {
        ("WB", True, "WB")
    }


def test_matrix_shadow_paging_has_host_types_only() -> None:
    """Shadow SPTEs select host PAT0 (WB): RAM is WB, the UC BAR is UC (kvm-mmu.md §4.2)."""
    out = memtype_matrix(("vmx", "svm"), ("6.8",), tdp=False)
    assert {(r["spte_memtype"], r["ipat"]) for r in out} == {(None, None)}
    vmx = [r for r in out if r["vendor"] == "vmx"]
    assert {r["effective"] for r in vmx if r["slot_kind"] == "RAM"} == {"WB"}
    assert {r["effective"] for r in vmx if r["slot_kind"] == "MMIO"} == {"UC"}


def test_matrix_unknown_vendor_is_a_config_error() -> None:
    from kvmmu.errors import ConfigError

    with pytest.raises(ConfigError):
        memtype_matrix(("nosuch",))
