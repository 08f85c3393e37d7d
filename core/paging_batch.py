"""numpy batch guest walker: many GVAs over the same tables, one level at a time.

Same architecture and results as the scalar :func:`kvmmu.paging.walk` (SDM
Vol 3A ch. 4; ``paging_tmpl.h: FNAME(walk_addr_generic)`` and
``permission_fault``), vectorised: each level is one ``read_phys_many`` call
for every GVA still walking, then the not-present/reserved checks, the rights
accumulation and the leaf test run as array operations. Used for bulk work
(pre-faulting a range, a device walking a buffer, benchmarks).

Array encodings of the scalar result's None values: ``vector`` is -1 when
there is no fault, ``level`` is 0 on a fault or with paging off, ``gpa`` and
``pat``/``pcd``/``pwt`` are 0 on a fault. ``ad_writes`` is the union of the
per-GVA A/D updates; an entry updated by several walks gets the OR of the
updates (every update only sets bits in the same original value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .paging import (
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
    GP_VECTOR,
    PF_VECTOR,
    PFERR_FETCH,
    PFERR_PK,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_USER,
    PFERR_WRITE,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    Access,
    PagingMode,
    paging_mode,
)

__all__ = ["BatchWalkResult", "ReadPhysMany", "array_reader", "walk_batch"]

U64 = npt.NDArray[np.uint64]
ReadPhysMany = Callable[[U64], U64]


@dataclass(frozen=True, slots=True)
class BatchWalkResult:
    """Per-GVA results as arrays (see the module docstring for encodings)."""

    fault: npt.NDArray[np.bool_]
    vector: npt.NDArray[np.int8]
    error_code: npt.NDArray[np.uint32]
    gpa: U64
    level: npt.NDArray[np.int8]
    pat: npt.NDArray[np.uint8]
    pcd: npt.NDArray[np.uint8]
    pwt: npt.NDArray[np.uint8]
    ad_writes: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fault)


def array_reader(mem: npt.NDArray[np.uint8]) -> ReadPhysMany:
    """A ``read_phys_many`` over a flat uint8 array of guest RAM from GPA 0.

    Reads 8 little-endian bytes at each (4-byte aligned) address; addresses
    beyond the array read as 0.
    """
    words = np.frombuffer(mem, dtype="<u4")
    limit = np.uint64(len(words) - 1)

    def read(addrs: U64) -> U64:
        idx = addrs >> np.uint64(2)
        ok = idx < limit
        safe = np.where(ok, idx, 0).astype(np.intp)
        lo = words[safe].astype(np.uint64)
        hi = words[safe + 1].astype(np.uint64)
        return np.where(ok, lo | (hi << np.uint64(32)), np.uint64(0))

    return read


def _u(value: int) -> np.uint64:
    return np.uint64(value & ((1 << 64) - 1))


def _empty(n: int) -> BatchWalkResult:
    return BatchWalkResult(
        np.zeros(n, np.bool_),
        np.full(n, -1, np.int8),
        np.zeros(n, np.uint32),
        np.zeros(n, np.uint64),
        np.zeros(n, np.int8),
        np.zeros(n, np.uint8),
        np.zeros(n, np.uint8),
        np.zeros(n, np.uint8),
    )


class _Walk:
    """Mutable per-call state of one batch walk."""

    def __init__(self, mode: PagingMode, gvas: U64) -> None:
        n = len(gvas)
        nlev = len(mode.levels)
        self.mode = mode
        self.gvas = gvas
        self.res = _empty(n)
        self.rights = np.full(n, PTE_RW | PTE_US, np.uint64)
        self.nx = np.zeros(n, np.uint64)
        self.leaf = np.zeros(n, np.uint64)
        self.leaf_k = np.full(n, -1, np.int8)
        self.ent_addr = np.zeros((nlev, n), np.uint64)
        self.ent_val = np.zeros((nlev, n), np.uint64)
        self.used = np.zeros((nlev, n), np.bool_)

    def fail(self, lanes: npt.NDArray[np.intp], vector: int, code: npt.ArrayLike) -> None:
        self.res.fault[lanes] = True
        self.res.vector[lanes] = vector
        self.res.error_code[lanes] = code


def walk_batch(
    read_phys_many: ReadPhysMany,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    cpl: int,
    access: Access,
    gvas: npt.ArrayLike,
    rflags_ac: bool = False,
    pkru: int = 0,
    maxphyaddr: int = 52,
) -> BatchWalkResult:
    """Walk every GVA in ``gvas`` with the same CR/EFER state and access.

    ``read_phys_many(addrs)`` returns the 8-byte little-endian values at the
    guest physical addresses ``addrs`` (uint64 arrays). The result equals
    :func:`kvmmu.paging.walk` applied to each GVA, field by field.
    """
    va = np.asarray(gvas, dtype=np.uint64).ravel()
    write = access == "write"
    fetch = access == "fetch"
    if not (write or fetch or access == "read"):
        raise ValueError(f"access must be 'read', 'write' or 'fetch', not {access!r}")
    if not cr0 & CR0_PG:
        res = _empty(len(va))
        res.gpa[:] = va
        return res
    pae_or_long = bool(cr4 & CR4_PAE)
    mode = paging_mode(
        cr4 & (CR4_PAE | CR4_LA57 | CR4_PSE),
        efer & (EFER_NXE | EFER_LMA | EFER_LME),
        maxphyaddr,
        bool(cr4 & CR4_SMEP or (pae_or_long and efer & EFER_NXE)),
    )
    if not mode.long:
        va = va & np.uint64(0xFFFFFFFF)
    st = _Walk(mode, va)
    lanes = np.arange(len(va), dtype=np.intp)
    if mode.long:
        top = va >> np.uint64(56 if mode.la57 else 47)
        canon = (top == 0) | (top == np.uint64(0xFF if mode.la57 else 0x1FFFF))
        st.fail(lanes[~canon], GP_VECTOR, 0)
        lanes = lanes[canon]
    base_code = (PFERR_WRITE if write else 0) | (PFERR_USER if cpl == 3 else 0)
    if fetch and mode.fetch_flag:
        base_code |= PFERR_FETCH
    _descend(st, read_phys_many, lanes, cr3, base_code)
    _permissions(st, cr0, cr4, cpl, write, fetch, rflags_ac, pkru, base_code)
    return _finish(st, write)


def _descend(
    st: _Walk, read: ReadPhysMany, lanes: npt.NDArray[np.intp], cr3: int, base_code: int
) -> None:
    """Walk all lanes level by level, recording entries, faults and leaves."""
    mode = st.mode
    table = np.full(len(lanes), cr3 & mode.root_mask, np.uint64)
    emask = _u(mode.entry_mask)
    addr_mask = _u(mode.addr_mask)
    eshift = np.uint64(mode.entry_shift)
    for k, info in enumerate(mode.levels):
        if not len(lanes):
            return
        idx = (st.gvas[lanes] >> np.uint64(info.shift)) & np.uint64(info.index_mask)
        addr = table + (idx << eshift)
        pte = np.asarray(read(addr), dtype=np.uint64) & emask
        st.ent_addr[k, lanes] = addr
        st.ent_val[k, lanes] = pte
        st.used[k, lanes] = True
        present = (pte & np.uint64(PTE_P)) != 0
        if info.rsvd_huge >= 0:
            huge = (pte & np.uint64(PTE_PS)) != 0
            rsvd = np.where(huge, _u(info.rsvd_huge), _u(info.rsvd))
        else:
            huge = np.zeros(len(lanes), np.bool_)
            rsvd = np.full(len(lanes), _u(info.rsvd), np.uint64)
        bad = present & ((pte & rsvd) != 0)
        st.fail(lanes[~present], PF_VECTOR, base_code)
        st.fail(lanes[bad], PF_VECTOR, base_code | PFERR_RSVD | PFERR_PRESENT)
        ok = present & ~bad
        lanes, pte, huge = lanes[ok], pte[ok], huge[ok]
        st.rights[lanes] &= pte | np.uint64(info.rights_fill)
        st.nx[lanes] |= pte & _u(info.nx_bit)
        done = huge | (info.level == 1)
        st.leaf[lanes[done]] = pte[done]
        st.leaf_k[lanes[done]] = k
        lanes, table = lanes[~done], pte[~done] & addr_mask


def _permissions(
    st: _Walk,
    cr0: int,
    cr4: int,
    cpl: int,
    write: bool,
    fetch: bool,
    ac: bool,
    pkru: int,
    base_code: int,
) -> None:
    """``permission_fault`` on every lane that reached a leaf (SDM §4.6)."""
    lanes = np.flatnonzero(st.leaf_k >= 0)
    rights = st.rights[lanes]
    w = (rights & np.uint64(PTE_RW)) != 0
    u = (rights & np.uint64(PTE_US)) != 0
    x = st.nx[lanes] != 0
    wp = bool(cr0 & CR0_WP)
    if cpl == 3:
        denied = ~u | (write & ~w) | (fetch & x)
    elif fetch:
        denied = x | (u & bool(cr4 & CR4_SMEP))
    else:
        denied = (u & (bool(cr4 & CR4_SMAP) and not ac)) | (write & ~w & wp)
    pk = np.zeros(len(lanes), np.bool_)
    if st.mode.long and cr4 & CR4_PKE and not fetch:
        keys = ((st.leaf[lanes] >> np.uint64(59)) & np.uint64(0xF)).astype(np.intp)
        bits = (pkru >> (2 * np.arange(16))) & 3
        blocked = (bits & 1) | ((bits & 2) * (write and (cpl == 3 or wp)))
        pk = u & (blocked[keys] != 0)
    code = np.where(pk, PFERR_PRESENT | PFERR_PK, np.where(denied, PFERR_PRESENT, 0))
    bad = code != 0
    st.fail(lanes[bad], PF_VECTOR, base_code | code[bad])


def _finish(st: _Walk, write: bool) -> BatchWalkResult:
    """GPA, level, memory-type bits and the A/D union for successful lanes."""
    mode, res = st.mode, st.res
    lanes = np.flatnonzero((st.leaf_k >= 0) & ~res.fault)
    if not len(lanes):
        return res
    k = st.leaf_k[lanes].astype(np.intp)
    pte = st.leaf[lanes]
    shifts = np.array([info.shift for info in mode.levels], np.uint64)[k]
    levels = np.array([info.level for info in mode.levels], np.int8)[k]
    size_mask = (np.uint64(1) << shifts) - np.uint64(1)
    gpa = (pte & _u(mode.addr_mask) & ~size_mask) | (st.gvas[lanes] & size_mask)
    if mode.entry_shift == 2:  # PSE-36: PDE bits 20:13 are address bits 39:32
        pse36 = ((pte >> np.uint64(13)) & np.uint64(0xFF)) << np.uint64(32)
        gpa |= np.where(levels == 2, pse36, np.uint64(0))
    res.gpa[lanes] = gpa
    res.level[lanes] = levels
    pat_shift = np.where(levels == 1, np.uint64(7), np.uint64(12))
    res.pat[lanes] = (pte >> pat_shift) & np.uint64(1)
    res.pcd[lanes] = (pte >> np.uint64(4)) & np.uint64(1)
    res.pwt[lanes] = (pte >> np.uint64(3)) & np.uint64(1)
    res.ad_writes.update(_ad_union(st, lanes, k, write))
    return res


def _ad_union(
    st: _Walk, lanes: npt.NDArray[np.intp], leaf_k: npt.NDArray[np.intp], write: bool
) -> dict[int, int]:
    """A on every entry used, D on the leaf for writes (SDM §4.8), OR-merged."""
    addrs: list[U64] = []
    vals: list[U64] = []
    for k, info in enumerate(st.mode.levels):
        if not info.has_ad:
            continue
        sel = lanes[st.used[k, lanes]]
        if not len(sel):
            continue
        old = st.ent_val[k, sel]
        bits = np.full(len(sel), PTE_A, np.uint64)
        if write:
            bits[leaf_k[st.used[k, lanes]] == k] |= np.uint64(PTE_D)
        new = old | bits
        changed = new != old
        addrs.append(st.ent_addr[k, sel][changed])
        vals.append(new[changed])
    if not addrs:
        return {}
    a = np.concatenate(addrs)
    v = np.concatenate(vals)
    if not len(a):
        return {}
    order = np.argsort(a, kind="stable")
    a, v = a[order], v[order]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    merged = np.bitwise_or.reduceat(v, starts)
    return dict(zip(a[starts].tolist(), merged.tolist(), strict=True))
