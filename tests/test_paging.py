"""Hand-built tests of the scalar guest walker (kvmmu.paging.walk).

Each test names the SDM Vol 3A rule it pins (§4.3 32-bit paging, §4.4 PAE,
§4.5 4-/5-level paging, §4.6 access rights, §4.7 error codes, §4.8 A/D).
The random differential coverage is in test_paging_unicorn.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from kvmmu import paging
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
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    WalkResult,
    canonical,
    walk,
)

LONG = EFER_LME | EFER_LMA
PRW = PTE_P | PTE_RW | PTE_US
CR3 = 0x1000


class Mem(dict[int, int]):
    """Sparse guest memory of 8-byte entries; unmapped reads return 0."""

    def read(self, addr: int) -> int:
        return self.get(addr, 0)


def long_tables(
    gva: int, leaf: int, leaf_level: int = 1, upper: int = PRW, la57: bool = False
) -> tuple[Mem, list[int]]:
    """Tables mapping gva with the given leaf entry; returns memory and entry addresses."""
    mem = Mem()
    addrs = []
    table = CR3
    levels = [5, 4, 3, 2, 1] if la57 else [4, 3, 2, 1]
    for n, level in enumerate(levels):
        addr = table + ((gva >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        addrs.append(addr)
        if level == leaf_level:
            mem[addr] = leaf
            break
        table = 0x10000 * (n + 2)
        mem[addr] = table | upper
    return mem, addrs


def lwalk(mem: Mem, gva: int, *, access: str = "read", cpl: int = 0, **kw: int) -> WalkResult:
    args = {
        "cr0": CR0_PG | CR0_WP,
        "cr3": CR3,
        "cr4": CR4_PAE,
        "efer": LONG | EFER_NXE,
        "cpl": cpl,
        "access": access,
        "gva": gva,
    }
    args.update(kw)
    return walk(mem.read, **args)  # type: ignore[arg-type]


def test_module_exports() -> None:
    for name in paging.__all__:
        assert hasattr(paging, name), name


def test_paging_off_identity() -> None:
    """CR0.PG=0: linear = physical, no walk, no fault."""
    res = walk(Mem().read, cr0=0, cr3=0, cr4=0, efer=0, cpl=0, access="write", gva=0x1234_5678)
    assert (res.fault, res.vector, res.gpa, res.level, res.ad_writes) == (
        False,
        None,
        0x1234_5678,
        None,
        {},
    )


def test_canonical_helper() -> None:
    """SDM Vol 3A §3.3.7.1: bits 63..47 (63..56 with LA57) equal."""
    assert canonical(0x7FFF_FFFF_FFFF, False)
    assert not canonical(0x8000_0000_0000, False)
    assert canonical(0xFFFF_8000_0000_0000, False)
    assert canonical(0x8000_0000_0000, True)
    assert canonical(0xFF00_0000_0000_0000, True)
    assert not canonical(0xFE00_0000_0000_0000, True)
    assert not canonical(0x0100_0000_0000_0000, True)


def test_non_canonical_is_gp0_not_pf() -> None:
    res = lwalk(Mem(), 0x8000_0000_0000)
    assert (res.fault, res.vector, res.error_code, res.entries) == (True, 13, 0, ())


def test_4k_translation_and_ad_writes() -> None:
    """§4.5: a 4K leaf; §4.8: A on every entry used, D on the leaf for writes."""
    gva = 0x0000_1234_5678_9ABC
    mem, addrs = long_tables(gva, 0x5555_5000 | PRW | PTE_PCD)
    res = lwalk(mem, gva, access="write")
    assert not res.fault and res.vector is None and res.error_code == 0
    assert res.gpa == 0x5555_5ABC and res.level == 1
    assert (res.pat, res.pcd, res.pwt) == (0, 1, 0)
    assert res.ad_writes == {a: mem[a] | PTE_A for a in addrs[:-1]} | {
        addrs[-1]: mem[addrs[-1]] | PTE_A | PTE_D
    }
    assert [e[0] for e in res.entries] == [4, 3, 2, 1]
    assert [e[1] for e in res.entries] == addrs
    assert (res.writable, res.user, res.nx, res.pkey) == (True, True, False, 0)


def test_read_sets_no_dirty_and_skips_already_set() -> None:
    gva = 0x40_0000
    mem, addrs = long_tables(gva, 0x9000 | PRW | PTE_A, upper=PRW | PTE_A)
    res = lwalk(mem, gva, access="read")
    assert res.ad_writes == {}
    res = lwalk(mem, gva, access="write")
    assert res.ad_writes == {addrs[-1]: mem[addrs[-1]] | PTE_D}


def test_2m_and_1g_leaves_pat_bit_12() -> None:
    """A huge leaf keeps PAT in bit 12; the offset covers the whole page."""
    gva = 0x0000_0040_1234_5678
    mem, _ = long_tables(gva, 0x8000_0000 | PRW | PTE_PS | (1 << 12) | PTE_PWT, leaf_level=2)
    res = lwalk(mem, gva)
    assert (res.level, res.gpa, res.pat, res.pwt) == (2, 0x8000_0000 | (gva & 0x1F_FFFF), 1, 1)
    mem, _ = long_tables(gva, 0x1_C000_0000 | PRW | PTE_PS, leaf_level=3)
    res = lwalk(mem, gva)
    assert (res.level, res.gpa, res.pat) == (3, 0x1_C000_0000 | (gva & 0x3FFF_FFFF), 0)


def test_4k_pat_is_bit_7() -> None:
    mem, _ = long_tables(0x1000, 0x7000 | PRW | (1 << 7))
    res = lwalk(mem, 0x1000)
    assert (res.pat, res.level) == (1, 1)


def test_not_present_error_code() -> None:
    """§4.7: P=0 for a not-present entry; W, U, I describe the access."""
    mem, _ = long_tables(0x1000, 0)
    assert lwalk(mem, 0x1000).error_code == 0
    assert lwalk(mem, 0x1000, access="write", cpl=3).error_code == PFERR_WRITE | PFERR_USER
    assert lwalk(mem, 0x1000, access="fetch").error_code == PFERR_FETCH
    # I is reported only when EFER.NXE or CR4.SMEP is set.
    assert lwalk(mem, 0x1000, access="fetch", efer=LONG).error_code == 0
    assert lwalk(mem, 0x1000, access="fetch", efer=LONG, cr4=CR4_PAE | CR4_SMEP).error_code == (
        PFERR_FETCH
    )


@pytest.mark.parametrize("maxphyaddr", [36, 40, 46, 52])
def test_reserved_address_bits(maxphyaddr: int) -> None:
    """§4.5 tables: bits MAXPHYADDR..51 of any entry are reserved."""
    for level in (4, 3, 2, 1):
        mem, addrs = long_tables(0x1000, 0x7000 | PRW)
        addr = addrs[4 - level]
        if maxphyaddr < 52:
            mem[addr] |= 1 << maxphyaddr
            res = lwalk(mem, 0x1000, maxphyaddr=maxphyaddr)
            assert res.error_code == PFERR_RSVD | PFERR_PRESENT, level
            assert res.entries[-1][1] == addr
        mem[addr] = (mem[addr] & ~(1 << maxphyaddr)) | (1 << (maxphyaddr - 1))
        res = lwalk(mem, 0x1000, maxphyaddr=maxphyaddr)
        assert res.error_code & PFERR_RSVD == 0, level


def test_reserved_nx_without_nxe_and_ps_in_pml4e() -> None:
    mem, _ = long_tables(0x1000, 0x7000 | PRW | PTE_NX)
    res = lwalk(mem, 0x1000, efer=LONG, access="write", cpl=3)
    assert res.error_code == PFERR_RSVD | PFERR_PRESENT | PFERR_WRITE | PFERR_USER
    mem, addrs = long_tables(0x1000, 0x7000 | PRW)
    mem[addrs[0]] |= PTE_PS
    assert lwalk(mem, 0x1000).error_code == PFERR_RSVD | PFERR_PRESENT
    # Bits 52..62 are ignored in 4-level paging (62:59 are the protection key).
    mem, addrs = long_tables(0x1000, 0x7000 | PRW | (0x7FF << 52))
    mem[addrs[1]] |= 0x7FF << 52
    assert not lwalk(mem, 0x1000).fault


def test_huge_leaf_reserved_bits() -> None:
    """Bits 20:13 of a 2M leaf and 29:13 of a 1G leaf are reserved."""
    for level, bits in ((2, range(13, 21)), (3, range(13, 30))):
        for bit in bits:
            mem, _ = long_tables(0, PRW | PTE_PS | (1 << bit), leaf_level=level)
            assert lwalk(mem, 0).error_code == PFERR_RSVD | PFERR_PRESENT, (level, bit)
        mem, _ = long_tables(0, PRW | PTE_PS | (1 << 12), leaf_level=level)
        assert not lwalk(mem, 0).fault


def test_not_present_beats_reserved_and_stops_walk() -> None:
    """The walk stops at the first not-present entry: no reserved check there."""
    mem, addrs = long_tables(0x1000, 0x7000 | PRW)
    mem[addrs[1]] = (1 << 51) | PTE_RW
    res = lwalk(mem, 0x1000)
    assert res.error_code == 0 and len(res.entries) == 2


def test_reserved_beats_permission() -> None:
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | (1 << 51))  # supervisor leaf
    res = lwalk(mem, 0x1000, cpl=3, maxphyaddr=48)
    assert res.error_code == PFERR_RSVD | PFERR_PRESENT | PFERR_USER


def test_user_access_rules() -> None:
    """§4.6: CPL 3 needs U/S=1 at every level, R/W=1 to write, XD=0 to fetch."""
    p = PFERR_PRESENT | PFERR_USER
    mem, addrs = long_tables(0x1000, 0x7000 | PRW, upper=PTE_P | PTE_RW)
    assert lwalk(mem, 0x1000, cpl=3).error_code == p
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_US, upper=PRW)
    assert lwalk(mem, 0x1000, cpl=3, access="write").error_code == p | PFERR_WRITE
    assert not lwalk(mem, 0x1000, cpl=3).fault
    mem, addrs = long_tables(0x1000, 0x7000 | PRW)
    mem[addrs[1]] |= PTE_NX  # XD in a PDPTE applies to the whole range
    assert lwalk(mem, 0x1000, cpl=3, access="fetch").error_code == p | PFERR_FETCH
    res = lwalk(mem, 0x1000, cpl=3)
    assert not res.fault and res.nx


def test_cr0_wp_supervisor_writes() -> None:
    """§4.6.1: supervisor writes to read-only pages fault only with CR0.WP=1."""
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_US)
    res = lwalk(mem, 0x1000, access="write")
    assert res.error_code == PFERR_PRESENT | PFERR_WRITE
    res = lwalk(mem, 0x1000, access="write", cr0=CR0_PG)
    assert not res.fault and not res.writable
    assert res.ad_writes[res.entries[-1][1]] & PTE_D


def test_smep() -> None:
    """§4.6.1: with SMEP, supervisor fetches from user pages fault."""
    mem, _ = long_tables(0x1000, 0x7000 | PRW)
    assert not lwalk(mem, 0x1000, access="fetch").fault
    res = lwalk(mem, 0x1000, access="fetch", cr4=CR4_PAE | CR4_SMEP)
    assert res.error_code == PFERR_PRESENT | PFERR_FETCH
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_RW)  # supervisor page
    assert not lwalk(mem, 0x1000, access="fetch", cr4=CR4_PAE | CR4_SMEP).fault


def test_smap_with_rflags_ac() -> None:
    """§4.6.1: with SMAP, explicit supervisor data accesses to user pages need AC=1."""
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_US)  # user, read-only
    cr4 = CR4_PAE | CR4_SMAP
    assert lwalk(mem, 0x1000, cr4=cr4).error_code == PFERR_PRESENT
    assert not lwalk(mem, 0x1000, cr4=cr4, rflags_ac=True).fault
    # AC=1 restores the non-SMAP rules, including CR0.WP for writes.
    res = lwalk(mem, 0x1000, cr4=cr4, rflags_ac=True, access="write")
    assert res.error_code == PFERR_PRESENT | PFERR_WRITE
    assert not lwalk(mem, 0x1000, cr4=cr4, rflags_ac=True, access="write", cr0=CR0_PG).fault
    # SMAP does not restrict fetches or CPL 3.
    assert not lwalk(mem, 0x1000, cr4=cr4, access="fetch").fault
    assert not lwalk(mem, 0x1000, cr4=cr4, cpl=3).fault


def test_protection_keys() -> None:
    """§4.6.2: PKRU AD/WD for user pages; WD on supervisor writes only with WP=1."""
    key = 5
    mem, _ = long_tables(0x1000, 0x7000 | PRW | (key << 59))
    cr4 = CR4_PAE | CR4_PKE
    ad, wd = 1 << (2 * key), 1 << (2 * key + 1)
    pk = PFERR_PRESENT | PFERR_PK
    assert lwalk(mem, 0x1000, cr4=cr4, cpl=3, pkru=ad).error_code == pk | PFERR_USER
    assert lwalk(mem, 0x1000, cr4=cr4, cpl=3, pkru=ad, access="fetch").fault is False
    assert not lwalk(mem, 0x1000, cr4=cr4, cpl=3, pkru=wd).fault
    res = lwalk(mem, 0x1000, cr4=cr4, cpl=3, pkru=wd, access="write")
    assert res.error_code == pk | PFERR_USER | PFERR_WRITE and res.pkey == key
    res = lwalk(mem, 0x1000, cr4=cr4 | CR4_SMAP, rflags_ac=True, pkru=wd, access="write")
    assert res.error_code == pk | PFERR_WRITE
    assert not lwalk(mem, 0x1000, cr4=cr4, pkru=wd, access="write", cr0=CR0_PG).fault
    # Other keys, PKE off, and supervisor pages are unaffected.
    assert not lwalk(mem, 0x1000, cr4=cr4, cpl=3, pkru=1).fault
    assert not lwalk(mem, 0x1000, cpl=3, pkru=ad).fault
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_RW | (key << 59))
    assert not lwalk(mem, 0x1000, cr4=cr4, pkru=ad).fault


def test_pk_combines_with_other_permission_faults() -> None:
    """The PK bit is reported together with an ordinary protection violation."""
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P | PTE_US)  # read-only user page, key 0
    res = lwalk(mem, 0x1000, cr4=CR4_PAE | CR4_PKE, cpl=3, pkru=2, access="write")
    assert res.error_code == PFERR_PRESENT | PFERR_PK | PFERR_WRITE | PFERR_USER


def test_no_ad_writes_on_fault() -> None:
    mem, _ = long_tables(0x1000, 0x7000 | PTE_P)  # supervisor
    res = lwalk(mem, 0x1000, cpl=3)
    assert res.fault and res.ad_writes == {} and res.gpa is None and res.level is None


def test_five_level() -> None:
    """§4.5: LA57 adds a PML5 indexed by bits 56:48."""
    gva = 0x00AB_CDEF_1234_5000
    mem, addrs = long_tables(gva, 0x4444_4000 | PRW, la57=True)
    res = lwalk(mem, gva, cr4=CR4_PAE | CR4_LA57)
    assert res.gpa == 0x4444_4000 and [e[0] for e in res.entries] == [5, 4, 3, 2, 1]
    assert addrs[0] == CR3 + ((gva >> 48) & 0x1FF) * 8
    # Not canonical for 4-level paging.
    assert lwalk(mem, gva).vector == 13
    mem[addrs[0]] |= PTE_PS
    assert lwalk(mem, gva, cr4=CR4_PAE | CR4_LA57).error_code == PFERR_RSVD | PFERR_PRESENT
    # 1G pages under a PML5.
    mem, _ = long_tables(gva, 0x4000_0000 | PRW | PTE_PS, leaf_level=3, la57=True)
    res = lwalk(mem, gva, cr4=CR4_PAE | CR4_LA57, access="write")
    assert res.gpa == 0x4000_0000 | (gva & 0x3FFF_FFFF) and res.level == 3


def test_self_referencing_table_merges_ad() -> None:
    """An entry used at two levels gets one A/D value: the OR of both updates."""
    mem = Mem({CR3: CR3 | PRW})  # PML4[0] points back at the PML4
    res = lwalk(mem, 0, access="write")
    assert res.gpa == CR3 and len(res.entries) == 4
    assert res.ad_writes == {CR3: CR3 | PRW | PTE_A | PTE_D}


def pae_walk(mem: Mem, gva: int, access: str = "read", **kw: int) -> WalkResult:
    args = {"cr0": CR0_PG | CR0_WP, "cr3": 0x20, "cr4": CR4_PAE, "efer": EFER_NXE, "cpl": 0}
    args.update(kw)
    return walk(mem.read, gva=gva, access=access, **args)  # type: ignore[arg-type]


def test_pae_paging() -> None:
    """§4.4: CR3 bits 31:5 locate 4 PDPTEs; PDPTEs carry no R/W, U/S, XD or A."""
    gva = 0xC040_1234
    pdpte = 0x20 + 3 * 8
    mem = Mem({pdpte: 0x3000 | PTE_P, 0x3000 + 2 * 8: 0x4000 | PRW, 0x4000 + 1 * 8: 0x9000 | PRW})
    res = pae_walk(mem, gva, access="write", cpl=3)
    assert res.gpa == 0x9234 and res.level == 1
    assert pdpte not in res.ad_writes and len(res.ad_writes) == 2
    assert [e[0] for e in res.entries] == [3, 2, 1]
    # 2M pages; bits 62:MAXPHYADDR are reserved in PAE entries.
    mem[0x3000 + 2 * 8] = 0x60_0000 | PRW | PTE_PS
    assert pae_walk(mem, gva).gpa == 0x60_0000 | (gva & 0x1F_FFFF)
    mem[0x3000 + 2 * 8] |= 1 << 55
    assert pae_walk(mem, gva).error_code == PFERR_RSVD | PFERR_PRESENT
    # Bits above 31 of the linear address are ignored in legacy modes.
    mem[0x3000 + 2 * 8] = 0x4000 | PRW
    assert pae_walk(mem, gva | (1 << 40)).gpa == 0x9234


@pytest.mark.parametrize("bit", [1, 2, 5, 6, 7, 8, 63])
def test_pae_pdpte_reserved_bits(bit: int) -> None:
    """Table 4-8: PDPTE bits 2:1, 8:5 and 63 are reserved (checked at walk time)."""
    mem = Mem({0x20: 0x3000 | PTE_P | (1 << bit), 0x3000: 0x4000 | PRW, 0x4000: 0x9000 | PRW})
    assert pae_walk(mem, 0).error_code == PFERR_RSVD | PFERR_PRESENT
    mem[0x20] = 0
    assert pae_walk(mem, 0).error_code == 0


def test_pae_nx_and_no_pkeys() -> None:
    mem = Mem({0x20: 0x3000 | PTE_P, 0x3000: 0x4000 | PRW, 0x4000: 0x9000 | PRW | PTE_NX})
    res = pae_walk(mem, 0, access="fetch")
    assert res.error_code == PFERR_PRESENT | PFERR_FETCH
    # XD is reserved with NXE=0; protection keys exist only in IA-32e mode.
    assert pae_walk(mem, 0, efer=0).error_code == PFERR_RSVD | PFERR_PRESENT
    mem[0x4000] = 0x9000 | PRW
    assert not pae_walk(mem, 0, cr4=CR4_PAE | CR4_PKE, cpl=3, pkru=0xFFFFFFFF).fault


def test_32bit_paging_and_pse36() -> None:
    """§4.3: 4-byte entries, 10-bit indices; 4M pages with CR4.PSE (PSE-36 bits)."""
    gva = 0x8040_1ABC
    pde, pte = 0x1000 + (gva >> 22) * 4, 0x2000 + ((gva >> 12) & 0x3FF) * 4
    mem = Mem({pde: 0x2000 | PRW, pte: 0x7000 | PRW | (0xDEAD << 32)})  # high half ignored
    res = walk(
        mem.read, cr0=CR0_PG, cr3=0x1000, cr4=0, efer=EFER_NXE, cpl=3, access="fetch", gva=gva
    )
    assert res.gpa == 0x7ABC and not res.fault
    res = walk(mem.read, cr0=CR0_PG, cr3=0x1000, cr4=0, efer=0, cpl=0, access="write", gva=gva)
    assert res.ad_writes == {pde: 0x2000 | PRW | PTE_A, pte: 0x7000 | PRW | PTE_A | PTE_D}
    # A 4M page with PSE-36: PDE bits 20:13 give physical bits 39:32.
    mem[pde] = 0x8000_0000 | PRW | PTE_PS | (0x12 << 13)
    res = walk(mem.read, cr0=CR0_PG, cr3=0x1000, cr4=CR4_PSE, efer=0, cpl=0, access="read", gva=gva)
    assert res.gpa == (0x12 << 32) | 0x8000_0000 | (gva & 0x3F_FFFF) and res.level == 2
    # Bits at or above MAXPHYADDR (and bit 21) are reserved in a 4M PDE.
    res = walk(
        mem.read,
        cr0=CR0_PG,
        cr3=0x1000,
        cr4=CR4_PSE,
        efer=0,
        cpl=0,
        access="read",
        gva=gva,
        maxphyaddr=36,
    )
    assert res.error_code == PFERR_RSVD | PFERR_PRESENT
    # Without CR4.PSE the PS bit is ignored: the PDE references a page table.
    res = walk(mem.read, cr0=CR0_PG, cr3=0x1000, cr4=0, efer=0, cpl=0, access="read", gva=gva)
    assert res.level in (1, None)
    # I is reported under 32-bit paging only with SMEP (never for NXE alone).
    mem[pde] = 0
    res = walk(
        mem.read, cr0=CR0_PG, cr3=0x1000, cr4=0, efer=EFER_NXE, cpl=0, access="fetch", gva=gva
    )
    assert res.error_code == 0
    res = walk(
        mem.read, cr0=CR0_PG, cr3=0x1000, cr4=CR4_SMEP, efer=0, cpl=0, access="fetch", gva=gva
    )
    assert res.error_code == PFERR_FETCH


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="access"):
        lwalk(Mem(), 0, access="exec")
    with pytest.raises(ValueError, match="PAE"):
        walk(Mem().read, cr0=CR0_PG, cr3=0, cr4=0, efer=LONG, cpl=0, access="read", gva=0)


def test_result_is_frozen() -> None:
    res = lwalk(Mem(), 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.fault = False  # type: ignore[misc]


def test_batch_walker_reexported() -> None:
    from kvmmu import paging_batch

    assert paging.walk_batch is paging_batch.walk_batch
    assert paging.BatchWalkResult is paging_batch.BatchWalkResult
    with pytest.raises(AttributeError):
        _ = paging.no_such_name
