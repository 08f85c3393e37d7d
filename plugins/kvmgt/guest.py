"""A guest-side helper: the guest i915 driver building gen8+ PPGTTs in guest RAM.

Tables are pages of guest memory. Every entry write goes through a vCPU
(``vcpu.access(gpa, "write", 4 or 8, data)`` with paging off, so gva == gpa),
so a write to a write-tracked table page is emulated by KVM and delivered to
the page-track notifiers, exactly as a guest CPU store would be
(spec/consumers.md §1.1). New table pages are zeroed before they are linked,
as i915 does when it allocates a page directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE
from kvmmu.plugins.kvmgt import gtt

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu
    from kvmmu.vm import VM

__all__ = ["DEFAULT_LEAF", "DEFAULT_PTR", "GuestPpgtt", "Width"]

#: i915's usual bits: PRESENT | RW for pointers and (cached) leaves.
DEFAULT_PTR = gtt.GEN8_PAGE_PRESENT | gtt.GEN8_PAGE_RW
DEFAULT_LEAF = gtt.GEN8_PAGE_PRESENT | gtt.GEN8_PAGE_RW
Width = Literal["8", "lo", "hi", "4+4", "hi+lo"]
_LEVEL_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}  # PML4, PDP, PD, PT


class GuestPpgtt:
    """One guest 4-level (or 3-level) PPGTT whose tables live in ``[pool_start, pool_end)``.

    ``pdps`` are the root pointers the guest hands to GVT
    (``g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, pdps)``).
    """

    def __init__(
        self,
        vm: VM,
        pool_start: int,
        pool_end: int,
        *,
        vcpu: VCpu | None = None,
        l3: bool = False,
    ) -> None:
        if pool_start % PAGE_SIZE or pool_end % PAGE_SIZE or pool_start >= pool_end:
            raise ValueError(
                f"table pool [{pool_start:#x}, {pool_end:#x}) must be non-empty and 4 KiB aligned"
            )
        if pool_end > 1 << 32:
            raise ValueError("table pool must lie below 4 GiB (the vCPU runs with paging off)")
        self.vm = vm
        self.vcpu = vcpu if vcpu is not None else vm.vcpus[0]
        self._next = pool_start
        self._end = pool_end
        self.l3 = l3
        self.writes = 0
        if l3:
            self.pdps = [self.alloc_table() for _ in range(4)]
        else:
            self.pdps = [self.alloc_table(), 0, 0, 0]

    # ------------------------------------------------------------- memory
    def alloc_table(self) -> int:
        """A fresh zeroed table page (its gpa)."""
        if self._next >= self._end:
            raise MemoryError(f"guest table pool exhausted at {self._end:#x}")
        gpa = self._next
        self._next += PAGE_SIZE
        self.vm.write_guest(gpa, bytes(PAGE_SIZE))
        return gpa

    def read_entry(self, table: int, index: int) -> int:
        """The 8-byte entry ``index`` of the table at gpa ``table``."""
        return int.from_bytes(self.vm.read_guest(table + index * 8, 8), "little")

    def write_entry(self, table: int, index: int, value: int, width: Width = "8") -> None:
        """Store an entry with one 8-byte write, or 4-byte halves in the given order."""
        if not 0 <= index < 512:
            raise ValueError(f"entry index must be 0..511, got {index}")
        if not 0 <= value < 1 << 64:
            raise ValueError(f"entry value must be a u64, got {value:#x}")
        gpa = table + index * 8
        raw = value.to_bytes(8, "little")
        parts = {
            "8": [(0, 8)],
            "lo": [(0, 4)],
            "hi": [(4, 4)],
            "4+4": [(0, 4), (4, 4)],
            "hi+lo": [(4, 4), (0, 4)],
        }.get(width)
        if parts is None:
            raise ValueError(f"width must be one of '8', 'lo', 'hi', '4+4', 'hi+lo'; got {width!r}")
        for off, n in parts:
            r = self.vcpu.access(gpa + off, "write", n, raw[off : off + n])
            if r.fault is not None:
                raise RuntimeError(f"guest write to {gpa + off:#x} faulted: {r.fault}")
            self.writes += 1

    # -------------------------------------------------------------- walks
    def table_of(self, gma: int, level: int, *, create: bool = True, ips: bool = False) -> int:
        """The gpa of the level-``level`` table covering ``gma`` (4 = PML4 .. 1 = PT).

        Missing tables are allocated and linked with 8-byte writes when
        ``create``; ``ips`` sets ``GEN8_PDE_IPS_64K`` in a newly linked PDE.
        """
        top = 3 if self.l3 else 4
        if not 1 <= level <= top:
            raise ValueError(f"level must be 1..{top}, got {level}")
        if self.l3:
            table = self.pdps[gma >> 30 & 3]
            cur = 2
        else:
            table = self.pdps[0]
            cur = 4
        while cur > level:
            idx = gma >> _LEVEL_SHIFT[cur] & 0x1FF
            e = self.read_entry(table, idx)
            if not e & gtt.GEN8_PAGE_PRESENT or e & gtt.PAGE_PSE:
                if not create:
                    raise LookupError(f"gma {gma:#x}: no table below level {cur}")
                child = self.alloc_table()
                flags = DEFAULT_PTR | (gtt.GEN8_PDE_IPS_64K if ips and cur == 2 else 0)
                self.write_entry(table, idx, child | flags)
                e = child | flags
            table = e & gtt.ADDR_4K_MASK
            cur -= 1
        return table

    def entry_addr(self, gma: int, level: int) -> tuple[int, int]:
        """``(table gpa, index)`` of the level-``level`` entry for ``gma`` (tables must exist)."""
        return self.table_of(gma, level, create=False), gma >> _LEVEL_SHIFT[level] & 0x1FF

    # ------------------------------------------------------------ mapping
    def map_4k(self, gma: int, gpa: int, flags: int = DEFAULT_LEAF, width: Width = "8") -> None:
        """Map a 4 KiB page."""
        self._aligned(gma, gpa, PAGE_SIZE)
        pt = self.table_of(gma, 1)
        self.write_entry(pt, gma >> 12 & 0x1FF, gpa | flags, width)

    def map_64k(self, gma: int, gpa: int, flags: int = DEFAULT_LEAF, width: Width = "8") -> None:
        """Map a 64 KiB page: slot ``16*k`` of a PT whose PDE has IPS."""
        self._aligned(gma, gpa, 64 << 10)
        pt = self.table_of(gma, 1, ips=True)
        self.write_entry(pt, gma >> 12 & 0x1FF, gpa | flags, width)

    def map_2m(self, gma: int, gpa: int, flags: int = DEFAULT_LEAF, width: Width = "8") -> None:
        """Map a 2 MiB page with PS in the PDE (PAT, if wanted, in bit 12 of ``flags``)."""
        self._aligned(gma, gpa, 2 << 20)
        pd = self.table_of(gma, 2)
        self.write_entry(pd, gma >> 21 & 0x1FF, gpa | flags | gtt.PAGE_PSE, width)

    def map_1g(self, gma: int, gpa: int, flags: int = DEFAULT_LEAF) -> None:
        """Map a 1 GiB page with PS in the PDPE (GVT refuses it, W10)."""
        self._aligned(gma, gpa, 1 << 30)
        if self.l3:
            raise ValueError("an L3 PPGTT has no PDP table the guest writes")
        pdp = self.table_of(gma, 3)
        self.write_entry(pdp, gma >> 30 & 0x1FF, gpa | flags | gtt.PAGE_PSE)

    def unmap(self, gma: int, level: int = 1, width: Width = "8") -> None:
        """Clear the level-``level`` entry for ``gma``."""
        table, idx = self.entry_addr(gma, level)
        self.write_entry(table, idx, 0, width)

    def translate(self, gma: int) -> int | None:
        """The guest's own walk: gpa for ``gma`` or None (what the GPU should reach)."""
        if self.l3:
            table, cur = self.pdps[gma >> 30 & 3], 2
        else:
            table, cur = self.pdps[0], 4
        ips = False
        while True:
            idx = gma >> _LEVEL_SHIFT[cur] & 0x1FF
            if cur == 1 and ips:
                idx &= ~0xF
            e = self.read_entry(table, idx)
            if not e & gtt.GEN8_PAGE_PRESENT:
                return None
            if cur == 1:
                size = (64 << 10) if ips else PAGE_SIZE
                return (e & gtt.ADDR_4K_MASK & ~(size - 1)) | (gma & (size - 1))
            if cur in (2, 3) and e & gtt.PAGE_PSE:
                size = 1 << _LEVEL_SHIFT[cur]
                return (e & gtt.ADDR_4K_MASK & ~(size - 1)) | (gma & (size - 1))
            ips = cur == 2 and bool(e & gtt.GEN8_PDE_IPS_64K)
            table = e & gtt.ADDR_4K_MASK
            cur -= 1

    @staticmethod
    def _aligned(gma: int, gpa: int, size: int) -> None:
        if gma % size or gpa % size:
            raise ValueError(f"gma {gma:#x} and gpa {gpa:#x} must both be {size >> 10} KiB aligned")
        if gpa >> PAGE_SHIFT >= 1 << (gtt.GTT_HAW - PAGE_SHIFT):
            raise ValueError(f"gpa {gpa:#x} exceeds the {gtt.GTT_HAW}-bit GTT address width")
