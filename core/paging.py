"""Guest page-table walker: the architectural x86 linear-address translation.

This models what the CPU (and KVM's shadow-MMU walker) does to translate a
guest linear address: Intel SDM Vol 3A ch. 4 (§4.3 32-bit paging, §4.4 PAE
paging, §4.5 4-level and 5-level paging, §4.6 access rights, §4.7 page-fault
error codes, §4.8 accessed and dirty flags) and
``arch/x86/kvm/mmu/paging_tmpl.h: FNAME(walk_addr_generic)`` with
``arch/x86/kvm/mmu.h: permission_fault`` (spec/kvm-mmu.md §3.7).

:func:`walk` is the scalar walker (the hot path of every vCPU access). The
numpy batch walker, which walks many GVAs over the same tables at once, is
:func:`kvmmu.paging_batch.walk_batch`.

Modelling decisions (see the docstrings below for sources):

- The walker never writes guest memory. The A/D updates an access would make
  are returned in :attr:`WalkResult.ad_writes`, and only when the access
  succeeds, as KVM's ``update_accessed_dirty_bits`` does after
  ``permission_fault`` has passed.
- Legacy PAE PDPTEs are read at walk time (as KVM's ``get_pdptr`` and QEMU
  do), and a PDPTE with reserved bits set fails the walk with
  ``#PF(RSVD|P)``; real hardware would have refused the ``MOV CR3`` with #GP.
- In legacy (non-long) modes the linear address is 32 bits wide: bits above
  31 of ``gva`` are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from .paging_batch import BatchWalkResult, walk_batch

__all__ = [
    "CR0_PG",
    "CR0_WP",
    "CR4_LA57",
    "CR4_PAE",
    "CR4_PKE",
    "CR4_PSE",
    "CR4_SMAP",
    "CR4_SMEP",
    "EFER_LMA",
    "EFER_LME",
    "EFER_NXE",
    "GP_VECTOR",
    "PFERR_FETCH",
    "PFERR_PK",
    "PFERR_PRESENT",
    "PFERR_RSVD",
    "PFERR_USER",
    "PFERR_WRITE",
    "PF_VECTOR",
    "PTE_A",
    "PTE_D",
    "PTE_G",
    "PTE_NX",
    "PTE_P",
    "PTE_PAT",
    "PTE_PAT_HUGE",
    "PTE_PCD",
    "PTE_PS",
    "PTE_PWT",
    "PTE_RW",
    "PTE_US",
    "Access",
    "BatchWalkResult",
    "LevelInfo",
    "PagingMode",
    "ReadPhys",
    "WalkResult",
    "canonical",
    "load_pdptrs",
    "paging_mode",
    "pdptr_rsvd_bits",
    "permission_error",
    "walk",
    "walk_batch",
]

# Control-register and MSR bits (SDM Vol 3A §2.5, §2.2.1).
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Paging-structure entry bits (SDM Vol 3A §4.5, Tables 4-14 .. 4-20).
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_PAT = 1 << 7  # in a 4K PTE
PTE_G = 1 << 8
PTE_PAT_HUGE = 1 << 12  # in a 2M/4M/1G leaf
PTE_NX = 1 << 63

# #PF error code (SDM Vol 3A §4.7; arch/x86/include/asm/kvm_host.h PFERR_*).
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4
PFERR_PK = 1 << 5

PF_VECTOR = 14
GP_VECTOR = 13

Access = Literal["read", "write", "fetch"]
ReadPhys = Callable[[int], int]

_M64 = (1 << 64) - 1


def canonical(gva: int, la57: bool) -> bool:
    """True if ``gva`` is canonical: bits 63..47 (63..56 with LA57) all equal.

    SDM Vol 3A §3.3.7.1; a non-canonical data or code access raises #GP(0)
    (#SS for stack accesses, not modelled).
    """
    top = (gva & _M64) >> (56 if la57 else 47)
    return top == 0 or top == (0xFF if la57 else 0x1FFFF)


class LevelInfo(NamedTuple):
    """How one paging-structure level is indexed and checked."""

    level: int  # 5..1 (PAE PDPT is 3, 32-bit PD is 2)
    shift: int  # linear-address bit the index starts at
    index_mask: int
    rsvd: int  # reserved bits when the entry references a table (or is a 4K PTE)
    rsvd_huge: int  # reserved bits when PS=1 makes it a leaf; -1: PS is not a leaf here
    rights_fill: int  # OR-ed in before AND-ing RW/US (PAE PDPTEs carry no rights)
    nx_bit: int  # the XD bit, when it counts at this level
    has_ad: bool  # the entry has an accessed flag (PAE PDPTEs do not)


class PagingMode(NamedTuple):
    """The paging mode fixed by CR0/CR4/EFER/MAXPHYADDR (SDM Vol 3A §4.1.1)."""

    name: str  # "32-bit" | "pae" | "4-level" | "5-level"
    long: bool
    la57: bool
    entry_shift: int  # log2 of the entry size: 2 (32-bit paging) or 3
    entry_mask: int  # 0xffffffff for 32-bit entries
    root_mask: int  # CR3 bits that locate the root table
    addr_mask: int  # entry bits that hold a physical address
    levels: tuple[LevelInfo, ...]
    fetch_flag: bool  # the I/D error-code bit is reported (NXE or SMEP)


def _bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive (empty when hi < lo)."""
    return ((1 << (hi + 1)) - (1 << lo)) if hi >= lo else 0


@lru_cache(maxsize=256)
def paging_mode(cr4: int, efer: int, maxphyaddr: int, smep_or_nxe: bool) -> PagingMode:
    """Build the level table for a paging mode (CR0.PG=1 assumed).

    Reserved bits follow SDM Vol 3A Tables 4-4 .. 4-20: address bits at and
    above MAXPHYADDR, PS in a PML5E/PML4E, bits 29:13 of a 1G leaf and 20:13 of
    a 2M leaf, XD when EFER.NXE=0, and in PAE paging bits 62:MAXPHYADDR.
    """
    nxe = bool(efer & EFER_NXE)
    if not cr4 & CR4_PAE:
        if efer & (EFER_LMA | EFER_LME):
            raise ValueError("long mode requires CR4.PAE=1")
        return _mode_32bit(cr4, maxphyaddr, smep_or_nxe)
    addr_mask = _bits(12, maxphyaddr - 1)
    nx_rsvd = 0 if nxe else PTE_NX
    nx_bit = PTE_NX if nxe else 0
    if not efer & (EFER_LMA | EFER_LME):
        return _mode_pae(maxphyaddr, addr_mask, nx_rsvd, nx_bit, smep_or_nxe)
    la57 = bool(cr4 & CR4_LA57)
    base = _bits(maxphyaddr, 51) | nx_rsvd
    top: list[LevelInfo] = []
    if la57:
        top.append(LevelInfo(5, 48, 0x1FF, base | PTE_PS, -1, 0, nx_bit, True))
    levels = (
        *top,
        LevelInfo(4, 39, 0x1FF, base | PTE_PS, -1, 0, nx_bit, True),
        LevelInfo(3, 30, 0x1FF, base, base | _bits(13, 29), 0, nx_bit, True),
        LevelInfo(2, 21, 0x1FF, base, base | _bits(13, 20), 0, nx_bit, True),
        LevelInfo(1, 12, 0x1FF, base, -1, 0, nx_bit, True),
    )
    return PagingMode(
        "5-level" if la57 else "4-level",
        True,
        la57,
        3,
        _M64,
        addr_mask,
        addr_mask,
        levels,
        smep_or_nxe,
    )


def _mode_pae(
    maxphyaddr: int, addr_mask: int, nx_rsvd: int, nx_bit: int, fetch_flag: bool
) -> PagingMode:
    """PAE paging: SDM Vol 3A §4.4, Tables 4-7 .. 4-11."""
    base = _bits(maxphyaddr, 62) | nx_rsvd
    pdpte_rsvd = pdptr_rsvd_bits(maxphyaddr)
    levels = (
        LevelInfo(3, 30, 0x3, pdpte_rsvd, -1, PTE_RW | PTE_US, 0, False),
        LevelInfo(2, 21, 0x1FF, base, base | _bits(13, 20), 0, nx_bit, True),
        LevelInfo(1, 12, 0x1FF, base, -1, 0, nx_bit, True),
    )
    return PagingMode("pae", False, False, 3, _M64, _bits(5, 31), addr_mask, levels, fetch_flag)


def pdptr_rsvd_bits(maxphyaddr: int) -> int:
    """Reserved bits of a present PAE PDPTE: MAXPHYADDR..63, 8:5, 2:1 (SDM Vol 3A
    Table 4-8; arch/x86/kvm/x86.c: ``pdptr_rsvd_bits``)."""
    return _bits(maxphyaddr, 63) | _bits(1, 2) | _bits(5, 8)


def load_pdptrs(read: Callable[[int], int | None], cr3: int, maxphyaddr: int) -> list[int] | None:
    """``load_pdptrs`` (arch/x86/kvm/x86.c): the four PDPTEs of the 32-byte aligned
    PDPT at ``cr3``, or None when the load fails and the cached copies stay.

    It fails when the PDPT cannot be read (``read`` returns None:
    ``kvm_vcpu_read_guest_page`` < 0) or a present PDPTE has a reserved bit
    (:func:`pdptr_rsvd_bits`). MOV CR3 then #GPs; ``KVM_SET_SREGS`` ignores it.
    """
    base = cr3 & 0xFFFFFFE0
    new = [read(base + 8 * k) for k in range(4)]
    rsvd = pdptr_rsvd_bits(maxphyaddr)
    pdptes = [p for p in new if p is not None]
    if len(pdptes) != 4 or any(p & PTE_P and p & rsvd for p in pdptes):
        return None
    return pdptes


def _mode_32bit(cr4: int, maxphyaddr: int, smep: bool) -> PagingMode:
    """32-bit paging: SDM Vol 3A §4.3, Tables 4-4 .. 4-6 (PSE-36 4M pages)."""
    # A 4M PDE holds physical bits 39:32 in bits 20:13; those at or above
    # MAXPHYADDR (capped at 40) and bit 21 are reserved.
    hi = min(maxphyaddr, 40)
    rsvd_4m = _bits(13 + hi - 32, 21)
    rsvd_huge = rsvd_4m if cr4 & CR4_PSE else -1
    levels = (
        LevelInfo(2, 22, 0x3FF, 0, rsvd_huge, 0, 0, True),
        LevelInfo(1, 12, 0x3FF, 0, -1, 0, 0, True),
    )
    return PagingMode("32-bit", False, False, 2, 0xFFFFFFFF, 0xFFFFF000, 0xFFFFF000, levels, smep)


@dataclass(frozen=True, slots=True)
class WalkResult:
    """Outcome of one guest walk.

    ``vector`` is 14 (#PF) or 13 (#GP) when ``fault``; ``gpa``/``level`` are
    None on a fault (level None also when paging is off). ``pat``/``pcd``/
    ``pwt`` are the leaf's bits (PAT is bit 7 of a 4K PTE, bit 12 of a huge
    leaf). ``entries`` lists every entry read, top level first, as
    ``(level, entry_address, value)`` (the shadow MMU's ``gpte_changed``
    re-reads them). ``writable``/``user``/``nx`` are the rights accumulated
    over the entries read (SDM Vol 3A §4.6); ``pkey`` is the leaf's
    protection key (long mode only, else 0; also set on a permission fault).
    Under 32-bit paging ``level`` 2 means a 4 MiB page.
    """

    fault: bool
    vector: int | None
    error_code: int
    gpa: int | None
    level: int | None
    pat: int = 0
    pcd: int = 0
    pwt: int = 0
    ad_writes: dict[int, int] = field(default_factory=dict)
    entries: tuple[tuple[int, int, int], ...] = ()
    writable: bool = True
    user: bool = True
    nx: bool = False
    pkey: int = 0


def permission_error(
    *,
    writable: bool,
    user: bool,
    nx: bool,
    cpl: int,
    write: bool,
    fetch: bool,
    cr0: int,
    cr4: int,
    rflags_ac: bool,
    pk_bits: int,
) -> int:
    """Return ``PFERR_PRESENT`` (plus ``PFERR_PK``) if the access is denied, else 0.

    SDM Vol 3A §4.6 (access rights, with CR0.WP, SMEP, SMAP/RFLAGS.AC for
    explicit supervisor accesses) and §4.6.2 (protection keys); KVM's
    ``permission_fault`` computes the same from a precomputed bitmap.
    ``pk_bits`` are the PKRU AD/WD bits of the page's key (bit 0 AD, bit 1
    WD), or 0 when protection keys do not apply (not a user page, CR4.PKE=0,
    not long mode).
    """
    wp = cr0 & CR0_WP
    if cpl == 3:
        denied = not user or (write and not writable) or (fetch and nx)
    elif fetch:
        denied = nx or (user and bool(cr4 & CR4_SMEP))
    else:
        denied = (user and bool(cr4 & CR4_SMAP) and not rflags_ac) or (
            write and not writable and bool(wp)
        )
    # Protection keys govern data accesses to user pages only (§4.6.2).
    pk = not fetch and bool(pk_bits & 1 or (write and pk_bits & 2 and (cpl == 3 or wp)))
    if pk:
        return PFERR_PRESENT | PFERR_PK
    return PFERR_PRESENT if denied else 0


def _pf(
    code: int,
    entries: list[tuple[int, int, int]],
    rights: int,
    nx: int,
    pkey: int = 0,
) -> WalkResult:
    return WalkResult(
        True,
        PF_VECTOR,
        code,
        None,
        None,
        entries=tuple(entries),
        writable=bool(rights & PTE_RW),
        user=bool(rights & PTE_US),
        nx=bool(nx),
        pkey=pkey,
    )


def walk(
    read_phys: ReadPhys,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    cpl: int,
    access: Access,
    gva: int,
    rflags_ac: bool = False,
    pkru: int = 0,
    maxphyaddr: int = 52,
) -> WalkResult:
    """Translate ``gva`` as the CPU would for a ``access`` at ``cpl``.

    ``read_phys(addr)`` returns the 8-byte little-endian value at guest
    physical ``addr`` (only the low 4 bytes are used under 32-bit paging).
    Follows ``paging_tmpl.h: FNAME(walk_addr_generic)``: read each level,
    fail on not-present (error code P=0) or reserved bits (RSVD|P), AND the
    RW/US bits and OR the XD bits, stop at a leaf (PS=1 where PS makes a
    leaf, or level 1), then apply ``permission_fault``. The error code gets
    W for writes, U for CPL=3 and I for fetches when EFER.NXE or CR4.SMEP
    is set (SDM Vol 3A §4.7; never I for NXE under 32-bit paging).
    """
    write = access == "write"
    fetch = access == "fetch"
    if not (write or fetch or access == "read"):
        raise ValueError(f"access must be 'read', 'write' or 'fetch', not {access!r}")
    if not cr0 & CR0_PG:
        return WalkResult(False, None, 0, gva, None)
    pae_or_long = bool(cr4 & CR4_PAE)
    mode = paging_mode(
        cr4 & (CR4_PAE | CR4_LA57 | CR4_PSE),
        efer & (EFER_NXE | EFER_LMA | EFER_LME),
        maxphyaddr,
        bool(cr4 & CR4_SMEP or (pae_or_long and efer & EFER_NXE)),
    )
    if mode.long:
        if not canonical(gva, mode.la57):
            return WalkResult(True, GP_VECTOR, 0, None, None)
    else:
        gva &= 0xFFFFFFFF
    base_code = (PFERR_WRITE if write else 0) | (PFERR_USER if cpl == 3 else 0)
    if fetch and mode.fetch_flag:
        base_code |= PFERR_FETCH

    entries: list[tuple[int, int, int]] = []
    table = cr3 & mode.root_mask
    addr_mask = mode.addr_mask
    eshift = mode.entry_shift
    emask = mode.entry_mask
    rights = PTE_RW | PTE_US
    nx = 0
    pte = 0
    info = mode.levels[0]
    for info in mode.levels:
        level, shift, index_mask, rsvd, rsvd_huge, fill, nx_bit, _ = info
        addr = table + (((gva >> shift) & index_mask) << eshift)
        pte = read_phys(addr) & emask
        entries.append((level, addr, pte))
        if not pte & PTE_P:
            return _pf(base_code, entries, rights, nx)
        huge = rsvd_huge >= 0 and pte & PTE_PS
        if pte & (rsvd_huge if huge else rsvd):
            return _pf(base_code | PFERR_RSVD | PFERR_PRESENT, entries, rights, nx)
        rights &= pte | fill
        nx |= pte & nx_bit
        if huge or level == 1:
            break
        table = pte & addr_mask

    user = bool(rights & PTE_US)
    pkey = (pte >> 59) & 0xF if mode.long else 0
    pk_bits = (pkru >> (2 * pkey)) & 3 if user and cr4 & CR4_PKE and mode.long else 0
    err = permission_error(
        writable=bool(rights & PTE_RW),
        user=user,
        nx=bool(nx),
        cpl=cpl,
        write=write,
        fetch=fetch,
        cr0=cr0,
        cr4=cr4,
        rflags_ac=rflags_ac,
        pk_bits=pk_bits,
    )
    if err:
        return _pf(base_code | err, entries, rights, nx, pkey)
    return _success(mode, info, entries, pte, gva, write, rights, nx, pkey)


def _success(
    mode: PagingMode,
    info: LevelInfo,
    entries: list[tuple[int, int, int]],
    pte: int,
    gva: int,
    write: bool,
    rights: int,
    nx: int,
    pkey: int,
) -> WalkResult:
    """Build the result of a successful walk, with the A/D updates (SDM §4.8)."""
    level = info.level
    size_shift = info.shift
    offset = gva & ((1 << size_shift) - 1)
    if level == 1:
        gpa = (pte & mode.addr_mask) | offset
        pat = (pte >> 7) & 1
    else:
        frame = pte & mode.addr_mask & ~((1 << size_shift) - 1)
        if mode.entry_shift == 2:  # PSE-36: PDE bits 20:13 are address bits 39:32
            frame |= ((pte >> 13) & 0xFF) << 32
        gpa = frame | offset
        pat = (pte >> 12) & 1
    ad: dict[int, int] = {}
    last = len(entries) - 1
    # Every entry has an A flag except a PAE PDPTE (always the first).
    for i in range(1 if mode.name == "pae" else 0, last + 1):
        _, addr, val = entries[i]
        new = val | (PTE_A | PTE_D if write and i == last else PTE_A)
        if new != val:
            ad[addr] = ad.get(addr, 0) | new
    return WalkResult(
        False,
        None,
        0,
        gpa,
        level,
        pat,
        (pte >> 4) & 1,
        (pte >> 3) & 1,
        ad,
        tuple(entries),
        bool(rights & PTE_RW),
        bool(rights & PTE_US),
        bool(nx),
        pkey,
    )


# The numpy batch walker lives in kvmmu.paging_batch (which imports this
# module); it is re-exported here lazily so ``kvmmu.paging`` is the one import
# for both walkers.
def __getattr__(name: str) -> object:
    if name in ("BatchWalkResult", "walk_batch"):
        from . import paging_batch

        return getattr(paging_batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
