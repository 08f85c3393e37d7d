"""The numpy batch walker equals the scalar walker on every field.

Random guest memory is filled with random entries whose frames point back
into the same memory, so walks go deep, alias (an entry used at several
levels or by several GVAs) and hit every fault class. For each example every
GVA is walked by both walkers; ``ad_writes`` of the batch must be the union
(OR-merged per entry) of the scalar ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    PTE_NX,
    PTE_P,
    PTE_PS,
    BatchWalkResult,
    WalkResult,
    walk,
    walk_batch,
)
from kvmmu.paging_batch import array_reader

PAGES = 48


def random_memory(
    rng: np.random.Generator, long_mode: bool, pages: int = PAGES
) -> npt.NDArray[np.uint8]:
    """Entries with random flags whose frames point at pages of this memory."""
    n = pages * 512
    frames = rng.integers(0, pages, n, dtype=np.uint64) << np.uint64(12)
    frames[rng.random(n) < 0.3] = 0  # huge-page aligned: no reserved bits 13..29
    flags = rng.integers(0, 1 << 12, n, dtype=np.uint64)
    flags |= (rng.random(n) < 0.9).astype(np.uint64) * np.uint64(PTE_P)
    flags &= ~np.uint64(PTE_PS)
    flags |= (rng.random(n) < 0.2).astype(np.uint64) * np.uint64(PTE_PS)
    high = np.zeros(n, np.uint64)
    pick = rng.random(n) < 0.06
    high[pick] = np.uint64(1) << rng.integers(32, 64, int(pick.sum()), dtype=np.uint64)
    nx = (rng.random(n) < 0.15).astype(np.uint64) * np.uint64(PTE_NX)
    keys = rng.integers(0, 16, n, dtype=np.uint64) << np.uint64(59)
    if not long_mode:
        keys[:] = 0
    pat = (rng.random(n) < 0.2).astype(np.uint64) << np.uint64(12)
    ents = frames | flags | high | nx | keys | pat
    return ents.view(np.uint8)


def clean_pdptes(rng: np.random.Generator, mem: npt.NDArray[np.uint8], cr3: int) -> None:
    """Mostly clear the PAE PDPTE reserved bits (2:1, 8:5, 63:52) so walks go on."""
    ents = mem.view(np.uint64)
    base = (cr3 & 0xFFFFFFE0) // 8
    for i in range(base, min(base + 4, len(ents))):
        if rng.random() < 0.9:
            ents[i] &= np.uint64(0x000F_FFFF_FFFF_FE19)


def make_scalar_reader(mem: npt.NDArray[np.uint8]) -> Callable[[int], int]:
    data = mem.tobytes()
    size = len(data)

    def read(addr: int) -> int:
        if addr + 8 > size:
            return 0
        return int.from_bytes(data[addr : addr + 8], "little")

    return read


def union(results: list[WalkResult]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in results:
        for a, v in r.ad_writes.items():
            out[a] = out.get(a, 0) | v
    return out


def assert_same(batch: BatchWalkResult, scalar: list[WalkResult]) -> None:
    assert len(batch) == len(scalar)
    for i, s in enumerate(scalar):
        got = (
            bool(batch.fault[i]),
            int(batch.vector[i]),
            int(batch.error_code[i]),
            int(batch.gpa[i]),
            int(batch.level[i]),
            int(batch.pat[i]),
            int(batch.pcd[i]),
            int(batch.pwt[i]),
        )
        want = (
            s.fault,
            -1 if s.vector is None else s.vector,
            s.error_code,
            0 if s.gpa is None else s.gpa,
            0 if s.level is None else s.level,
            s.pat,
            s.pcd,
            s.pwt,
        )
        assert got == want, (i, s)
    assert batch.ad_writes == union(scalar)


MODES = {
    "32-bit": (0, 0),
    "32-bit-pse": (CR4_PSE, 0),
    "pae": (CR4_PAE, 0),
    "4-level": (CR4_PAE, EFER_LME | EFER_LMA),
    "5-level": (CR4_PAE | CR4_LA57, EFER_LME | EFER_LMA),
}


def random_gvas(rng: np.random.Generator, mode: str, n: int) -> npt.NDArray[np.uint64]:
    raw = rng.integers(0, 1 << 63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n, dtype=np.uint64
    )
    shift = 56 if mode == "5-level" else 47
    sign = (raw >> np.uint64(shift)) & np.uint64(1)
    canon_hi = np.where(sign == 1, ~((np.uint64(1) << np.uint64(shift)) - np.uint64(1)), 0)
    canon = (raw & ((np.uint64(1) << np.uint64(shift)) - np.uint64(1))) | canon_hi.astype(np.uint64)
    keep_raw = rng.random(n) < 0.1  # some non-canonical (and >4G for legacy modes)
    return np.where(keep_raw, raw, canon).astype(np.uint64)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(sorted(MODES)),
    cr0_wp=st.booleans(),
    cr4_bits=st.sets(st.sampled_from([CR4_SMEP, CR4_SMAP, CR4_PKE])),
    nxe=st.booleans(),
    cpl=st.sampled_from([0, 3]),
    access=st.sampled_from(["read", "write", "fetch"]),
    ac=st.booleans(),
    pkru=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    maxphyaddr=st.sampled_from([36, 40, 46, 52]),
)
def test_batch_equals_scalar(
    seed: int,
    mode: str,
    cr0_wp: bool,
    cr4_bits: set[int],
    nxe: bool,
    cpl: int,
    access: str,
    ac: bool,
    pkru: int,
    maxphyaddr: int,
) -> None:
    rng = np.random.default_rng(seed)
    cr4_mode, efer_mode = MODES[mode]
    mem = random_memory(rng, bool(efer_mode))
    cr3 = int(rng.integers(0, PAGES)) << 12 | int(rng.integers(0, 0x1000))
    if mode == "pae":
        clean_pdptes(rng, mem, cr3)
    kw = {
        "cr0": CR0_PG | (CR0_WP if cr0_wp else 0),
        "cr3": cr3,
        "cr4": cr4_mode | sum(cr4_bits),
        "efer": efer_mode | (EFER_NXE if nxe else 0),
        "cpl": cpl,
        "access": access,
        "rflags_ac": ac,
        "pkru": pkru,
        "maxphyaddr": maxphyaddr,
    }
    gvas = random_gvas(rng, mode, 96)
    batch = walk_batch(array_reader(mem), gvas=gvas, **kw)  # type: ignore[arg-type]
    read = make_scalar_reader(mem)
    scalar = [walk(read, gva=int(g), **kw) for g in gvas]  # type: ignore[arg-type]
    assert_same(batch, scalar)


def test_batch_paging_off_and_empty() -> None:
    mem = np.zeros(4096, np.uint8)
    gvas = np.array([0, 0x1234, 0xFFFF_FFFF_FFFF_F000], np.uint64)
    res = walk_batch(
        array_reader(mem), cr0=0, cr3=0, cr4=0, efer=0, cpl=3, access="fetch", gvas=gvas
    )
    assert res.gpa.tolist() == gvas.tolist()
    assert not res.fault.any() and (res.vector == -1).all() and (res.level == 0).all()
    res = walk_batch(
        array_reader(mem),
        cr0=CR0_PG,
        cr3=0,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        cpl=0,
        access="read",
        gvas=np.array([], np.uint64),
    )
    assert len(res) == 0 and res.ad_writes == {}


def test_batch_rejects_bad_access() -> None:
    with pytest.raises(ValueError, match="access"):
        walk_batch(
            array_reader(np.zeros(8, np.uint8)),
            cr0=CR0_PG,
            cr3=0,
            cr4=CR4_PAE,
            efer=EFER_LME,
            cpl=0,
            access="exec",  # type: ignore[arg-type]
            gvas=[0],
        )


def test_array_reader_bounds_and_alignment() -> None:
    mem = np.arange(32, dtype=np.uint8)
    read = array_reader(mem)
    got = read(np.array([0, 4, 24, 28, 32, 1 << 40], np.uint64))
    want = [int.from_bytes(bytes(mem[a : a + 8]), "little") for a in (0, 4, 24)]
    assert got.tolist() == [*want, 0, 0, 0]


def test_shared_tables_union_of_ad_writes() -> None:
    """Many GVAs through one PML4E/PDPTE/PD: one A update each, D on written leaves."""
    mem = np.zeros(6 * 4096, np.uint8)
    ents = mem.view(np.uint64)
    ents[0x1000 // 8] = 0x2000 | 7
    ents[0x2000 // 8] = 0x3000 | 7
    ents[0x3000 // 8] = 0x4000 | 7
    ents[0x4000 // 8 : 0x4000 // 8 + 16] = (0x5000 | 7) + np.arange(16, dtype=np.uint64) * 0x1000
    gvas = np.arange(16, dtype=np.uint64) * np.uint64(0x1000) + np.uint64(0x10)
    res = walk_batch(
        array_reader(mem),
        cr0=CR0_PG,
        cr3=0x1000,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        cpl=3,
        access="write",
        gvas=gvas,
    )
    assert not res.fault.any()
    assert res.gpa.tolist() == [0x5010 + 0x1000 * i for i in range(16)]
    assert len(res.ad_writes) == 3 + 16
    assert res.ad_writes[0x1000] == 0x2000 | 7 | 0x20
    assert res.ad_writes[0x4000] == 0x5000 | 7 | 0x60
