"""Encodings, the PAT MSR and SDM Table 11-7 (spec/memtype.md §1–§3)."""

from __future__ import annotations

import pytest
from kvmmu.errors import GuestFault
from kvmmu.memtype import (
    MEMTYPE_LABELS,
    MSR_IA32_CR_PAT,
    PAT_DEFAULT,
    MemType,
    check_pat_write,
    effective_type,
    kvm_pat_valid,
    make_pat,
    pat_entries,
    pat_index,
    pat_type,
    valid_mtrr_type,
    valid_pat_type,
)

UC, WC, WT, WP, WB, UCM = (
    MemType.UC,
    MemType.WC,
    MemType.WT,
    MemType.WP,
    MemType.WB,
    MemType.UC_MINUS,
)


def test_memtype_encodings_sdm_table_11_10() -> None:
    assert [int(t) for t in (UC, WC, WT, WP, WB, UCM)] == [0, 1, 4, 5, 6, 7]
    assert [t.label for t in MemType] == ["UC", "WC", "WT", "WP", "WB", "UC-"]
    assert MemType.from_label("UC-") is UCM
    assert MEMTYPE_LABELS["WB"] is WB
    with pytest.raises(ValueError):
        MemType.from_label("WC+")


def test_valid_types_kvm_masks_0xf3_0x73() -> None:
    assert [t for t in range(9) if valid_pat_type(t)] == [0, 1, 4, 5, 6, 7]
    assert [t for t in range(9) if valid_mtrr_type(t)] == [0, 1, 4, 5, 6]


def test_pat_msr_index_and_default_table_11_12() -> None:
    assert MSR_IA32_CR_PAT == 0x277
    assert PAT_DEFAULT == 0x0007040600070406
    assert pat_entries(PAT_DEFAULT) == (WB, WT, UCM, UC, WB, WT, UCM, UC)


@pytest.mark.parametrize("pat", [0, 1])
@pytest.mark.parametrize("pcd", [0, 1])
@pytest.mark.parametrize("pwt", [0, 1])
def test_pat_index_table_11_11(pat: int, pcd: int, pwt: int) -> None:
    assert pat_index(pat, pcd, pwt) == 4 * pat + 2 * pcd + pwt


def test_pat_type_reads_entry_bytes() -> None:
    value = make_pat(WC, UC, WT, WP, WB, UCM, UC, WC)
    assert [pat_type(value, i) for i in range(8)] == [WC, UC, WT, WP, WB, UCM, UC, WC]
    with pytest.raises(ValueError):
        pat_type(value, 8)


@pytest.mark.parametrize(
    "value",
    [
        0x0007040600070402,  # PA0 = 2 (reserved)
        0x0307040600070406,  # PA7 = 3 (reserved)
        0x0007040600070408,  # PA0 bit 3 set
        0x8007040600070406,  # PA7 bit 7 set
        1 << 64,
    ],
)
def test_kvm_pat_valid_rejects_reserved_and_types_2_3(value: int) -> None:
    assert not kvm_pat_valid(value)
    with pytest.raises(GuestFault) as e:
        check_pat_write(value)
    assert (e.value.vector, e.value.error_code) == (13, 0)


def test_kvm_pat_valid_accepts_every_valid_type() -> None:
    for t in (UC, WC, WT, WP, WB, UCM):
        assert kvm_pat_valid(make_pat(*([t] * 8)))
    assert check_pat_write(PAT_DEFAULT) == PAT_DEFAULT


# SDM Table 11-7 exactly as spec/memtype.md §3 gives it: rows MTRR, columns PAT.
_COLS = (UC, UCM, WC, WT, WB, WP)
TABLE_11_7 = {
    UC: (UC, UC, WC, UC, UC, UC),
    WC: (UC, WC, WC, UC, WC, UC),
    WT: (UC, UC, WC, WT, WT, WP),
    WB: (UC, UC, WC, WT, WB, WP),
    WP: (UC, WC, WC, WT, WP, WP),
}
CELLS = [
    pytest.param(m, p, TABLE_11_7[m][i], id=f"{m.label}_{p.label}")
    for m in TABLE_11_7
    for i, p in enumerate(_COLS)
]


@pytest.mark.parametrize(("mtrr", "pat", "expected"), CELLS)
def test_table_11_7(mtrr: MemType, pat: MemType, expected: MemType) -> None:
    assert effective_type(mtrr, pat) is expected


def test_table_11_7_has_all_30_cells() -> None:
    assert len(CELLS) == 30


def test_table_11_7_rejects_uc_minus_as_mtrr() -> None:
    with pytest.raises(ValueError):
        effective_type(UCM, WB)
