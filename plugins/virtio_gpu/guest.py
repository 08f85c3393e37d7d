"""A minimal Linux guest: 4-level page tables, the Linux PAT layout, BAR mappings.

The virtio-gpu guest driver maps a host-visible blob with
``io_remap_pfn_range`` over the BAR window, with ``pgprot_writecombine``
for ``VIRTIO_GPU_MAP_CACHE_WC``, ``pgprot_noncached`` for ``UNCACHED`` and a
cached protection otherwise (spec/consumers.md §3.1, [VGPU-VRAM]). This
module builds exactly those guest PTEs in guest memory, so the memory type
of every guest access comes from a real guest walk (PAT/PCD/PWT of the leaf,
SDM Table 11-11) through the model's MMU and the vendor's combination rule.

Linux programs ``IA32_PAT`` as WB, WC, UC-, UC, WB, WP, UC-, WT
(``arch/x86/mm/pat/memtype.c: pat_bp_init``); a protection selects the
first entry holding its type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmu.memtype import MSR_IA32_CR_PAT, MemType, make_pat

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu
    from kvmmu.vm import VM

__all__ = [
    "CR0_LONG_MODE",
    "LINUX_PAT",
    "MAP_CACHE_TO_MEMTYPE",
    "MSR_MTRR_DEF_TYPE",
    "LinuxGuest",
    "pte_cache_bits",
]

#: PA0..PA7 as Linux programs them (``pat_bp_init``).
LINUX_PAT: int = make_pat(
    MemType.WB,
    MemType.WC,
    MemType.UC_MINUS,
    MemType.UC,
    MemType.WB,
    MemType.WP,
    MemType.UC_MINUS,
    MemType.WT,
)

#: ``VIRTIO_GPU_MAP_CACHE_*`` -> the guest mapping type [VSPEC], [VGPU-VRAM]:
#: WC -> ``pgprot_writecombine``, UNCACHED -> ``pgprot_noncached`` (UC-),
#: CACHED and NONE -> cached (WB).
MAP_CACHE_TO_MEMTYPE: dict[str, MemType] = {
    "NONE": MemType.WB,
    "CACHED": MemType.WB,
    "UNCACHED": MemType.UC_MINUS,
    "WC": MemType.WC,
}

MSR_MTRR_DEF_TYPE = 0x2FF
_MTRR_DEF_TYPE_E = 1 << 11
#: PE | ET | PG; CD and NW clear (a running Linux guest).
CR0_LONG_MODE = (1 << 31) | (1 << 4) | 1
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8
_P, _RW, _PWT, _PCD, _PAT4K = 1, 2, 1 << 3, 1 << 4, 1 << 7
_ADDR = 0x000F_FFFF_FFFF_F000


def pte_cache_bits(pat_msr: int, memtype: MemType) -> int:
    """PAT/PCD/PWT bits of a 4K PTE that select the first ``pat_msr`` entry of ``memtype``.

    Entry index = 4*PAT + 2*PCD + PWT (SDM Table 11-11); the PAT bit is bit 7
    in a 4K PTE (SDM §11.12.3).
    """
    for i in range(8):
        if (pat_msr >> (8 * i)) & 7 == int(memtype):
            return (_PAT4K if i & 4 else 0) | (_PCD if i & 2 else 0) | (_PWT if i & 1 else 0)
    raise ValueError(f"PAT {pat_msr:#018x} has no {MemType(memtype).label} entry")


class LinuxGuest:
    """A 64-bit Linux-like guest on one vCPU, its page tables in guest RAM.

    ``pt_gpa``/``pt_size``: guest RAM (inside a RAM memslot) the page-table
    pages are taken from. The constructor programs the Linux PAT, enables
    the guest MTRRs with default type WB (as firmware leaves them), and turns
    on 4-level long-mode paging with an empty PML4.
    """

    def __init__(self, vm: VM, vcpu: VCpu, *, pt_gpa: int, pt_size: int) -> None:
        if pt_gpa % 0x1000 or pt_size < 0x1000:
            raise ValueError("page-table area must be 4 KiB aligned and at least one page")
        self.vm = vm
        self.vcpu = vcpu
        self._next = pt_gpa
        self._end = pt_gpa + pt_size
        self.pml4 = self._alloc()
        vcpu.set_msr(MSR_IA32_CR_PAT, LINUX_PAT)
        vcpu.set_msr(MSR_MTRR_DEF_TYPE, _MTRR_DEF_TYPE_E | int(MemType.WB))
        vcpu.set_sregs(cr4=_CR4_PAE, efer=_EFER_LME, cr3=self.pml4)
        vcpu.set_sregs(cr0=CR0_LONG_MODE)

    def _alloc(self) -> int:
        if self._next + 0x1000 > self._end:
            raise MemoryError("guest page-table area exhausted")
        gpa = self._next
        self._next += 0x1000
        self.vm.write_guest(gpa, bytes(0x1000))
        return gpa

    def _read(self, gpa: int) -> int:
        return int.from_bytes(self.vm.read_guest(gpa, 8), "little")

    def _write(self, gpa: int, value: int) -> None:
        self.vm.write_guest(gpa, value.to_bytes(8, "little"))

    def _leaf_slot(self, gva: int) -> int:
        table = self.pml4
        for shift in (39, 30, 21):
            entry_gpa = table + ((gva >> shift) & 0x1FF) * 8
            entry = self._read(entry_gpa)
            if not entry & _P:
                nxt = self._alloc()
                self._write(entry_gpa, nxt | _P | _RW)
                table = nxt
            else:
                table = entry & _ADDR
        return table + ((gva >> 12) & 0x1FF) * 8

    def map(self, gva: int, gpa: int, memtype: MemType, *, writable: bool = True) -> None:
        """Map the 4K page ``gva`` -> ``gpa`` with a protection of ``memtype``."""
        bits = pte_cache_bits(self.vcpu.pat, memtype)
        self._write(self._leaf_slot(gva), (gpa & _ADDR) | _P | (_RW if writable else 0) | bits)

    def map_range(self, gva: int, gpa: int, size: int, memtype: MemType) -> None:
        """``io_remap_pfn_range``: map ``size`` bytes page by page."""
        for off in range(0, size, 0x1000):
            self.map(gva + off, gpa + off, memtype)

    def unmap_range(self, gva: int, size: int) -> None:
        """Clear the leaf PTEs of ``[gva, gva + size)`` (``zap_page_range``)."""
        for off in range(0, size, 0x1000):
            self._write(self._leaf_slot(gva + off), 0)
