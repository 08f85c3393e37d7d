"""Guest-side page-table builder: writes x86-64 tables into guest memory.

Scenarios and tests use it the way a guest kernel would: tables live in a
region of guest RAM and are written as bytes (``vm.write_guest``); the
walker and the MMUs then read them from there. It builds 4-level (or
5-level) long-mode tables with 4K, 2M and 1G leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmu import paging

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = ["PAGE_SIZES", "GuestPageTables"]

PAGE_SIZES = {4096: 1, 2 << 20: 2, 1 << 30: 3}
_ADDR = 0x000F_FFFF_FFFF_F000


class GuestPageTables:
    """Long-mode page tables in guest memory at ``[base, base + size)``.

    ``cr3`` is the root table's gpa. Tables are handed out from the region
    in order; running out is an error naming the region.
    """

    def __init__(self, vm: VM, base: int, size: int, *, levels: int = 4) -> None:
        if base & 0xFFF or size & 0xFFF or size <= 0:
            raise ValueError(f"table region {base:#x}+{size:#x} must be 4K-aligned and non-empty")
        if levels not in (4, 5):
            raise ValueError(f"levels must be 4 or 5, got {levels}")
        self.vm = vm
        self.base = base
        self.end = base + size
        self.levels = levels
        self._next = base
        self.cr3 = self._alloc()

    def _alloc(self) -> int:
        if self._next >= self.end:
            raise ValueError(
                f"guest page-table region {self.base:#x}-{self.end:#x} is full; give it more room"
            )
        gpa = self._next
        self._next += 4096
        self.vm.write_guest(gpa, bytes(4096))
        return gpa

    def _read(self, addr: int) -> int:
        return int.from_bytes(self.vm.read_guest(addr, 8), "little")

    def entry_address(self, gva: int, level: int, *, create: bool = True) -> int:
        """The gpa of the entry for ``gva`` at ``level`` (1 = PTE), building tables."""
        table = self.cr3
        for lvl in range(self.levels, level, -1):
            addr = table + ((gva >> (12 + 9 * (lvl - 1))) & 0x1FF) * 8
            entry = self._read(addr)
            if not entry & paging.PTE_P:
                if not create:
                    raise KeyError(f"gva {gva:#x} has no level-{lvl - 1} table")
                child = self._alloc()
                entry = child | paging.PTE_P | paging.PTE_RW | paging.PTE_US
                self.vm.write_guest(addr, entry.to_bytes(8, "little"))
            elif entry & paging.PTE_PS:
                raise ValueError(f"gva {gva:#x} is inside a huge page at level {lvl}")
            table = entry & _ADDR
        return table + ((gva >> (12 + 9 * (level - 1))) & 0x1FF) * 8

    def leaf_value(
        self,
        gpa: int,
        level: int,
        *,
        writable: bool = True,
        user: bool = True,
        nx: bool = False,
        pat_index: int = 0,
    ) -> int:
        """The leaf entry mapping ``gpa`` with the given rights and PAT index."""
        v = gpa | paging.PTE_P
        if writable:
            v |= paging.PTE_RW
        if user:
            v |= paging.PTE_US
        if nx:
            v |= paging.PTE_NX
        if pat_index & 1:
            v |= paging.PTE_PWT
        if pat_index & 2:
            v |= paging.PTE_PCD
        if pat_index & 4:
            v |= paging.PTE_PAT if level == 1 else paging.PTE_PAT_HUGE
        if level > 1:
            v |= paging.PTE_PS
        return v

    def map(
        self,
        gva: int,
        gpa: int,
        size: int,
        *,
        page_size: int = 4096,
        writable: bool = True,
        user: bool = True,
        nx: bool = False,
        pat_index: int = 0,
    ) -> None:
        """Map ``[gva, gva + size)`` to ``gpa`` with pages of ``page_size``."""
        level = PAGE_SIZES.get(page_size)
        if level is None:
            raise ValueError(f"page_size must be one of {sorted(PAGE_SIZES)}, got {page_size}")
        if (gva | gpa | size) & (page_size - 1):
            raise ValueError(f"gva, gpa and size must be {page_size:#x}-aligned")
        # SDM Vol 3A §3.3.7.1: only canonical addresses translate. Writing the
        # entries of a non-canonical gva would map the canonical alias that
        # shares its table indexes instead, so refuse (both ends, same half).
        la57 = self.levels == 5
        last = gva + size - 1
        if (
            gva < 0
            or not paging.canonical(gva, la57)
            or not paging.canonical(last, la57)
            or (gva ^ last) >> 63
        ):
            raise ValueError(
                f"gva range {gva:#x}+{size:#x} is not canonical for {self.levels}-level paging"
            )
        # Table 4-20: a frame address is bits 51:12; anything above would land
        # in the ignored, protection-key or XD bits of the entry.
        if gpa < 0 or gpa + size > 1 << 52:
            raise ValueError(f"gpa range {gpa:#x}+{size:#x} does not fit in 52 physical bits")
        for off in range(0, size, page_size):
            addr = self.entry_address(gva + off, level)
            value = self.leaf_value(
                gpa + off, level, writable=writable, user=user, nx=nx, pat_index=pat_index
            )
            self.vm.write_guest(addr, value.to_bytes(8, "little"))

    def long_mode_sregs(self) -> dict[str, int]:
        """CR0/CR3/CR4/EFER for long mode with these tables (PAE, NXE, WP)."""
        cr4 = paging.CR4_PAE | (paging.CR4_LA57 if self.levels == 5 else 0)
        cr0 = paging.CR0_PG | paging.CR0_WP | 1 | (1 << 4)  # PG WP PE ET
        efer = paging.EFER_LME | paging.EFER_LMA | paging.EFER_NXE
        return {"cr0": cr0, "cr3": self.cr3, "cr4": cr4, "efer": efer}
