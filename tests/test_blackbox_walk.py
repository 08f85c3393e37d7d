"""Black-box tests of the guest page-table walker against the SDM paging rules.

Written from Intel SDM Vol 3A ch. 4 (§4.3 32-bit paging and PSE-36, §4.4 PAE,
§4.5 4-/5-level paging, §4.6 access rights incl. CR0.WP, SMEP, SMAP and
protection keys, §4.7 the #PF error code, §4.8 A/D flags) and from KVM's
``paging_tmpl.h: FNAME(walk_addr_generic)`` / ``mmu.h: permission_fault``
where the spec says the model follows KVM (A/D only after a successful walk).

Every case runs through the scalar walker and the numpy batch walker, which
must agree field by field. A reference walker written here, straight from the
SDM tables, is compared with the model on random page-table chains. The vCPU
tests drive ``vcpu.access`` over ``GuestPageTables`` with TDP and with the
shadow MMU: both must inject the same #PF and write the same A/D bits.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import make_vm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu.errors import KvmError
from kvmmu.guest_pt import GuestPageTables
from kvmmu.paging import (
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PFERR_FETCH,
    PFERR_PK,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    WalkResult,
    walk,
    walk_batch,
)

P, W, U, RSVD, ID, PK = (
    PFERR_PRESENT,
    PFERR_WRITE,
    PFERR_USER,
    PFERR_RSVD,
    PFERR_FETCH,
    PFERR_PK,
)
PRW = PTE_P | PTE_RW | PTE_US
LONG = EFER_LME | EFER_LMA
CR3 = 0x1000


def bit(n: int) -> int:
    return 1 << n


# --------------------------------------------------------------------------
# building tables and running both walkers


class Mem(dict[int, int]):
    """Sparse guest memory of page-table entries keyed by entry address."""

    def __init__(self, entry_size: int = 8) -> None:
        super().__init__()
        self.entry_size = entry_size

    def read(self, addr: int) -> int:
        v = self.get(addr, 0)
        if self.entry_size == 4:
            # A 4-byte entry: a reader of 8 bytes sees the next entry above.
            v |= self.get(addr + 4, 0) << 32
        return v

    def read_many(self, addrs: np.ndarray) -> np.ndarray:
        return np.array([self.read(int(a)) for a in addrs], dtype=np.uint64)


@dataclass
class Mode:
    """A paging mode: name in {'32', 'pae', '4', '5'} and its CR4/EFER bits."""

    name: str
    nxe: bool = True
    pse: bool = True

    @property
    def cr4(self) -> int:
        return {
            "32": CR4_PSE if self.pse else 0,
            "pae": CR4_PAE,
            "4": CR4_PAE,
            "5": CR4_PAE | CR4_LA57,
        }[self.name]

    @property
    def efer(self) -> int:
        return (LONG if self.name in ("4", "5") else 0) | (EFER_NXE if self.nxe else 0)

    @property
    def levels(self) -> list[int]:
        return {"32": [2, 1], "pae": [3, 2, 1], "4": [4, 3, 2, 1], "5": [5, 4, 3, 2, 1]}[self.name]

    def index(self, gva: int, level: int) -> int:
        if self.name == "32":
            return (gva >> (12 + 10 * (level - 1))) & 0x3FF
        if self.name == "pae" and level == 3:
            return (gva >> 30) & 3
        return (gva >> (12 + 9 * (level - 1))) & 0x1FF

    @property
    def esize(self) -> int:
        return 4 if self.name == "32" else 8


L4 = Mode("4")
L5 = Mode("5")
PAE = Mode("pae")
B32 = Mode("32")


def table_at(k: int) -> int:
    """Where the table of the k-th level below the root lives."""
    return 0x10000 * (k + 2)


def chain(
    mode: Mode, gva: int, values: list[int], cr3: int = CR3, raw: frozenset[int] = frozenset()
) -> tuple[Mem, list[int]]:
    """Tables for ``gva`` whose entries, top level first, are ``values``.

    Every value except the last gets OR-ed with the address of the next
    table (so ``values`` hold only flags and extra bits for non-leaf
    entries); the last value is stored as given. Returns memory and the
    entry addresses. Values whose index is in ``raw`` are stored as given too.
    """
    mem = Mem(mode.esize)
    table = cr3 & (~0x1F if mode.name == "pae" else ~0xFFF)
    addrs = []
    for k, (level, v) in enumerate(zip(mode.levels, values, strict=False)):
        addr = table + mode.index(gva, level) * mode.esize
        addrs.append(addr)
        last = k == len(values) - 1
        mem[addr] = v if last or k in raw else v | table_at(k)
        table = table_at(k)
    return mem, addrs


def ups(mode: Mode, count: int) -> list[int]:
    """``count`` well-formed upper entries (a PAE PDPTE has no R/W, U/S: bits 2:1 reserved)."""
    return ([PTE_P] + [PRW] * (count - 1))[:count] if mode.name == "pae" else [PRW] * count


def none_to(v: int | None, d: int) -> int:
    return d if v is None else v


def run(
    mem: Mem,
    mode: Mode,
    gva: int,
    access: str = "read",
    *,
    cpl: int = 0,
    wp: bool = True,
    smep: bool = False,
    smap: bool = False,
    pke: bool = False,
    ac: bool = False,
    pkru: int = 0,
    maxphyaddr: int = 52,
    cr3: int = CR3,
) -> WalkResult:
    """Walk with the scalar walker; assert the batch walker agrees exactly."""
    cr4 = mode.cr4 | (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0)
    cr4 |= CR4_PKE if pke else 0
    kw: dict[str, Any] = dict(
        cr0=CR0_PG | (CR0_WP if wp else 0) | 1,
        cr3=cr3,
        cr4=cr4,
        efer=mode.efer,
        cpl=cpl,
        access=access,
        rflags_ac=ac,
        pkru=pkru,
        maxphyaddr=maxphyaddr,
    )
    r = walk(mem.read, gva=gva, **kw)
    b = walk_batch(mem.read_many, gvas=np.array([gva & (2**64 - 1)], np.uint64), **kw)
    assert len(b) == 1
    assert (
        bool(b.fault[0]),
        int(b.vector[0]),
        int(b.error_code[0]),
        int(b.gpa[0]),
        int(b.level[0]),
        int(b.pat[0]),
        int(b.pcd[0]),
        int(b.pwt[0]),
        b.ad_writes,
    ) == (
        r.fault,
        none_to(r.vector, -1),
        r.error_code,
        none_to(r.gpa, 0),
        none_to(r.level, 0),
        r.pat,
        r.pcd,
        r.pwt,
        r.ad_writes,
    ), "batch walker disagrees with the scalar walker"
    return r


def pf(r: WalkResult) -> int:
    """The #PF error code (asserting a #PF was raised)."""
    assert r.fault and r.vector == 14, r
    assert r.gpa is None and r.ad_writes == {}
    return r.error_code


def ok(r: WalkResult) -> int:
    assert not r.fault and r.vector is None and r.error_code == 0, r
    assert r.gpa is not None
    return r.gpa


# --------------------------------------------------------------------------
# §4.7 error codes: the exact bits of each fault kind


GVA = 0x0000_1234_5678_9ABC
LEAF = 0x0005_5555_5000


@pytest.mark.parametrize("mode", [L4, L5, PAE], ids=lambda m: m.name)
@pytest.mark.parametrize("access", ["read", "write", "fetch"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_not_present_code_at_every_level(mode: Mode, access: str, cpl: int) -> None:
    """§4.7: P=0 for a not-present entry at any level; W, U/S, I/D from the access."""
    gva = GVA & 0xFFFF_FFFF if mode.name == "pae" else GVA
    want = (W if access == "write" else 0) | (U if cpl == 3 else 0)
    want |= ID if access == "fetch" else 0  # NXE=1
    for depth in range(len(mode.levels)):
        values = [PRW] * depth + [PRW & ~PTE_P | PTE_RW | PTE_US | 0x5000]
        if mode.name == "pae" and depth:
            values[0] = PTE_P  # a PDPTE has no R/W or U/S (bits 2:1 reserved)
        mem, _ = chain(mode, gva, values)
        assert pf(run(mem, mode, gva, access, cpl=cpl)) == want, depth


@pytest.mark.parametrize("access", ["read", "write", "fetch"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_rsvd_code_carries_p_and_access_bits(access: str, cpl: int) -> None:
    """§4.7: a reserved-bit violation reports RSVD=1 and P=1, with W, U/S, I/D."""
    want = RSVD | P | (W if access == "write" else 0) | (U if cpl == 3 else 0)
    want |= ID if access == "fetch" else 0
    for depth in range(4):
        values = [PRW, PRW, PRW, LEAF | PRW]
        values[depth] |= bit(51) | (PTE_PS if depth == 0 else 0)
        mem, _ = chain(L4, GVA, values)
        assert pf(run(mem, L4, GVA, access, cpl=cpl, maxphyaddr=46)) == want, depth


def test_fetch_flag_needs_nxe_or_smep() -> None:
    """§4.7: I/D=1 only if CR4.SMEP=1 or (PAE/long paging and EFER.NXE=1).

    The walker follows the SDM here (as QEMU does). KVM's own walker tests
    ``is_efer_nx(mmu) || is_cr4_smep(mmu)`` and ``kvm_calc_cpu_role`` sets
    ``efer_nx`` under 32-bit paging too, so a shadow-paged 32-bit guest with
    EFER.NXE=1 would see I/D=1 from KVM (an EPT guest gets the CPU's #PF).
    """
    for mode in (Mode("4", nxe=False), Mode("pae", nxe=False), Mode("32", nxe=True)):
        gva = 0x40_0000
        mem, _ = chain(mode, gva, [*ups(mode, len(mode.levels) - 1), 0])
        assert pf(run(mem, mode, gva, "fetch")) == 0, mode.name
        assert pf(run(mem, mode, gva, "fetch", cpl=3)) == U, mode.name
        assert pf(run(mem, mode, gva, "fetch", smep=True)) == ID, mode.name
    mem, _ = chain(L4, 0x40_0000, [PRW] * 3 + [0])
    assert pf(run(mem, L4, 0x40_0000, "fetch")) == ID


def test_non_canonical_is_gp_whatever_the_tables_say() -> None:
    """§3.3.7.1 / §4.5: a non-canonical linear address is #GP(0) before any walk."""
    for mode, gva in (
        (L4, 0x0000_8000_0000_0000),
        (L4, 0xFFFF_7FFF_FFFF_F000),
        (L5, 0x0100_0000_0000_0000),
        (L5, 0xFEFF_FFFF_FFFF_F000),
    ):
        mem, _ = chain(mode, gva, [PRW | bit(51)] + [PRW] * 4)
        for access in ("read", "write", "fetch"):
            r = run(mem, mode, gva, access, cpl=3)
            assert (r.fault, r.vector, r.error_code, r.ad_writes) == (True, 13, 0, {})
    # The top canonical halves are fine, and LA57 widens the space.
    mem, _ = chain(L5, 0x0000_8000_0000_0000, [PRW] * 4 + [LEAF | PRW])
    assert ok(run(mem, L5, 0x0000_8000_0000_0000)) == LEAF
    mem, _ = chain(L4, 0xFFFF_8000_0000_0000, [PRW] * 3 + [LEAF | PRW])
    assert ok(run(mem, L4, 0xFFFF_8000_0000_0000)) == LEAF


# --------------------------------------------------------------------------
# precedence: not-present vs reserved vs permission vs protection key


def test_not_present_upper_hides_reserved_below() -> None:
    """The walk stops at the first not-present entry: lower entries are not read."""
    mem, _ = chain(L4, GVA, [PRW, PRW, PRW & ~PTE_P | bit(51), LEAF | PRW | bit(51)])
    assert pf(run(mem, L4, GVA, "write", cpl=3, maxphyaddr=40)) == W | U


def test_not_present_entry_with_reserved_bits_is_not_present() -> None:
    """§4.7: reserved bits are checked only in present entries (P=0: RSVD=0)."""
    for v in (bit(51), PTE_NX, PTE_PS | bit(51)):
        mem, _ = chain(Mode("4", nxe=False), GVA, [PRW, v])
        assert pf(run(mem, Mode("4", nxe=False), GVA, maxphyaddr=36)) == 0


def test_reserved_above_hides_not_present_below() -> None:
    mem, _ = chain(L4, GVA, [PRW | bit(45), PRW, 0])
    assert pf(run(mem, L4, GVA, maxphyaddr=40)) == RSVD | P


def test_reserved_beats_permission_and_pk() -> None:
    """A reserved bit fails the walk before ``permission_fault`` runs: no PK."""
    leaf = LEAF | PTE_P | PTE_US | bit(50) | (3 << 59)  # read-only, user, key 3
    mem, _ = chain(L4, GVA, [PRW, PRW, PRW, leaf])
    r = run(mem, L4, GVA, "write", cpl=3, pke=True, pkru=0b11 << 6, maxphyaddr=39)
    assert pf(r) == RSVD | P | W | U


def test_permission_and_pk_together_report_pk() -> None:
    """KVM ``permission_fault``: PK is OR-ed in whenever the key denies the access."""
    leaf = LEAF | PTE_P | PTE_US | (5 << 59)  # read-only user page, key 5
    mem, _ = chain(L4, GVA, [PRW, PRW, PRW, leaf])
    r = run(mem, L4, GVA, "write", cpl=3, pke=True, pkru=0b10 << 10)
    assert pf(r) == P | W | U | PK
    # The key alone denies a write to a writable page.
    mem, _ = chain(L4, GVA, [PRW, PRW, PRW, leaf | PTE_RW])
    assert pf(run(mem, L4, GVA, "write", cpl=3, pke=True, pkru=0b10 << 10)) == P | W | U | PK
    assert ok(run(mem, L4, GVA, "read", cpl=3, pke=True, pkru=0b10 << 10)) == LEAF | 0xABC


# --------------------------------------------------------------------------
# reserved bits per MAXPHYADDR at every level (Tables 4-14 .. 4-20)


@pytest.mark.parametrize("m", [36, 39, 46, 52])
@pytest.mark.parametrize("mode", [L4, L5], ids=lambda m: m.name)
def test_address_bits_at_and_above_maxphyaddr_every_level(m: int, mode: Mode) -> None:
    n = len(mode.levels)
    for depth in range(n):
        for b in range(m, 52):
            values = [PRW] * n
            values[-1] = LEAF & ((1 << m) - 1) | PRW
            values[depth] |= bit(b)
            mem, _ = chain(mode, GVA, values)
            assert pf(run(mem, mode, GVA, maxphyaddr=m)) == RSVD | P, (depth, b)
        # Bit M-1 is an address bit: no reserved-bit fault.
        values = [PRW] * (n - 1) + [bit(m - 1) | PRW]
        assert ok(run(chain(mode, GVA, values)[0], mode, GVA, maxphyaddr=m)) == bit(m - 1) | 0xABC


@pytest.mark.parametrize("mode", [L4, L5], ids=lambda m: m.name)
def test_bits_52_to_62_are_ignored_in_long_mode(mode: Mode) -> None:
    """Bits 62:52 are ignored (58:52) or the protection key (62:59): never reserved."""
    n = len(mode.levels)
    for depth in range(n):
        for b in range(52, 63):
            values = [PRW] * (n - 1) + [LEAF | PRW]
            values[depth] |= bit(b)
            mem, _ = chain(mode, GVA, values)
            assert ok(run(mem, mode, GVA, "write", maxphyaddr=36)) == LEAF | 0xABC


@pytest.mark.parametrize("mode", [L4, L5], ids=lambda m: m.name)
def test_ps_reserved_only_in_pml4e_and_pml5e(mode: Mode) -> None:
    n = len(mode.levels)
    for depth in range(n - 3):
        values = [PRW] * n
        values[depth] |= PTE_PS
        assert pf(run(chain(mode, GVA, values)[0], mode, GVA)) == RSVD | P, depth


def test_nx_without_nxe_is_reserved_at_every_level() -> None:
    """§4.5: XD (bit 63) is reserved when EFER.NXE=0, in every paging-structure entry."""
    for mode in (Mode("4", nxe=False), Mode("5", nxe=False), Mode("pae", nxe=False)):
        gva = GVA & 0xFFFF_FFFF if mode.name == "pae" else GVA
        n = len(mode.levels)
        for depth in range(n):
            values = [PRW] * (n - 1) + [0x5000 | PRW]
            if mode.name == "pae":
                values[0] = PTE_P
            values[depth] |= PTE_NX
            code = pf(run(chain(mode, gva, values)[0], mode, gva, "write", cpl=3))
            assert code == RSVD | P | W | U, (mode.name, depth)


def test_nx_with_nxe_at_any_level_forbids_fetch_only() -> None:
    n = 4
    for depth in range(n):
        values = [PRW] * (n - 1) + [LEAF | PRW]
        values[depth] |= PTE_NX
        mem, _ = chain(L4, GVA, values)
        assert pf(run(mem, L4, GVA, "fetch")) == P | ID
        assert pf(run(mem, L4, GVA, "fetch", cpl=3)) == P | ID | U
        assert ok(run(mem, L4, GVA, "write", cpl=3)) == LEAF | 0xABC


@pytest.mark.parametrize("m", [36, 39, 46, 52])
def test_1g_leaf_bits_12_to_29(m: int) -> None:
    """Table 4-16: a 1G PDPTE has PAT in bit 12 and bits 29:13 reserved."""
    frame = bit(m - 1) | bit(30)
    mem, _ = chain(L4, GVA, [PRW, frame | PRW | PTE_PS | bit(12)])
    r = run(mem, L4, GVA, maxphyaddr=m)
    assert (ok(r), r.level, r.pat) == (frame | (GVA & (bit(30) - 1)), 3, 1)
    for b in range(13, 30):
        mem, _ = chain(L4, GVA, [PRW, frame | PRW | PTE_PS | bit(b)])
        assert pf(run(mem, L4, GVA, maxphyaddr=m)) == RSVD | P, b
    for b in range(m, 52):
        mem, _ = chain(L4, GVA, [PRW, bit(b) | PRW | PTE_PS])
        assert pf(run(mem, L4, GVA, maxphyaddr=m)) == RSVD | P, b


@pytest.mark.parametrize("mode", [L4, PAE], ids=lambda m: m.name)
def test_2m_leaf_bits_12_to_20(mode: Mode) -> None:
    """Tables 4-9 / 4-18: a 2M PDE has PAT in bit 12 and bits 20:13 reserved."""
    gva = 0xC123_4567 if mode.name == "pae" else GVA
    up = [PTE_P] if mode.name == "pae" else [PRW, PRW]
    frame = 0xF_E000_0000
    mem, _ = chain(mode, gva, [*up, frame | PRW | PTE_PS | bit(12)])
    r = run(mem, mode, gva, maxphyaddr=40)
    assert (ok(r), r.level, r.pat) == (frame | (gva & 0x1F_FFFF), 2, 1)
    for b in range(13, 21):
        mem, _ = chain(mode, gva, [*up, frame | PRW | PTE_PS | bit(b)])
        assert pf(run(mem, mode, gva, maxphyaddr=40)) == RSVD | P, b


@pytest.mark.parametrize("m", [36, 39, 46, 52])
def test_pae_reserved_bits(m: int) -> None:
    """Tables 4-8 .. 4-11: PDE/PTE bits 62:M reserved; PDPTE 63:M, 8:5, 2:1."""
    gva = 0x8765_4321
    for depth in (1, 2):
        for b in range(m, 63):
            values = [PTE_P, PRW, 0x5000 | PRW]
            values[depth] |= bit(b)
            assert pf(run(chain(PAE, gva, values)[0], PAE, gva, maxphyaddr=m)) == RSVD | P
    for b in [1, 2, 5, 6, 7, 8, *range(m, 64)]:
        mem, _ = chain(PAE, gva, [PTE_P | bit(b), PRW, 0x5000 | PRW])
        assert pf(run(mem, PAE, gva, maxphyaddr=m)) == RSVD | P, b
    # PWT/PCD in a PDPTE are allowed; the PDPTE carries no R/W or U/S.
    mem, _ = chain(PAE, gva, [PTE_P | 0x18, PRW, 0x5000 | PRW])
    assert ok(run(mem, PAE, gva, "write", cpl=3, maxphyaddr=m)) == 0x5321


def test_pae_pdpte_has_no_accessed_flag() -> None:
    gva = 0x8765_4321
    mem, addrs = chain(PAE, gva, [PTE_P, PRW, 0x5000 | PRW])
    r = run(mem, PAE, gva, "write")
    assert r.ad_writes == {addrs[1]: PRW | table_at(1) | PTE_A, addrs[2]: 0x5000 | PRW | 0x60}


def test_pae_ignores_linear_bits_above_31() -> None:
    mem, _ = chain(PAE, 0x8765_4321, [PTE_P, PRW, 0x5000 | PRW])
    assert ok(run(mem, PAE, 0xFFFF_FFFF_8765_4321)) == 0x5321


# --------------------------------------------------------------------------
# 32-bit paging, PSE and PSE-36 (§4.3, Tables 4-4 .. 4-6)


@pytest.mark.parametrize("m", [36, 39, 40, 46, 52])
def test_pse36_high_address_bits_and_reserved_bits(m: int) -> None:
    """A 4M PDE holds physical bits (M'-1):32 in bits (M'-20):13, M' = min(M, 40);
    bits 21:(M'-19) are reserved; bit 12 is PAT."""
    gva = 0x8765_4321
    mp = min(m, 40)
    for hb in range(32, 40):
        pde = 0x8040_0000 | PRW | PTE_PS | bit(12) | bit(hb - 32 + 13)
        mem, _ = chain(B32, gva, [pde])
        r = run(mem, B32, gva, maxphyaddr=m)
        if hb < mp:
            assert (ok(r), r.level, r.pat) == (bit(hb) | 0x8040_0000 | (gva & 0x3F_FFFF), 2, 1)
        else:
            assert pf(r) == RSVD | P, hb
    mem, _ = chain(B32, gva, [0x8040_0000 | PRW | PTE_PS | bit(21)])
    assert pf(run(mem, B32, gva, "write", cpl=3, maxphyaddr=m)) == RSVD | P | W | U


def test_32bit_ps_ignored_without_cr4_pse() -> None:
    """CR4.PSE=0: PDE bit 7 is ignored and the PDE references a page table."""
    gva = 0x8765_4321
    nopse = Mode("32", pse=False)
    mem, addrs = chain(nopse, gva, [PRW | PTE_PS, 0x7000 | PRW])
    r = run(mem, nopse, gva, "write")
    assert (ok(r), r.level) == (0x7321, 1)
    assert r.ad_writes == {addrs[0]: mem[addrs[0]] | PTE_A, addrs[1]: 0x7000 | PRW | 0x60}


def test_32bit_entries_have_no_reserved_or_nx_bits() -> None:
    """32-bit paging entries are 4 bytes; the next entry in memory is not bit 63."""
    gva = 0x0040_1000
    mem, addrs = chain(B32, gva, [PRW, 0x7000 | PRW])
    mem[addrs[0] + 4] = 0xFFFF_FFFF  # neighbouring PDE and PTE all ones
    mem[addrs[1] + 4] = 0xFFFF_FFFF
    assert ok(run(mem, B32, gva, "fetch", cpl=3)) == 0x7000
    r = run(mem, B32, gva, "write", maxphyaddr=36)
    assert ok(r) == 0x7000
    assert all(v <= 0xFFFF_FFFF for v in r.ad_writes.values())


def test_32bit_ignores_linear_bits_above_31() -> None:
    mem, _ = chain(B32, 0x8765_4321, [0x8040_0000 | PRW | PTE_PS])
    assert ok(run(mem, B32, 0x1_8765_4321)) == 0x8040_0000 | 0x25_4321


# --------------------------------------------------------------------------
# §4.6 access rights


def rights_chain(
    mode: Mode, *, user: bool = True, writable: bool = True, nx: bool = False, key: int = 0
) -> tuple[Mem, int]:
    """A 4K page whose leaf carries the given rights; upper levels allow all."""
    gva = 0x8765_4321 if mode.name in ("32", "pae") else GVA
    leaf = 0x5000 | PTE_P | (PTE_US if user else 0) | (PTE_RW if writable else 0)
    leaf |= (PTE_NX if nx else 0) | (key << 59)
    n = len(mode.levels)
    up = [PTE_P] if mode.name == "pae" else []
    mem, _ = chain(mode, gva, up + [PRW] * (n - 1 - len(up)) + [leaf])
    return mem, gva


@pytest.mark.parametrize("mode", [B32, PAE, L4], ids=lambda m: m.name)
def test_user_mode_access_rules(mode: Mode) -> None:
    """CPL3: needs U/S=1 everywhere; writes need R/W=1 everywhere (any CR0.WP)."""
    for wp in (False, True):
        mem, gva = rights_chain(mode, user=False)
        for access in ("read", "write", "fetch"):
            code = P | U | (W if access == "write" else 0)
            code |= ID if access == "fetch" and mode.name != "32" else 0
            assert pf(run(mem, mode, gva, access, cpl=3, wp=wp)) == code
        mem, gva = rights_chain(mode, writable=False)
        assert pf(run(mem, mode, gva, "write", cpl=3, wp=wp)) == P | W | U
        assert ok(run(mem, mode, gva, "read", cpl=3, wp=wp))
        assert ok(run(mem, mode, gva, "fetch", cpl=3, wp=wp))


def test_rights_are_the_and_of_every_level() -> None:
    """§4.6.1: U/S and R/W of every paging-structure entry count, not just the leaf."""
    for depth in range(3):
        values = [PRW] * 3 + [LEAF | PRW]
        values[depth] &= ~PTE_US
        mem, _ = chain(L4, GVA, values)
        assert pf(run(mem, L4, GVA, "read", cpl=3)) == P | U
        values[depth] |= PTE_US
        values[depth] &= ~PTE_RW
        mem, _ = chain(L4, GVA, values)
        assert pf(run(mem, L4, GVA, "write", cpl=3)) == P | W | U
        assert pf(run(mem, L4, GVA, "write", cpl=0)) == P | W
        assert ok(run(mem, L4, GVA, "write", cpl=0, wp=False))


@pytest.mark.parametrize("mode", [B32, PAE, L4, L5], ids=lambda m: m.name)
@pytest.mark.parametrize("cpl", [0, 1, 2])
def test_cr0_wp_supervisor_writes(mode: Mode, cpl: int) -> None:
    """CR0.WP=0: supervisor writes ignore R/W (user and supervisor pages, no SMAP)."""
    for user in (False, True):
        mem, gva = rights_chain(mode, user=user, writable=False)
        assert pf(run(mem, mode, gva, "write", cpl=cpl, wp=True)) == P | W
        r = run(mem, mode, gva, "write", cpl=cpl, wp=False)
        assert ok(r) & 0xFFF == gva & 0xFFF
        leaf_addr = max(r.ad_writes)
        assert r.ad_writes[leaf_addr] & (PTE_A | PTE_D) == PTE_A | PTE_D


@pytest.mark.parametrize("mode", [B32, PAE, L4], ids=lambda m: m.name)
def test_smep(mode: Mode) -> None:
    """SMEP: supervisor fetches from user pages fault (P|I), data accesses don't."""
    mem, gva = rights_chain(mode, user=True)
    for cpl in (0, 1, 2):
        assert pf(run(mem, mode, gva, "fetch", cpl=cpl, smep=True)) == P | ID
        assert ok(run(mem, mode, gva, "fetch", cpl=cpl))
        assert ok(run(mem, mode, gva, "write", cpl=cpl, smep=True))
    assert ok(run(mem, mode, gva, "fetch", cpl=3, smep=True))
    # SMAP does not govern fetches.
    assert ok(run(mem, mode, gva, "fetch", cpl=0, smap=True))
    # A supervisor page (U/S=0 at any level) is not a user page for SMEP.
    sup, gva = rights_chain(mode, user=False)
    assert ok(run(sup, mode, gva, "fetch", cpl=0, smep=True))


def test_smep_fault_with_nxe_off_still_reports_fetch() -> None:
    mode = Mode("4", nxe=False)
    mem, gva = rights_chain(mode)
    assert pf(run(mem, mode, gva, "fetch", smep=True)) == P | ID


@pytest.mark.parametrize("mode", [B32, PAE, L4], ids=lambda m: m.name)
def test_smap_and_rflags_ac(mode: Mode) -> None:
    """SMAP: explicit supervisor data accesses to user pages fault unless EFLAGS.AC=1;
    with AC=1 writes still obey R/W when CR0.WP=1."""
    mem, gva = rights_chain(mode, user=True)
    for cpl in (0, 1, 2):
        for access in ("read", "write"):
            code = P | (W if access == "write" else 0)
            assert pf(run(mem, mode, gva, access, cpl=cpl, smap=True)) == code
            assert pf(run(mem, mode, gva, access, cpl=cpl, smap=True, wp=False)) == code
            assert ok(run(mem, mode, gva, access, cpl=cpl, smap=True, ac=True))
    ro, gva = rights_chain(mode, user=True, writable=False)
    assert pf(run(ro, mode, gva, "write", smap=True, ac=True)) == P | W
    assert ok(run(ro, mode, gva, "write", smap=True, ac=True, wp=False))
    # CPL3 accesses and supervisor pages are not affected, whatever AC says.
    assert ok(run(mem, mode, gva, "write", cpl=3, smap=True))
    sup, gva = rights_chain(mode, user=False)
    assert ok(run(sup, mode, gva, "write", cpl=0, smap=True))


# --------------------------------------------------------------------------
# §4.6.2 protection keys


def test_pku_user_pages_data_accesses_only() -> None:
    key = 7
    ad, wd = 1 << (2 * key), 2 << (2 * key)
    mem, gva = rights_chain(L4, key=key)
    for cpl in (0, 3):
        u = U if cpl == 3 else 0
        assert pf(run(mem, L4, gva, "read", cpl=cpl, pke=True, pkru=ad)) == P | PK | u
        assert pf(run(mem, L4, gva, "write", cpl=cpl, pke=True, pkru=ad)) == P | PK | W | u
        assert ok(run(mem, L4, gva, "fetch", cpl=3, pke=True, pkru=ad | wd))
        assert ok(run(mem, L4, gva, "read", cpl=cpl, pke=True, pkru=wd))
        # CR4.PKE=0: PKRU is ignored.
        assert ok(run(mem, L4, gva, "write", cpl=cpl, pkru=ad | wd))
        # Other keys' bits do not matter.
        assert ok(run(mem, L4, gva, "write", cpl=cpl, pke=True, pkru=~(ad | wd) & 0xFFFF_FFFF))
    # WD: user writes always; supervisor writes only with CR0.WP=1.
    assert pf(run(mem, L4, gva, "write", cpl=3, pke=True, pkru=wd, wp=False)) == P | PK | W | U
    assert pf(run(mem, L4, gva, "write", cpl=0, pke=True, pkru=wd)) == P | PK | W
    assert ok(run(mem, L4, gva, "write", cpl=0, pke=True, pkru=wd, wp=False))
    # Supervisor pages: keys do not apply.
    sup, gva = rights_chain(L4, user=False, key=key)
    assert ok(run(sup, L4, gva, "write", cpl=0, pke=True, pkru=ad | wd))


def test_pku_user_page_means_every_level_user() -> None:
    """A leaf with U/S=1 under a U/S=0 PDE maps a supervisor page: no key check."""
    mem, _ = chain(L4, GVA, [PRW, PRW, PTE_P | PTE_RW, LEAF | PRW | (9 << 59)])
    assert ok(run(mem, L4, GVA, "read", pke=True, pkru=1 << 18))


def test_pkey_comes_from_the_leaf_only() -> None:
    """Bits 62:59 of non-leaf entries are ignored; a huge leaf carries its own key."""
    mem, _ = chain(L4, GVA, [PRW | (2 << 59), PRW | (2 << 59), PRW, LEAF | PRW | (4 << 59)])
    assert ok(run(mem, L4, GVA, "read", cpl=3, pke=True, pkru=1 << 4))
    assert pf(run(mem, L4, GVA, "read", cpl=3, pke=True, pkru=1 << 8)) == P | PK | U
    mem, _ = chain(L4, GVA, [PRW, PRW, 0x4000_0000 | PRW | PTE_PS | (15 << 59)])
    r = run(mem, L4, GVA, "read", cpl=3, pke=True, pkru=1 << 30)
    assert pf(r) == P | PK | U and r.pkey == 15
    mem, _ = chain(L4, GVA, [PRW, 0x4000_0000 | PRW | PTE_PS | (1 << 59)])
    assert pf(run(mem, L4, GVA, "write", cpl=0, pke=True, pkru=2 << 2)) == P | PK | W


def test_pku_not_in_pae_or_32bit_paging() -> None:
    for mode in (PAE, B32):
        mem, gva = rights_chain(mode)
        assert ok(run(mem, mode, gva, "write", cpl=3, pke=True, pkru=0xFFFF_FFFF))


# --------------------------------------------------------------------------
# §4.8 A/D flags, and KVM's "only after the walk succeeded"


@pytest.mark.parametrize("mode", [B32, PAE, L4, L5], ids=lambda m: m.name)
def test_accessed_on_every_level_dirty_on_leaf_for_writes(mode: Mode) -> None:
    gva = 0x8765_4321 if mode.name in ("32", "pae") else GVA
    n = len(mode.levels)
    up = [PTE_P] if mode.name == "pae" else []
    values = up + [PRW] * (n - 1 - len(up)) + [0x5000 | PRW]
    mem, addrs = chain(mode, gva, values)
    first = 1 if mode.name == "pae" else 0
    for access in ("read", "fetch", "write"):
        r = run(mem, mode, gva, access)
        want = {a: mem[a] | PTE_A for a in addrs[first:]}
        if access == "write":
            want[addrs[-1]] |= PTE_D
        assert r.ad_writes == want, access
    # D is never set on a non-leaf entry, even when the leaf is huge.
    if mode.name in ("4", "5"):
        mem, addrs = chain(mode, gva, [PRW] * (n - 2) + [0x4000_0000 | PRW | PTE_PS])
        r = run(mem, mode, gva, "write")
        assert r.ad_writes == {a: mem[a] | PTE_A for a in addrs[:-1]} | {
            addrs[-1]: mem[addrs[-1]] | PTE_A | PTE_D
        }
    # Already set: nothing to write.
    mem, _ = chain(mode, gva, [v | PTE_A | PTE_D for v in values])
    assert run(mem, mode, gva, "write").ad_writes == {}


def test_no_accessed_bits_when_the_walk_fails_midway() -> None:
    """paging_tmpl.h: A/D are set (update_accessed_dirty_bits) only after
    permission_fault passed; a fault anywhere leaves every entry untouched."""
    cases = [
        [PRW, PRW, 0],  # not present at the PDE
        [PRW, PRW, PRW | bit(45), LEAF | PRW],  # reserved at the PDE
        [PRW, PRW, PRW, LEAF | PTE_P],  # user read of a supervisor page
    ]
    for values in cases:
        mem, _ = chain(L4, GVA, values)
        for access in ("read", "write"):
            assert pf(run(mem, L4, GVA, access, cpl=3, maxphyaddr=40))


# --------------------------------------------------------------------------
# an SDM reference walker, compared with the model on random chains


def ref_walk(
    mem: Mem,
    mode: Mode,
    gva: int,
    access: str,
    *,
    cpl: int,
    wp: bool,
    smep: bool,
    smap: bool,
    pke: bool,
    ac: bool,
    pkru: int,
    m: int,
) -> tuple[str, int, int | None, dict[int, int]]:
    """(outcome, error code, gpa, A/D writes) straight from the SDM tables."""
    is_long = mode.name in ("4", "5")
    if is_long:
        top = gva >> (56 if mode.name == "5" else 47)
        if top not in (0, (1 << (64 - (56 if mode.name == "5" else 47))) - 1):
            return ("gp", 0, None, {})
    else:
        gva &= 0xFFFF_FFFF
    write, fetch = access == "write", access == "fetch"
    code = (W if write else 0) | (U if cpl == 3 else 0)
    if fetch and (smep or (mode.name != "32" and mode.nxe)):
        code |= ID
    addr_bits = ((1 << m) - 1) & ~0xFFF if mode.name != "32" else 0xFFFF_F000
    table = CR3 & (0xFFFF_FFE0 if mode.name == "pae" else addr_bits)
    used: list[tuple[int, int]] = []
    user = writable = True
    xd = False
    for level in mode.levels:
        addr = table + mode.index(gva, level) * mode.esize
        e = mem.read(addr) & (0xFFFF_FFFF if mode.name == "32" else 2**64 - 1)
        used.append((addr, e))
        if not e & PTE_P:
            return ("pf", code, None, {})
        ps = bool(e & PTE_PS)
        if mode.name == "32":
            leaf = level == 1 or (ps and mode.pse)
            rsvd = 0
            if level == 2 and leaf:
                rsvd = bit(21) | (((1 << 21) - 1) & ~((1 << (13 + min(m, 40) - 32)) - 1))
        elif mode.name == "pae" and level == 3:
            leaf = False
            rsvd = bit(1) | bit(2) | 0x1E0 | ((2**64 - 1) & ~((1 << m) - 1))
        else:
            hi = 63 if mode.name == "pae" else 52  # bits [m, hi) are reserved
            rsvd = ((1 << hi) - 1) & ~((1 << m) - 1)
            rsvd |= 0 if mode.nxe else PTE_NX
            leaf = level == 1 or (level in (2, 3) and ps)
            if level >= 4 and ps:
                rsvd |= PTE_PS
            if level == 3 and ps:
                rsvd |= ((1 << 30) - 1) & ~((1 << 13) - 1)
            if level == 2 and ps:
                rsvd |= ((1 << 21) - 1) & ~((1 << 13) - 1)
        if e & rsvd:
            return ("pf", code | RSVD | P, None, {})
        if not (mode.name == "pae" and level == 3):
            user &= bool(e & PTE_US)
            writable &= bool(e & PTE_RW)
            xd |= mode.nxe and mode.name != "32" and bool(e & PTE_NX)
        if leaf:
            break
        table = e & addr_bits
    size = {1: 12, 2: 22 if mode.name == "32" else 21, 3: 30}[level]
    deny = False
    if cpl == 3:
        deny = not user or (write and not writable) or (fetch and xd)
    elif fetch:
        deny = xd or (user and smep)
    else:
        if user and smap and not ac:
            deny = True
        if write and wp and not writable:
            deny = True
    pkd = False
    if is_long and pke and user and not fetch:
        key = (e >> 59) & 15
        a_d, w_d = (pkru >> (2 * key)) & 1, (pkru >> (2 * key + 1)) & 1
        pkd = bool(a_d) or (write and bool(w_d) and (cpl == 3 or wp))
    if deny or pkd:
        return ("pf", code | P | (PK if pkd else 0), None, {})
    frame = e & addr_bits & ~((1 << size) - 1)
    if mode.name == "32" and level == 2:
        frame |= ((e >> 13) & 0xFF) << 32
    ad: dict[int, int] = {}
    for i, (a, v) in enumerate(used):
        if mode.name == "pae" and i == 0:
            continue
        new = v | PTE_A | (PTE_D if write and i == len(used) - 1 else 0)
        if new != v:
            ad[a] = ad.get(a, 0) | new
    return ("ok", 0, frame | (gva & ((1 << size) - 1)), ad)


RIGHT_BITS = [1, 2, 5, 6, 7, 7, 63]
FLAG_BITS = [0, 1, 2, 5, 6, 7, 12, 13, 20, 21, 29, 35, 36, 38, 39, 45, 46, 51, 52, 59, 62, 63]


Pick = Any  # pick(sequence) -> one element


def gen_scenario(pick: Pick) -> dict[str, Any]:
    """One random walk case; ``pick(seq)`` chooses an element (hypothesis or random)."""
    bools = [False, True]
    name = pick(["32", "pae", "4", "5"])
    mode = Mode(name, nxe=pick(bools), pse=pick(bools))
    m = pick([36, 39, 40, 46, 52])
    gva = pick(
        [GVA, 0xFFFF_8000_1234_5678, 0x0000_8000_0000_0000, 0xFF12_3456_789A_B000]
        if name in ("4", "5")
        else [0x8765_4321, 0x0040_1ABC, 0xFFC0_0000]
    )
    n = len(mode.levels)
    values = []
    for k in range(n):
        if pick(range(5)) == 0:  # a junk entry: random low bits and flips
            v = PTE_P | pick(range(0x1000)) & ~PTE_PS
            for _ in range(pick(range(4))):
                v ^= bit(pick(FLAG_BITS))
        else:  # a well-formed entry with a few rights / PS / A / D / key bits flipped
            v = PTE_P if mode.name == "pae" and k == 0 else PRW
            for _ in range(pick(range(3))):
                v ^= bit(pick(RIGHT_BITS))
            if mode.name in ("4", "5"):
                v |= pick(range(16)) << 59
        if mode.name == "32":
            v &= 0xFFFF_FFFF
        values.append(v)
    # An entry with PS set gets a (mostly aligned) page frame instead of the
    # next table's address, so huge leaves are reached.
    raw = set()
    for k in range(n - 1):
        if values[k] & PTE_PS:
            raw.add(k)
            values[k] |= pick([0x4000_0000, 0x8040_0000, 0xC0_0000, 0x2000_0000])
            values[k] |= pick([0, 0, 0, bit(12), bit(13), bit(20), bit(21)])
    values[-1] |= pick([0x5000, 0x8040_0000, 0x4000_0000, 0x3_0000_0000, 0x8060_0000, 0x41_E000])
    # PKRU: random, but the bits of the leaf's key (or of a huge leaf's) drawn apart.
    pkru = pick(range(1 << 32))
    for v in values:
        key = (v >> 59) & 15
        pkru = pkru & ~(3 << 2 * key) | pick(range(4)) << 2 * key
    return dict(
        mode=mode,
        gva=gva,
        values=values,
        raw=frozenset(raw),
        m=m,
        access=pick(["read", "write", "fetch"]),
        cpl=pick([0, 3]),
        wp=pick(bools),
        smep=pick(bools),
        smap=pick(bools),
        pke=pick(bools),
        ac=pick(bools),
        pkru=pkru,
    )


def check_against_reference(s: dict[str, Any]) -> None:
    mode: Mode = s["mode"]
    mem, _ = chain(mode, s["gva"], s["values"], raw=s["raw"])
    kw = {k: s[k] for k in ("cpl", "wp", "smep", "smap", "pke", "ac", "pkru")}
    r = run(mem, mode, s["gva"], s["access"], maxphyaddr=s["m"], **kw)
    want = ref_walk(mem, mode, s["gva"], s["access"], m=s["m"], **kw)
    outcome = "gp" if r.vector == 13 else "pf" if r.fault else "ok"
    assert (outcome, r.error_code, r.gpa, r.ad_writes) == want, s


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_model_matches_sdm_reference(data: st.DataObject) -> None:
    check_against_reference(gen_scenario(lambda seq: data.draw(st.sampled_from(seq))))


@pytest.mark.parametrize("seed", range(4))
def test_model_matches_sdm_reference_uniform(seed: int) -> None:
    """The same comparison with uniform choices (hypothesis favours the first options)."""
    rng = random.Random(seed)
    for _ in range(1500):
        check_against_reference(gen_scenario(rng.choice))


# --------------------------------------------------------------------------
# vcpu.access over GuestPageTables, TDP and shadow MMU alike


def guest(tdp: bool, levels: int = 4, maxphyaddr: int = 46) -> tuple[Any, GuestPageTables]:
    vm = make_vm(tdp=tdp, host_maxphyaddr=maxphyaddr)
    pt = GuestPageTables(vm, 0x100000, 0x40000, levels=levels)
    vm.vcpus[0].set_sregs(**pt.long_mode_sregs())
    return vm, pt


def entry(vm: Any, addr: int) -> int:
    return int.from_bytes(vm.read_guest(addr, 8), "little")


def put(vm: Any, addr: int, value: int) -> None:
    vm.write_guest(addr, value.to_bytes(8, "little"))


TDP = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])


@TDP
def test_vcpu_injects_the_walker_error_codes(tdp: bool) -> None:
    vm, pt = guest(tdp)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000, user=True, writable=False)
    pt.map(0x401000, 0x401000, 0x1000, user=False, nx=True)
    cases: list[tuple[int, str, int, dict[str, Any], int]] = [
        (0x400000, "write", 0, {}, P | W),
        (0x400000, "write", 3, {}, P | W | U),
        (0x401000, "read", 3, {}, P | U),
        (0x401000, "fetch", 0, {}, P | ID),
        (0x400000, "fetch", 0, {"cr4": CR4_SMEP}, P | ID),
        (0x400000, "read", 0, {"cr4": CR4_SMAP}, P),
        (0x900000, "fetch", 3, {}, U | ID),
    ]
    base_cr4 = vcpu.cr4
    for gva, kind, cpl, sregs, code in cases:
        vcpu.set_sregs(cpl=cpl, cr4=base_cr4 | sregs.get("cr4", 0))
        data = b"\0" * 8 if kind == "write" else None
        r = vcpu.access(gva, kind, 8, data)
        assert r.fault is not None, (gva, kind, cpl)
        assert (r.fault.vector, r.fault.error_code) == (14, code), (gva, kind, cpl)
    vcpu.set_sregs(cpl=0, cr4=base_cr4)
    r = vcpu.access(0x0000_8000_0000_0000, "read")
    assert r.fault is not None and (r.fault.vector, r.fault.error_code) == (13, 0)


@TDP
def test_vcpu_smap_ac_and_wp0(tdp: bool) -> None:
    vm, pt = guest(tdp)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000, user=True, writable=False)
    vcpu.set_sregs(cr4=vcpu.cr4 | CR4_SMAP)
    r = vcpu.access(0x400000, "read")
    assert r.fault is not None and r.fault.error_code == P
    vcpu.rflags_ac = True
    assert vcpu.access(0x400000, "read").fault is None
    r = vcpu.access(0x400000, "write", 4, b"abcd")
    assert r.fault is not None and r.fault.error_code == P | W
    vcpu.rflags_ac = False
    r = vcpu.access(0x400000, "read")
    assert r.fault is not None and r.fault.error_code == P
    vcpu.set_sregs(cr0=vcpu.cr0 & ~CR0_WP)
    r = vcpu.access(0x400000, "write", 4, b"abcd")
    assert r.fault is not None and r.fault.error_code == P | W  # SMAP, whatever WP says
    vcpu.rflags_ac = True
    assert vcpu.access(0x400000, "write", 4, b"abcd").fault is None
    assert vm.read_guest(0x400000, 4) == b"abcd"
    if tdp:
        # Not asserted for the shadow MMU: KVM's CR0.WP=0 trick has made the
        # SPTE supervisor-writable (U=0), so hardware sees no SMAP violation
        # on a later AC=0 read; KVM's mmu.rst ("cr0.wp=0", smap_andnot_wp)
        # only covers toggling CR4.SMAP, and the model follows KVM there.
        vcpu.rflags_ac = False
        r = vcpu.access(0x400000, "read")
        assert r.fault is not None and r.fault.error_code == P


def _pku_steps(tdp: bool) -> None:
    vm, pt = guest(tdp)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000)
    leaf = pt.entry_address(0x400000, 1)
    put(vm, leaf, entry(vm, leaf) | (6 << 59))
    vcpu.set_sregs(cr4=vcpu.cr4 | CR4_PKE, cpl=3)
    vcpu.pkru = 2 << 12  # WD for key 6
    assert vcpu.access(0x400000, "read").fault is None
    r = vcpu.access(0x400000, "write", 1, b"x")
    assert r.fault is not None and r.fault.error_code == P | W | U | PK
    assert vcpu.access(0x400000, "fetch").fault is None
    vcpu.pkru = 1 << 12  # AD for key 6
    r = vcpu.access(0x400000, "read")
    assert r.fault is not None and r.fault.error_code == P | U | PK


def test_vcpu_pku_tdp() -> None:
    _pku_steps(True)


def test_vcpu_pku_refused_under_shadow_paging() -> None:
    """KVM clears X86_FEATURE_PKU without TDP, so CR4.PKE is reserved and
    KVM_SET_SREGS fails (kvm_is_valid_cr4); nothing changes."""
    vm, _pt = guest(False)
    vcpu = vm.vcpus[0]
    before = (vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, vcpu.cpl)
    with pytest.raises(KvmError) as ei:
        vcpu.set_sregs(cr4=vcpu.cr4 | CR4_PKE, cpl=3)
    assert ei.value.errno == errno.EINVAL and "PKE" in str(ei.value)
    assert (vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, vcpu.cpl) == before


@TDP
@pytest.mark.parametrize("levels", [4, 5])
def test_vcpu_ad_bits_in_guest_memory(tdp: bool, levels: int) -> None:
    vm, pt = guest(tdp, levels)
    vcpu = vm.vcpus[0]
    gva = 0x7F_1234_5000
    pt.map(gva, 0x400000, 0x1000)
    addrs = [pt.entry_address(gva, lvl) for lvl in range(levels, 0, -1)]
    before = [entry(vm, a) for a in addrs]
    assert not any(v & (PTE_A | PTE_D) for v in before)
    assert vcpu.access(gva, "read").fault is None
    assert [entry(vm, a) for a in addrs] == [v | PTE_A for v in before]
    assert vcpu.access(gva, "write", 8, b"y" * 8).fault is None
    assert [entry(vm, a) for a in addrs] == [v | PTE_A for v in before[:-1]] + [
        before[-1] | PTE_A | PTE_D
    ]


@TDP
def test_vcpu_fault_midway_leaves_accessed_bits_clear(tdp: bool) -> None:
    """KVM sets A/D only once the whole walk and permission_fault have passed."""
    vm, pt = guest(tdp)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000, user=False)
    addrs = [pt.entry_address(0x400000, lvl) for lvl in (4, 3, 2, 1)]
    before = [entry(vm, a) for a in addrs]
    vcpu.set_sregs(cpl=3)
    r = vcpu.access(0x400000, "read")
    assert r.fault is not None and r.fault.error_code == P | U
    put(vm, addrs[2], before[2] | bit(50))  # reserved above MAXPHYADDR 46
    vcpu.set_sregs(cpl=0)
    r = vcpu.access(0x400000, "write", 1, b"z")
    assert r.fault is not None and r.fault.error_code == RSVD | P | W
    assert [entry(vm, a) for a in addrs] == [*before[:2], before[2] | bit(50), before[3]]


@TDP
def test_vcpu_32bit_pse36_and_pae(tdp: bool) -> None:
    """32-bit paging with a 4M page (PSE) and PAE with a 2M page, through vcpu.access."""
    vm = make_vm(tdp=tdp, host_maxphyaddr=36)
    vcpu = vm.vcpus[0]
    pd = 0x100000
    vm.write_guest(pd + 1 * 4, (0x400000 | PRW | PTE_PS).to_bytes(4, "little"))
    vm.write_guest(pd + 2 * 4, (0x800000 | PRW | PTE_PS | bit(17)).to_bytes(4, "little"))
    vcpu.set_sregs(cr0=CR0_PG | CR0_WP | 0x11, cr3=pd, cr4=CR4_PSE, efer=0)
    r = vcpu.access(0x400123, "write", 1, b"q")
    assert r.fault is None and r.gpa == 0x400123
    assert int.from_bytes(vm.read_guest(pd + 4, 4), "little") == 0x400000 | PRW | PTE_PS | 0x60
    r = vcpu.access(0x800000, "read")
    assert r.fault is not None and r.fault.error_code == RSVD | P  # bit 17 >= MAXPHYADDR 36
    # PAE: PDPT at 0x200000 (32-byte aligned), PD at 0x201000.
    pdpt, pd2 = 0x200000, 0x201000
    put(vm, pdpt, pd2 | PTE_P)
    put(vm, pd2 + 2 * 8, 0x400000 | PRW | PTE_PS | PTE_NX)
    vcpu.set_sregs(cr0=CR0_PG | CR0_WP | 0x11, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    r = vcpu.access(0x400010, "read")
    assert r.fault is None and r.gpa == 0x400010
    r = vcpu.access(0x400010, "fetch")
    assert r.fault is not None and r.fault.error_code == P | ID


@pytest.mark.parametrize(
    "vendor,tdp",
    [
        ("vmx", True),
        ("vmx", False),
        ("svm", False),
    ],
)
def test_vcpu_pae_pdptes_are_loaded_at_cr3_load(vendor: str, tdp: bool) -> None:
    """SDM §4.4.1: PAE PDPTEs live in internal registers loaded by MOV CR3; a later
    change of the PDPT in memory takes effect only at the next CR3 load."""
    vm = make_vm(tdp=tdp, vendor=vendor)
    vcpu = vm.vcpus[0]
    pdpt, pd = 0x200000, 0x201000
    put(vm, pdpt, pd | PTE_P)
    put(vm, pd + 2 * 8, 0x400000 | PRW | PTE_PS)
    vcpu.set_sregs(cr0=CR0_PG | CR0_WP | 0x11, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    put(vm, pdpt, 0)  # the PDPTE is gone from memory, not from the PDPTE registers
    r = vcpu.access(0x400010, "read")
    assert r.fault is None and r.gpa == 0x400010
    vcpu.set_sregs(cr3=pdpt)  # MOV CR3 reloads them
    r = vcpu.access(0x400010, "read")
    assert r.fault is not None and (r.fault.vector, r.fault.error_code) == (14, 0)


def test_npt_pae_guest_reads_the_pdpt_from_memory() -> None:
    """SVM with NPT has no PDPTE registers for the guest: the CPU walks the
    PDPT in memory (kvmmu_pae_pdptes_in_registers is False), so removing the
    PDPTE takes effect at once."""
    vm = make_vm(tdp=True, vendor="svm")
    vcpu = vm.vcpus[0]
    pdpt, pd = 0x200000, 0x201000
    put(vm, pdpt, pd | PTE_P)
    put(vm, pd + 2 * 8, 0x400000 | PRW | PTE_PS)
    vcpu.set_sregs(cr0=CR0_PG | CR0_WP | 0x11, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    assert vcpu.access(0x400010, "read").fault is None
    put(vm, pdpt, 0)
    r = vcpu.access(0x400010, "read")
    assert r.fault is not None and (r.fault.vector, r.fault.error_code) == (14, 0)


@pytest.mark.parametrize("tdp", [True, False])
def test_unreadable_pdpt_fails_the_load_and_keeps_the_pdptes(tdp: bool) -> None:
    """x86.c ``load_pdptrs``: a PDPT outside every memslot fails the read
    (``kvm_vcpu_read_guest_page`` < 0), so the load fails; KVM_SET_SREGS ignores
    that (the CR3 is set) and the PDPTEs loaded before stay in use."""
    vm = make_vm(tdp=tdp, vendor="vmx")
    vcpu = vm.vcpus[0]
    pdpt, pd = 0x200000, 0x201000
    put(vm, pdpt, pd | PTE_P)
    put(vm, pd + 2 * 8, 0x400000 | PRW | PTE_PS)
    vcpu.set_sregs(cr0=CR0_PG | CR0_WP | 0x11, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    vcpu.set_sregs(cr3=0x40000000)  # 1 GiB: no memslot
    assert vcpu.cr3 == 0x40000000
    r = vcpu.access(0x400010, "read")
    assert r.fault is None and r.gpa == 0x400010
    assert vm.check_invariants() == []


def test_vcpu_split_access_faults_at_the_second_page() -> None:
    """A fault on the second page of a split access reports that page's address."""
    vm, pt = guest(True)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000)
    r = vcpu.access(0x400FFC, "write", 8, b"12345678")
    assert r.fault is not None and (r.fault.error_code, r.fault.address) == (W, 0x401000)


# --------------------------------------------------------------------------
# GuestPageTables: what it writes is what the SDM walker expects


@pytest.mark.parametrize("levels", [4, 5])
def test_guest_pt_builds_what_the_walker_reads(levels: int) -> None:
    vm = make_vm()
    pt = GuestPageTables(vm, 0x100000, 0x40000, levels=levels)
    vcpu = vm.vcpus[0]
    vcpu.set_sregs(**pt.long_mode_sregs())
    hi = 0xFF00_0000_0000_0000 if levels == 5 else 0xFFFF_8000_0000_0000
    pt.map(hi | 0x4000_0000, 0x4000_0000, 1 << 30, page_size=1 << 30, nx=True, pat_index=5)
    pt.map(0x20_0000, 0x60_0000, 2 << 20, page_size=2 << 20, user=False, writable=False)
    pt.map(0x1000, 0x7000, 0x2000, pat_index=6)
    w = vcpu.walk(hi | 0x4123_4567, "read")
    assert (w.gpa, w.level, w.nx, w.user, w.writable) == (0x4123_4567, 3, True, True, True)
    assert (w.pat, w.pcd, w.pwt) == (1, 0, 1)
    assert vcpu.walk(hi | 0x4123_4567, "fetch").error_code == P | ID
    w = vcpu.walk(0x21_2345, "read")
    assert (w.gpa, w.level, w.user, w.writable) == (0x61_2345, 2, False, False)
    w = vcpu.walk(0x2ABC, "write")
    assert (w.gpa, w.level, w.pat, w.pcd, w.pwt) == (0x8ABC, 1, 1, 1, 0)
    with pytest.raises(ValueError):
        pt.map(0x20_1000, 0x1000, 0x1000)  # inside the 2M page


@pytest.mark.parametrize("levels", [4, 5])
def test_guest_pt_refuses_non_canonical_gvas(levels: int) -> None:
    """A non-canonical gva cannot be mapped (§3.3.7.1): writing its entry would
    silently map the canonical alias that shares its table indexes."""
    vm = make_vm()
    pt = GuestPageTables(vm, 0x100000, 0x40000, levels=levels)
    bad = 0x0100_0000_0000_0000 if levels == 5 else 0x0000_8000_0000_0000
    with pytest.raises(ValueError, match="canonical"):
        pt.map(bad, 0x400000, 0x1000)
    with pytest.raises(ValueError, match="canonical"):
        pt.map(bad - 0x1000, 0x400000, 0x2000)  # the range runs into the hole
    vm.vcpus[0].set_sregs(**pt.long_mode_sregs())
    alias = 0xFF00_0000_0000_0000 if levels == 5 else 0xFFFF_8000_0000_0000
    assert vm.vcpus[0].access(alias, "read").fault is not None


def test_guest_pt_refuses_frames_beyond_52_bits() -> None:
    """A frame address above bit 51 would spill into the ignored / key / XD bits."""
    vm = make_vm()
    pt = GuestPageTables(vm, 0x100000, 0x40000)
    with pytest.raises(ValueError, match="gpa"):
        pt.map(0x400000, 1 << 52, 0x1000)
    with pytest.raises(ValueError, match="gpa"):
        pt.map(0x400000, (1 << 52) - 0x1000, 0x2000)


# --------------------------------------------------------------------------
# more mode corners, and the batch walker over many GVAs at once


def test_cr3_low_bits_do_not_move_the_root() -> None:
    """CR3 bits 11:0 (PCID / PWT / PCD) and, for PAE, bits 4:0 are not address bits."""
    mem, _ = chain(L4, GVA, [PRW, PRW, PRW, LEAF | PRW])
    assert ok(run(mem, L4, GVA, cr3=CR3 | 0xFFF)) == LEAF | 0xABC
    mem, _ = chain(PAE, 0x8765_4321, [PTE_P, PRW, 0x5000 | PRW], cr3=CR3 | 0x60)
    assert ok(run(mem, PAE, 0x8765_4321, cr3=CR3 | 0x7F)) == 0x5321


def test_la57_is_ignored_outside_long_mode() -> None:
    """CR4.LA57 selects 5-level paging only in IA-32e mode (§4.1.1)."""
    mem, _ = chain(PAE, 0x8765_4321, [PTE_P, PRW, 0x5000 | PRW])
    pae57 = Mode("pae")
    kw: dict[str, Any] = dict(cr0=CR0_PG | 1, cr3=CR3, efer=EFER_NXE, cpl=0, access="read")
    a = walk(mem.read, cr4=CR4_PAE | CR4_LA57, gva=0x8765_4321, **kw)
    assert (a.fault, a.gpa) == (False, 0x5321)
    assert ok(run(mem, pae57, 0x8765_4321)) == 0x5321


@pytest.mark.parametrize("levels", [4, 5])
def test_batch_over_many_gvas_equals_scalar_per_lane(levels: int) -> None:
    """One batch over mapped, unmapped, huge, supervisor, read-only, NX and
    non-canonical GVAs: each lane equals the scalar walk, and ``ad_writes`` is
    the OR-union of the scalar ones."""
    vm = make_vm()
    pt = GuestPageTables(vm, 0x100000, 0x40000, levels=levels)
    pt.map(0x40_0000, 0x40_0000, 0x4000)
    pt.map(0x40_4000, 0x80_0000, 0x1000, writable=False)
    pt.map(0x40_5000, 0x80_1000, 0x1000, user=False, nx=True)
    pt.map(0x60_0000, 0xA0_0000, 2 << 20, page_size=2 << 20, pat_index=7)
    pt.map(0x4000_0000, 0x4000_0000, 1 << 30, page_size=1 << 30, user=False)
    hi = 0xFF00_0000_0000_0000 if levels == 5 else 0xFFFF_8000_0000_0000
    pt.map(hi, 0x40_0000, 0x1000)
    gvas = [
        0x40_0123,
        0x40_1FF8,
        0x40_3000,
        0x40_4008,
        0x40_5010,
        0x40_6000,
        0x61_2345,
        0x7F_FFFF,
        0x4123_4567,
        0x8000_0000,
        hi | 0x10,
        0x0000_8000_0000_0000,
        0x0100_0000_0000_0000,
    ]

    def read(addr: int) -> int:
        return int.from_bytes(vm.read_guest(addr, 8), "little")

    def read_many(addrs: np.ndarray) -> np.ndarray:
        return np.array([read(int(a)) for a in addrs], dtype=np.uint64)

    sregs = pt.long_mode_sregs()
    for access in ("read", "write", "fetch"):
        for cpl in (0, 3):
            for extra in (0, CR4_SMEP | CR4_SMAP):
                kw: dict[str, Any] = dict(
                    cr0=sregs["cr0"],
                    cr3=sregs["cr3"],
                    cr4=sregs["cr4"] | extra,
                    efer=sregs["efer"],
                    cpl=cpl,
                    access=access,
                )
                b = walk_batch(read_many, gvas=np.array(gvas, np.uint64), **kw)
                union: dict[int, int] = {}
                for i, gva in enumerate(gvas):
                    r = walk(read, gva=gva, **kw)
                    lane = (
                        bool(b.fault[i]),
                        int(b.vector[i]),
                        int(b.error_code[i]),
                        int(b.gpa[i]),
                        int(b.level[i]),
                        int(b.pat[i]),
                    )
                    assert lane == (
                        r.fault,
                        none_to(r.vector, -1),
                        r.error_code,
                        none_to(r.gpa, 0),
                        none_to(r.level, 0),
                        r.pat,
                    ), (hex(gva), access, cpl, extra)
                    for a, v in r.ad_writes.items():
                        union[a] = union.get(a, 0) | v
                assert b.ad_writes == union
    # Bit 47 set is non-canonical under 4-level paging only; bit 56 under both.
    assert b.vector[-2:].tolist() == ([13, 13] if levels == 4 else [14, 13])


@TDP
def test_vcpu_wp0_smep_sequence_keeps_guest_semantics(tdp: bool) -> None:
    """CR0.WP=0 + SMEP on a read-only user page: a supervisor write succeeds,
    yet user accesses and supervisor fetches keep their architectural outcome
    (the shadow MMU's WP=0 trick must not leak into what the guest sees)."""
    vm, pt = guest(tdp)
    vcpu = vm.vcpus[0]
    pt.map(0x400000, 0x400000, 0x1000, writable=False)
    vcpu.set_sregs(cr0=vcpu.cr0 & ~CR0_WP, cr4=vcpu.cr4 | CR4_SMEP)
    assert vcpu.access(0x400000, "write", 2, b"hi").fault is None
    r = vcpu.access(0x400000, "fetch")
    assert r.fault is not None and r.fault.error_code == P | ID
    vcpu.set_sregs(cpl=3)
    assert vcpu.access(0x400000, "read", 2).data == b"hi"
    assert vcpu.access(0x400000, "fetch").fault is None
    r = vcpu.access(0x400000, "write", 1, b"x")
    assert r.fault is not None and r.fault.error_code == P | W | U
    vcpu.set_sregs(cpl=0)
    assert vcpu.access(0x400000, "write", 1, b"H").fault is None
    assert vm.read_guest(0x400000, 2) == b"Hi"
    r = vcpu.access(0x400000, "fetch")
    assert r.fault is not None and r.fault.error_code == P | ID
