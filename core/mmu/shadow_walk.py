"""The shadow MMU's guest walk: ``FNAME(walk_addr_generic)`` as a ``guest_walker``.

The architectural walk is :func:`kvmmu.paging.walk`; this module turns its
result into KVM's ``struct guest_walker`` (``arch/x86/kvm/mmu/paging_tmpl.h``;
spec/kvm-mmu.md §3.7): per level the table gfn, the gPTE's address and
value, and the access accumulated above it (``pt_access``), the leaf's
``pte_access`` after ``protect_clean_gpte``, and the A/D updates, which are
written into guest memory as ``update_accessed_dirty_bits`` does (a cmpxchg
through the host mapping: no page-track notification) with ``ptes[]``
updated to the values written, so ``gpte_changed`` compares against them.

``paging_tmpl.h`` is compiled as ``paging64`` (4-/5-level and PAE, 8-byte
gPTEs) and ``paging32`` (2 levels, 4-byte gPTEs, PSE/PSE-36 4 MiB pages):
:attr:`GuestWalker.pte_size` says which. A PAE walk starts from the PDPTE
``load_pdptrs`` cached at CR3 load (``mmu->get_pdptr``), not from memory, and
records levels 2 and 1 only (``walker->max_level`` = 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmmu import paging
from kvmmu.errors import GuestFault
from kvmmu.spte import ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu

__all__ = [
    "GPTE_ADDR_MASK",
    "GuestWalker",
    "gpte_access",
    "gpte_to_gfn",
    "protect_clean_gpte",
    "walk_addr",
]

#: ``PT64_BASE_ADDR_MASK``: bits 51:12 of a 64-bit gPTE.
GPTE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF


def gpte_access(gpte: int, nx_enabled: bool) -> int:
    """``FNAME(gpte_access)`` for 64-bit gPTEs (spec/kvm-mmu.md §3.7).

    ``access = gpte & (W|U|P)`` then ``access ^= gpte >> 63``: P with NX
    clear becomes ``ACC_EXEC_MASK``. With EFER.NXE=0 bit 63 is reserved, so
    a valid gPTE is always executable.
    """
    access = ACC_EXEC_MASK | (gpte & (ACC_WRITE_MASK | ACC_USER_MASK))
    if nx_enabled and gpte & paging.PTE_NX:
        access &= ~ACC_EXEC_MASK
    return access


def protect_clean_gpte(access: int, gpte: int) -> int:
    """``FNAME(protect_clean_gpte)``: no W unless the gPTE's D bit is set (§3.7)."""
    if not gpte & paging.PTE_D:
        access &= ~ACC_WRITE_MASK
    return access


def gpte_to_gfn(gpte: int, level: int = 1, four_byte: bool = False) -> int:
    """``gpte_to_gfn_lvl``: the frame a gPTE points to (aligned for a huge leaf).

    For a 32-bit (``paging32``) 4 MiB PDE the frame is bits 31:22 plus the
    PSE-36 bits 20:13 as address bits 39:32 (``pse36_gfn_delta``; the walker
    :func:`kvmmu.paging.walk` takes 8 of them, as AMD's PSE-40 does).
    """
    if four_byte and level > 1:
        return ((gpte & 0xFFC00000) >> 12) | (((gpte >> 13) & 0xFF) << 20)
    frame = gpte & GPTE_ADDR_MASK
    if level > 1:
        frame &= ~((1 << (12 + 9 * (level - 1))) - 1)
    return frame >> 12


@dataclass(slots=True)
class GuestWalker:
    """``struct guest_walker`` (paging_tmpl.h), indexed ``[level - 1]``.

    ``fault`` is the exception to inject when the walk failed. ``gpa`` is
    the translated address (offset included); ``gfn`` = ``gpa >> 12`` (for a
    huge leaf: the leaf frame plus the 4K index inside it, as KVM's
    ``walker->gfn``). ``gpat`` is the leaf's (PAT, PCD, PWT) index.
    """

    gva: int
    fault: GuestFault | None = None
    level: int = 0
    max_level: int = 0
    gfn: int = 0
    gpa: int = 0
    pte_access: int = ACC_ALL
    pt_access: list[int] = field(default_factory=lambda: [0] * 5)
    table_gfn: list[int] = field(default_factory=lambda: [0] * 5)
    pte_gpa: list[int] = field(default_factory=lambda: [0] * 5)
    ptes: list[int] = field(default_factory=lambda: [0] * 5)
    prefetch_ptes: list[int] = field(default_factory=lambda: [0] * 8)
    gpat: int = 0
    #: ``sizeof(pt_element_t)``: 4 for a 32-bit (non-PAE) guest.
    pte_size: int = 8


def walk_addr(
    vcpu: VCpu, gva: int, kind: paging.Access, cpl: int, pdptrs: list[int] | None = None
) -> GuestWalker:
    """``FNAME(walk_addr)`` over the vCPU's guest tables (spec/kvm-mmu.md §3.7).

    4-/5-level, PAE (``pdptrs``: the cached PDPTEs, ``get_pdptr``) and 32-bit
    paging. On success the A/D updates are written back, 4 bytes per entry
    for ``paging32``.
    """
    legacy = not vcpu.efer & paging.EFER_LMA
    pae = legacy and bool(vcpu.cr4 & paging.CR4_PAE)
    size = 8 if vcpu.cr4 & paging.CR4_PAE else 4
    vm = vcpu.vm
    pdpt = vcpu.cr3 & 0xFFFFFFE0

    def read(addr: int) -> int:
        if pae and pdptrs is not None and pdpt <= addr < pdpt + 32:
            return pdptrs[(addr - pdpt) >> 3]
        return int.from_bytes(vm.read_guest(addr, size), "little")

    w = paging.walk(
        read,
        cr0=vcpu.cr0,
        cr3=vcpu.cr3,
        cr4=vcpu.cr4,
        efer=vcpu.efer,
        cpl=cpl,
        access=kind,
        gva=gva,
        rflags_ac=vcpu.rflags_ac,
        pkru=vcpu.pkru,
        maxphyaddr=vcpu.vm.config.host_maxphyaddr,
    )
    gw = GuestWalker(gva, pte_size=size)
    if w.fault:
        gw.fault = GuestFault(w.vector or paging.PF_VECTOR, w.error_code, gva)
        return gw
    ad_writes: dict[int, int] = {}
    for addr, value in w.ad_writes.items():
        # update_accessed_dirty_bits skips a table whose host mapping is not
        # writable (walker->pte_writable: a read-only memslot; spec §3.7): the
        # walk still succeeds and the gPTE keeps its old value.
        slot = vm.memslots.gfn_to_memslot(addr >> 12)
        if slot is None or slot.is_readonly:
            continue
        vm.write_guest_kvm(addr, value.to_bytes(size, "little"))
        ad_writes[addr] = value
    nx = bool(vcpu.efer & paging.EFER_NXE)
    acc = ACC_ALL
    leaf = 0
    entries = w.entries[1:] if pae else w.entries
    gw.max_level = entries[0][0]
    for level, addr, value in entries:
        value = ad_writes.get(addr, value)
        gw.pt_access[level - 1] = acc
        gw.table_gfn[level - 1] = addr >> 12
        gw.pte_gpa[level - 1] = addr
        gw.ptes[level - 1] = value
        acc &= gpte_access(value, nx)
        leaf = value
    assert w.level is not None and w.gpa is not None
    gw.level = w.level
    gw.gpa = w.gpa
    gw.gfn = w.gpa >> 12
    if kind != "write":
        acc = protect_clean_gpte(acc, leaf)
    gw.pte_access = acc
    gw.gpat = (w.pat << 2) | (w.pcd << 1) | w.pwt
    return gw
