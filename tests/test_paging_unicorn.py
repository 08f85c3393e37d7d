"""Differential test: ``kvmmu.paging.walk`` against QEMU's x86 walker in unicorn.

unicorn 2.1.x ships QEMU 5.0's TCG x86 MMU (``target/i386/excp_helper.c:
handle_mmu_fault``), a page-table walker nobody here wrote. Each case builds
a random page-table path in unicorn's guest RAM, sets CR0/CR4/EFER/CR3,
RFLAGS.AC and PKRU, drops to CPL 3 with IRETQ/IRETD when asked, performs one
read (``mov rax,[rbx]``), write (``mov [rbx],rax``) or fetch (``jmp rbx``) at
the target GVA, and compares with our walker (fed the same bytes): fault,
vector, error code, the GPA of data accesses, and every entry of the target
path in memory afterwards (A/D write-back).

How the hard parts were solved (all checked by this file's own tests):

- Icelake-Server CPU model (``ctl_set_cpu_model``) for SMAP, PKU and LA57;
  its MAXPHYADDR is 40, so the walker runs with ``maxphyaddr=40``.
- unicorn never delivers exceptions through the IDT: it calls the
  ``UC_HOOK_INTR`` hook with the vector only. The error code stays in
  ``CPUX86State.error_code``; we read it from the raw bytes of
  ``uc.context_save()``. Its offset is *calibrated* at start-up from cases
  whose error codes follow from the SDM alone (not from our walker), and the
  calibration asserts the offset is unique. CR2 is checked against the GVA.
- Because no exception is ever delivered, QEMU's ``env->old_exception``
  stays set and the next #PF would become #DF; every case therefore starts
  from a context saved before any exception (``context_restore``).
- CPL 3 is entered with IRETQ/IRETD through a GDT with DPL-3 code and data
  descriptors; ``wrpkru`` loads PKRU when CR4.PKE=1 (long mode).
- LA57: supported by this CPU model in unicorn; 5-level cases are part of
  the random mix.

unicorn behaviours the comparison accounts for (each is asserted exactly,
so a change would make the test fail rather than pass silently):

- QEMU sets A in each non-leaf entry as it walks past it, *even when the
  access then faults* (ours, like KVM's ``update_accessed_dirty_bits``,
  reports A/D only for a successful access), and it sets A in a PDPTE before
  it knows the PDPTE is a 1 GiB leaf, so a 1 GiB leaf that then fails its
  own reserved-bit check (bits 29:13) or the permission check keeps A set:
  not architectural for a leaf (SDM Vol 3A §4.8). On a fault the test
  expects exactly those A bits and nothing else.
- Around an instruction fetch unicorn also touches GVA-1 (cause not traced
  in its source). Observed: if GVA-1 is unmapped, the hook reports #PF with
  CR2 = GVA-1 and error code 0 (even at CPL 3) instead of the fetch's own
  fault; if GVA-1 is non-canonical, #GP follows even a successful fetch.
  So every fetch target is aligned to a top-level boundary (lower indices
  0, page offset 0), GVA-1 is mapped, through entries off the target's path,
  to an accessible 4 KiB guard page, and top-level index 256 (GVA-1
  non-canonical) is never a fetch target. Reads and writes use random
  indices and offsets.
- The GPA of a fetch is not observable (unicorn's memory hooks see data
  accesses only, and they report the physical address); fetch cases compare
  fault/vector/error code/A/D, data cases compare the GPA too.

Not covered here (each is covered by hand-built tests in test_paging.py):
PAE PDPTE reserved bits 1-2 and 5-8 (checked: QEMU 5.0's walker ignores them;
real hardware rejects them at MOV CR3 with #GP, our walker fails the walk
with #PF(RSVD)), PSE-36 address bits 20:13 of a 4 MiB PDE (they would place
the page above unicorn's 2 GiB of RAM), and MAXPHYADDR other than 40.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
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
    PFERR_PRESENT,
    PFERR_RSVD,
    PTE_A,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    WalkResult,
    walk,
)
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_MODE_32,
    UC_MODE_64,
    Uc,
)
from unicorn import x86_const as x

MAXPHYADDR = 40
N_CASES_64 = 40000
N_CASES_32 = 20000
CR0_PE_ET = 0x11
RAM = 2 << 30
GiB = 1 << 30

# Physical layout. System pages are identity-mapped at the same GVA.
ROOT = 0x1000
SYS_TABLES = (0x2000, 0x3000, 0x4000, 0x5000)  # PML4 (LA57 only), PDPT, PD, PT
KCODE, GDT, STACK, UCODE = 0x6000, 0x7000, 0x8000, 0x9000
TABLE_POOL = 0x100000
DATA_4K = 0x1000000  # 4 KiB frames: [16 MiB, 24 MiB)
DATA_2M = 0x2000000  # 2/4 MiB frames: [32 MiB, 64 MiB)
DATA_1G = GiB  # the one 1 GiB frame, also the fetch guard page
IRET_FRAME = STACK + 0x100

# Code: wrpkru prelude at +0, iret stub at +0x20, access stubs at +0x40/0x50/0x60.
PRELUDE_64 = bytes.fromhex("4489c031c931d20f01ef41ffe2")  # mov eax,r8d; wrpkru; jmp r10
IRET_64 = bytes.fromhex("4c89dc48cf")  # mov rsp,r11; iretq
STUBS_64 = {"read": "488b03f4", "write": "488903f4", "fetch": "ffe3"}
IRET_32 = bytes.fromhex("89f4cf")  # mov esp,esi; iretd
STUBS_32 = {"read": "8b03f4", "write": "8903f4", "fetch": "ffe3"}
STUB_OFF = {"read": 0x40, "write": 0x50, "fetch": 0x60}
GDT_64 = (0, 0x00209A0000000000, 0x0000920000000000, 0x0020FA0000000000, 0x0000F20000000000)
GDT_32 = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFFA000000FFFF, 0x00CFF2000000FFFF)
USER_CS, USER_SS = 0x1B, 0x23


@dataclass
class Case:
    """One random setup: control state, memory contents and the access."""

    bits: int  # 64 (long mode) or 32 (legacy)
    cr0: int
    cr4: int
    efer: int
    cpl: int
    ac: bool
    pkru: int
    access: str
    gva: int
    mem: dict[int, int] = field(default_factory=dict)  # entry address -> value
    path: list[int] = field(default_factory=list)  # target-path entry addresses
    esize: int = 8

    def walk(self, read_phys: object) -> WalkResult:
        return walk(
            read_phys,  # type: ignore[arg-type]
            cr0=self.cr0,
            cr3=ROOT,
            cr4=self.cr4,
            efer=self.efer,
            cpl=self.cpl,
            access=self.access,  # type: ignore[arg-type]
            gva=self.gva,
            rflags_ac=self.ac,
            pkru=self.pkru,
            maxphyaddr=MAXPHYADDR,
        )


@dataclass
class Observed:
    vector: int | None
    error_code: int
    gpa: int | None
    cr2: int
    memory: dict[int, int]


class Machine:
    """One unicorn instance reused for every case of one width (64 or 32)."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64 if bits == 64 else UC_MODE_32)
        self.uc.ctl_set_cpu_model(x.UC_CPU_X86_ICELAKE_SERVER)
        self.uc.mem_map(0, RAM)
        self.events: list[int] = []
        self.last_data: int | None = None
        self.uc.hook_add(UC_HOOK_INTR, self._intr)
        self.uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._mem)
        stubs = STUBS_64 if bits == 64 else STUBS_32
        self.uc.mem_write(KCODE, PRELUDE_64 if bits == 64 else b"")
        self.uc.mem_write(KCODE + 0x20, IRET_64 if bits == 64 else IRET_32)
        for base in (KCODE, UCODE):
            for acc, code in stubs.items():
                self.uc.mem_write(base + STUB_OFF[acc], bytes.fromhex(code))
        for i, desc in enumerate(GDT_64 if bits == 64 else GDT_32):
            self.uc.mem_write(GDT + 8 * i, struct.pack("<Q", desc))
        self.uc.reg_write(x.UC_X86_REG_GDTR, (0, GDT, 8 * 5 - 1, 0))
        if bits == 32:
            # SS must match CPL 0; DS/ES are DPL 3 so IRETD to CPL 3 keeps them.
            for reg, sel in (
                (x.UC_X86_REG_SS, 0x10),
                (x.UC_X86_REG_DS, 0x23),
                (x.UC_X86_REG_ES, 0x23),
            ):
                self.uc.reg_write(reg, sel)
        self.ctx0 = self.uc.context_save()
        self.err_offset = -1
        self.written: set[int] = set()
        self.loaded: Case | None = None

    def _intr(self, uc: Uc, intno: int, _data: object) -> None:
        self.events.append(intno)
        uc.emu_stop()

    def _mem(self, _uc: Uc, _type: int, addr: int, _size: int, _v: int, _d: object) -> None:
        self.last_data = addr

    def read_phys(self, addr: int) -> int:
        value: int = struct.unpack("<Q", self.uc.mem_read(addr, 8))[0]
        return value

    def load(self, case: Case) -> None:
        """Write the case's entries, zeroing those the previous case wrote."""
        if self.loaded is case:
            return
        self.loaded = case
        for addr in self.written:
            self.uc.mem_write(addr, bytes(case.esize))
        self.written = set(case.mem)
        fmt = "<Q" if case.esize == 8 else "<I"
        for addr, val in case.mem.items():
            self.uc.mem_write(addr, struct.pack(fmt, val))

    def run(self, case: Case) -> tuple[Observed, bytes]:
        uc = self.uc
        self.load(case)
        uc.context_restore(self.ctx0)
        uc.reg_write(x.UC_X86_REG_CR4, case.cr4)
        uc.reg_write(x.UC_X86_REG_MSR, (0xC0000080, case.efer))
        uc.reg_write(x.UC_X86_REG_CR0, case.cr0 | CR0_PE_ET)
        uc.reg_write(x.UC_X86_REG_CR3, ROOT)
        rflags = 0x2 | (1 << 18 if case.ac else 0)
        uc.reg_write(x.UC_X86_REG_EFLAGS, rflags)
        off = STUB_OFF[case.access]
        r = (
            (x.UC_X86_REG_RAX, x.UC_X86_REG_RBX)
            if self.bits == 64
            else (
                x.UC_X86_REG_EAX,
                x.UC_X86_REG_EBX,
            )
        )
        uc.reg_write(r[0], 0)
        uc.reg_write(r[1], case.gva)
        stub = (UCODE if case.cpl == 3 else KCODE) + off
        until = case.gva if case.access == "fetch" else stub + (3 if self.bits == 64 else 2)
        nxt = stub
        if case.cpl == 3:
            nxt = KCODE + 0x20
            width, fmt = (8, "<Q") if self.bits == 64 else (4, "<I")
            frame = (stub, USER_CS, rflags, STACK + 0xF00, USER_SS)
            for i, v in enumerate(frame):
                uc.mem_write(IRET_FRAME + width * i, struct.pack(fmt, v))
            uc.reg_write(x.UC_X86_REG_R11 if self.bits == 64 else x.UC_X86_REG_ESI, IRET_FRAME)
        start = nxt
        if case.cr4 & CR4_PKE and self.bits == 64:
            uc.reg_write(x.UC_X86_REG_R8, case.pkru)
            start = KCODE
        if self.bits == 64:
            uc.reg_write(x.UC_X86_REG_R10, nxt)
        self.events.clear()
        self.last_data = None
        uc.emu_start(start, until, count=64)
        raw = bytes(uc.context_save())
        rip = uc.reg_read(x.UC_X86_REG_RIP if self.bits == 64 else x.UC_X86_REG_EIP)
        memory = {a: self._read_entry(a, case.esize) for a in case.path}
        cr2 = uc.reg_read(x.UC_X86_REG_CR2)
        if not self.events:
            assert rip == until, f"stopped at {rip:#x}, expected {until:#x}"
            gpa = self.last_data if case.access != "fetch" else None
            return Observed(None, 0, gpa, cr2, memory), raw
        assert len(self.events) == 1 and self.events[0] in (13, 14), self.events
        code = struct.unpack_from("<i", raw, self.err_offset)[0] if self.err_offset >= 0 else -1
        return Observed(self.events[0], code, None, cr2, memory), raw

    def _read_entry(self, addr: int, esize: int) -> int:
        value: int = int.from_bytes(self.uc.mem_read(addr, esize), "little")
        return value


# --------------------------------------------------------------------------
# Case generation


class _Builder:
    """Builds the system mapping and a target path for one case."""

    def __init__(self, rng: random.Random, bits: int, mode: str) -> None:
        self.rng = rng
        self.bits = bits
        self.mode = mode  # "4-level" | "5-level" | "pae" | "32-bit"
        self.mem: dict[int, int] = {}
        self.next_table = TABLE_POOL
        self.esize = 4 if mode == "32-bit" else 8

    def alloc(self) -> int:
        addr = self.next_table
        self.next_table += 0x1000
        return addr

    def geometry(self) -> list[tuple[int, int, int]]:
        """(level, shift, index bits) from the top."""
        if self.mode == "5-level":
            return [(5, 48, 9), (4, 39, 9), (3, 30, 9), (2, 21, 9), (1, 12, 9)]
        if self.mode == "4-level":
            return [(4, 39, 9), (3, 30, 9), (2, 21, 9), (1, 12, 9)]
        if self.mode == "pae":
            return [(3, 30, 2), (2, 21, 9), (1, 12, 9)]
        return [(2, 22, 10), (1, 12, 10)]

    def entry_addr(self, table: int, level_shift: int, bits: int, gva: int) -> int:
        return table + ((gva >> level_shift) & ((1 << bits) - 1)) * self.esize

    def map_system(self, cpl: int) -> None:
        """Identity-map the code, GDT and stack pages through index 0 everywhere."""
        geo = self.geometry()
        table = ROOT
        tables = iter(SYS_TABLES if self.mode == "5-level" else SYS_TABLES[1:])
        for level, shift, bits in geo[:-1]:
            nxt = next(tables)
            flags = PTE_P if (self.mode == "pae" and level == 3) else PTE_P | PTE_RW | PTE_US
            self.mem[self.entry_addr(table, shift, bits, 0)] = nxt | flags
            table = nxt
        for page, us in ((KCODE, 0), (GDT, 0), (STACK, 0), (UCODE, PTE_US if cpl == 3 else 0)):
            self.mem[table + (page >> 12) * self.esize] = page | PTE_P | PTE_RW | us


def _random_flags(rng: random.Random) -> int:
    flags = PTE_P if rng.random() < 0.93 else 0
    for bit, p in ((PTE_RW, 0.75), (PTE_US, 0.75), (1 << 3, 0.3), (1 << 4, 0.3), (PTE_A, 0.3)):
        if rng.random() < p:
            flags |= bit
    for bit in (6, 8, 9, 10, 11):  # D, G, AVL
        if rng.random() < 0.25:
            flags |= 1 << bit
    return flags


def _reserved_choice(rng: random.Random, level: int, leaf: bool, b: _Builder) -> int:
    """Sometimes set one reserved (or architecturally ignored) bit."""
    roll = rng.random()
    if roll < 0.06:
        if b.mode == "32-bit":
            # Only bit 21 of a 4 MiB PDE is reserved at MAXPHYADDR 40; bits
            # 20:13 would put the page above unicorn's RAM (PSE-36 is covered
            # by hand-built tests).
            return 1 << 21 if leaf and level == 2 else 0
        hi = 51 if b.mode in ("4-level", "5-level") else 62
        return 1 << rng.randrange(MAXPHYADDR, hi + 1)
    if roll < 0.10 and leaf and level > 1 and b.mode != "32-bit":
        top = 29 if level == 3 else (21 if b.mode == "32-bit" else 20)
        return 1 << rng.randrange(13, top + 1)
    if roll < 0.16 and b.mode in ("4-level", "5-level"):
        return 1 << rng.randrange(52, 59)  # ignored
    return 0


def _leaf_frame(rng: random.Random, level: int, b: _Builder) -> int:
    if level == 1:
        return DATA_4K + rng.randrange(0x7FF) * 0x1000
    if level == 3:
        return DATA_1G | (rng.getrandbits(1) << 12)  # bit 12 is PAT
    size = 0x400000 if b.mode == "32-bit" else 0x200000
    frame = DATA_2M + rng.randrange((0x2000000) // size) * size
    return frame | (rng.getrandbits(1) << 12)


def _build_path(b: _Builder, gva: int, nxe: bool, pse: bool) -> list[int]:
    """Random entries along gva's walk; returns the entry addresses."""
    rng = b.rng
    path: list[int] = []
    table = ROOT
    long_mode = b.mode in ("4-level", "5-level")
    for level, shift, bits in b.geometry():
        addr = b.entry_addr(table, shift, bits, gva)
        path.append(addr)
        if b.mode == "pae" and level == 3:
            entry = PTE_P if rng.random() < 0.95 else 0
            entry |= rng.choice((0, 1 << 3, 1 << 4))
            if rng.random() < 0.05:
                entry |= 1 << rng.randrange(MAXPHYADDR, 64)
            nxt = b.alloc()
            b.mem[addr] = entry | nxt
            if not entry & PTE_P:
                return path
            table = nxt
            continue
        entry = _random_flags(rng)
        if b.mode != "32-bit" and rng.random() < (0.15 if nxe else 0.04):
            entry |= PTE_NX
        can_ps = (long_mode and level in (2, 3)) or (b.mode == "pae" and level == 2)
        can_ps = can_ps or (b.mode == "32-bit" and level == 2)
        ps_prob = 0.3 if can_ps else (0.03 if long_mode and level >= 4 else 0.0)
        if level > 1 and rng.random() < ps_prob:
            entry |= PTE_PS
        leaf = level == 1 or (bool(entry & PTE_PS) and can_ps and (b.mode != "32-bit" or pse))
        if long_mode and leaf:
            entry |= rng.getrandbits(4) << 59  # protection key
        if level == 1 and rng.random() < 0.3:
            entry |= 1 << 7  # PAT
        entry |= _reserved_choice(rng, level, leaf, b)
        if leaf:
            entry |= _leaf_frame(rng, level, b)
            b.mem[addr] = entry
            return path
        nxt = b.alloc()
        b.mem[addr] = entry | nxt
        if not entry & PTE_P:
            return path
        table = nxt
    return path


def _random_gva(rng: random.Random, mode: str, fetch: bool) -> int:
    if mode in ("pae", "32-bit"):
        # Avoid the system mapping (index 0 of every level near address 0).
        top_shift = 30 if mode == "pae" else 22
        top = rng.randrange(1, 4) if mode == "pae" else rng.randrange(1, 1024)
        low = 0 if fetch else rng.getrandbits(top_shift) & ~3
        return (top << top_shift) | low
    shift = 48 if mode == "5-level" else 39
    idx = rng.randrange(2, 512)
    if fetch and idx == 256:
        idx = 257  # GVA-1 would be non-canonical (see the module docstring)
    low = 0 if fetch else rng.getrandbits(shift) & ~7
    gva = (idx << shift) | low
    if idx >= 256:
        gva |= ((1 << 64) - 1) & ~((1 << (shift + 9)) - 1)
    if rng.random() < 0.03:
        gva ^= 1 << rng.randrange(shift + 9, 63)  # non-canonical
    return gva


GUARD_PAGE = DATA_4K + 0x7FF000


def _map_guard(b: _Builder, gva: int, cpl: int) -> None:
    """Map gva-1 (another top-level slot) to a readable 4 KiB guard page."""
    prev = (gva - 1) & ((1 << 64) - 1)
    table = ROOT
    for level, shift, bits in b.geometry():
        addr = b.entry_addr(table, shift, bits, prev)
        if level == 1:
            us = PTE_US if cpl == 3 else 0
            key = 15 << 59 if b.mode in ("4-level", "5-level") else 0
            b.mem[addr] = GUARD_PAGE | PTE_P | PTE_RW | us | key
            return
        if addr in b.mem:  # shared with the system mapping: follow it
            table = b.mem[addr] & 0xFFFFF000
            continue
        nxt = b.alloc()
        flags = PTE_P if (b.mode == "pae" and level == 3) else PTE_P | PTE_RW | PTE_US
        b.mem[addr] = nxt | flags
        table = nxt


def random_case(rng: random.Random, bits: int) -> Case:
    if bits == 64:
        mode = "5-level" if rng.random() < 0.3 else "4-level"
    else:
        mode = "pae" if rng.random() < 0.6 else "32-bit"
    access = rng.choice(("read", "write", "fetch"))
    cpl = rng.choice((0, 3))
    nxe = mode != "32-bit" and rng.random() < 0.7
    cr4 = 0
    for bit, p in ((CR4_SMEP, 0.4), (CR4_SMAP, 0.4), (CR4_PKE, 0.4), (CR4_PSE, 0.7)):
        if rng.random() < p:
            cr4 |= bit
    if mode != "32-bit":
        cr4 |= CR4_PAE
    if mode == "5-level":
        cr4 |= CR4_LA57
    efer = (EFER_NXE if nxe else 0) | (EFER_LME | EFER_LMA if bits == 64 else 0)
    cr0 = CR0_PG | (CR0_WP if rng.random() < 0.5 else 0)
    pkru = 0 if rng.random() < 0.4 else rng.getrandbits(32)
    gva = _random_gva(rng, mode, access == "fetch")
    b = _Builder(rng, bits, mode)
    b.map_system(cpl)
    path = _build_path(b, gva, nxe, bool(cr4 & CR4_PSE))
    if access == "fetch":
        pkru &= ~(1 << 30)  # the guard page has key 15: keep it readable
        _map_guard(b, gva, cpl)
    return Case(
        bits, cr0, cr4, efer, cpl, rng.random() < 0.4, pkru, access, gva, b.mem, path, b.esize
    )


# --------------------------------------------------------------------------
# Expected memory after the access


def _qemu_fault_a_bits(case: Case, res: WalkResult) -> dict[int, int]:
    """A bits QEMU 5.0 leaves behind on a faulting walk (see module docstring)."""
    out: dict[int, int] = {}
    if not res.entries:
        return out
    pae_pdpte = case.bits == 32 and bool(case.cr4 & CR4_PAE)
    for level, addr, val in res.entries[:-1]:
        if pae_pdpte and level == 3:
            continue  # PAE PDPTEs have no A bit
        out[addr] = val | PTE_A
    level, addr, val = res.entries[-1]
    # QEMU sets A in a PDPTE right after its present and MAXPHYADDR/XD checks,
    # before it looks at PS: a 1 GiB leaf keeps A even when the access then
    # fails on the 1 GiB reserved bits (29:13) or on permissions.
    base_rsvd = ((1 << 52) - (1 << MAXPHYADDR)) | (0 if case.efer & EFER_NXE else PTE_NX)
    if case.bits == 64 and level == 3 and val & PTE_PS and val & PTE_P and not val & base_rsvd:
        out[addr] = val | PTE_A
    return out


def _expected_memory(case: Case, res: WalkResult) -> dict[int, int]:
    changes = _qemu_fault_a_bits(case, res) if res.fault else res.ad_writes
    return {a: changes.get(a, case.mem[a]) for a in case.path}


def _check(machine: Machine, case: Case) -> WalkResult:
    machine.load(case)
    res = case.walk(machine.read_phys)
    obs, _ = machine.run(case)
    ctx = f"case={case!r}\nwalker={res!r}\nobserved={obs!r}"  # full detail on failure
    assert obs.vector == res.vector, ctx
    assert obs.error_code == res.error_code, ctx
    if obs.vector == 14:
        assert obs.cr2 == case.gva & ((1 << case.bits) - 1), ctx
    if not res.fault and case.access != "fetch":
        assert obs.gpa == res.gpa, ctx
    assert obs.memory == _expected_memory(case, res), ctx
    return res


# --------------------------------------------------------------------------
# Calibration: where unicorn keeps the #PF error code


def _hand_case(bits: int, mode: str, cpl: int, access: str, leaf_flags: int, **kw: int) -> Case:
    """A case whose one 4 KiB leaf has leaf_flags; every upper entry is P|RW|US."""
    b = _Builder(random.Random(0), bits, mode)
    b.map_system(cpl)
    gva = (2 << 39) | 0x5008 if bits == 64 else (1 << 30) | 0x5008
    if access == "fetch":
        gva = 2 << 39 if bits == 64 else 1 << 30
    table = ROOT
    path = []
    for level, shift, nbits in b.geometry():
        addr = b.entry_addr(table, shift, nbits, gva)
        path.append(addr)
        if level == 1:
            b.mem[addr] = DATA_4K | leaf_flags
            break
        nxt = b.alloc()
        b.mem[addr] = nxt | (PTE_P if mode == "pae" and level == 3 else PTE_P | PTE_RW | PTE_US)
        table = nxt
    if access == "fetch":
        _map_guard(b, gva, cpl)
    cr4 = kw.get("cr4", CR4_PAE if bits == 64 else 0)
    efer = kw.get("efer", (EFER_LME | EFER_LMA) if bits == 64 else 0)
    return Case(
        bits,
        CR0_PG | CR0_WP,
        cr4,
        efer,
        cpl,
        False,
        kw.get("pkru", 0),
        access,
        gva,
        b.mem,
        path,
        b.esize,
    )


def _calibrate(machine: Machine) -> int:
    """Find the error-code offset in the saved context from SDM-known cases."""
    nx = EFER_LME | EFER_LMA | EFER_NXE
    if machine.bits == 64:
        mode = "4-level"
        known = [
            (_hand_case(64, mode, 0, "read", 0), 0x00),  # not present
            (_hand_case(64, mode, 3, "write", 0), 0x06),  # not present, W|U
            (_hand_case(64, mode, 3, "read", PTE_P | PTE_US | (1 << 45)), 0x0D),  # RSVD|U|P
            (_hand_case(64, mode, 3, "write", PTE_P | PTE_US), 0x07),  # read-only
            (_hand_case(64, mode, 0, "fetch", PTE_P | PTE_NX, efer=nx), 0x11),  # NX: I|P
            (
                _hand_case(64, mode, 3, "read", PTE_P | PTE_US, cr4=CR4_PAE | CR4_PKE, pkru=1),
                0x25,
            ),  # PKRU.AD0: PK|U|P
        ]
    else:
        known = [
            (_hand_case(32, "32-bit", 0, "read", 0), 0x00),
            (_hand_case(32, "32-bit", 3, "write", 0), 0x06),
            (_hand_case(32, "32-bit", 3, "write", PTE_P | PTE_US), 0x07),
            (_hand_case(32, "pae", 3, "read", PTE_P | PTE_US | (1 << 45), cr4=CR4_PAE), 0x0D),
            (_hand_case(32, "pae", 3, "fetch", PTE_P, cr4=CR4_PAE), 0x05),
        ]
    candidates: set[int] | None = None
    for case, code in known:
        obs, raw = machine.run(case)
        assert obs.vector == 14, (case, obs)
        offs = {o for o in range(0, len(raw) - 3, 4) if struct.unpack_from("<i", raw, o)[0] == code}
        candidates = offs if candidates is None else candidates & offs
    assert candidates is not None and len(candidates) == 1, candidates
    return candidates.pop()


@pytest.fixture(scope="module", params=[64, 32], ids=["long", "legacy"])
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    m = Machine(request.param)
    m.err_offset = _calibrate(m)
    yield m


def test_calibrated_error_code_offset_is_unique(machine: Machine) -> None:
    assert machine.err_offset >= 0


def test_differential_random_walks(machine: Machine) -> None:
    """Thousands of random walks agree with QEMU on every observable."""
    rng = random.Random(0x6B766D6D75 + machine.bits)
    n = N_CASES_64 if machine.bits == 64 else N_CASES_32
    outcomes: dict[str, int] = {}
    for _ in range(n):
        case = random_case(rng, machine.bits)
        res = _check(machine, case)
        key = "ok" if not res.fault else f"v{res.vector}/e{res.error_code:#x}"
        outcomes[key] = outcomes.get(key, 0) + 1
    # The mix must exercise successes, #GP (long mode) and every #PF class.
    assert outcomes.get("ok", 0) > n // 10, outcomes
    codes = {int(k.split("/e")[1], 16) for k in outcomes if k.startswith("v14")}
    assert any(c & PFERR_RSVD for c in codes), outcomes
    assert any(not c & PFERR_PRESENT for c in codes), outcomes
    assert any(c & 0x10 for c in codes), outcomes
    if machine.bits == 64:
        assert any(c & 0x20 for c in codes), outcomes
        assert outcomes.get("v13/e0x0", 0) > 0, outcomes
