"""The host physical byte store: what a host physical address holds.

Page contents are materialised (a 4 KiB ``bytearray`` per pfn) only when
written; an untouched page reads as zeros without allocating.  RAM pfns lie
in ``[RAM_BASE, 2**(maxphyaddr-1))``; everything else is not e820 RAM, so
:meth:`PhysMemMixin.is_mmio_pfn` is true for it (``kvm_is_mmio_pfn``,
spec/kvm-mmu.md §4.6).  MMIO pages written through a BAR keep their bytes,
so reads return what was last written; unwritten MMIO reads as zeros.
"""

from __future__ import annotations

import struct

import numpy as np
from kvmmu.host_state import PAGE_SHIFT, PAGE_SIZE, HostState
from kvmmu.memtype import MemType

__all__ = ["PhysMemMixin"]

_U64_MAX = (1 << 64) - 1
_Q = struct.Struct("<Q")


class PhysMemMixin(HostState):
    """Physical memory of :class:`kvmmu.hostmem.HostMemory`: bytes by host physical address."""

    def is_ram_pfn(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in the host RAM window."""
        return self._ram_base_pfn <= pfn < self._ram_limit_pfn

    def is_mmio_pfn(self, pfn: int) -> bool:
        """``kvm_is_mmio_pfn`` (spec/kvm-mmu.md §4.6): a pfn that is not host RAM."""
        return not self._ram_base_pfn <= pfn < self._ram_limit_pfn

    def memtype_of(self, hpa: int) -> MemType:
        """Host memory type of ``hpa``: WB for RAM, the BAR's mapping type for MMIO.

        MMIO with no mapping reads UC_MINUS, as x86 PAT ``lookup_memtype`` does
        for untracked non-RAM.  Returns a ``MemType``.
        """
        pfn = hpa >> PAGE_SHIFT
        if self.is_ram_pfn(pfn):
            return MemType.WB
        for first, end, mt in self._mmio_ranges:
            if first <= pfn < end:
                return mt
        return MemType.UC_MINUS

    def pfn_is_live(self, pfn: int) -> bool:
        """True for MMIO pfns and RAM pfns currently backing an hva or pinned.

        False for a RAM pfn that was reclaimed, unmapped or never allocated: an
        SPTE pointing there is stale.
        """
        if not self.is_ram_pfn(pfn):
            return True
        if pfn in self._live or self._pin_count.get(pfn, 0) > 0:
            return True
        return self._block_is_live(pfn)

    def _page_for_write(self, pfn: int) -> bytearray:
        data = self._pages.get(pfn)
        if data is None:
            if self.is_ram_pfn(pfn) and not self.pfn_is_live(pfn):
                self.stats.stale_writes += 1
            data = bytearray(PAGE_SIZE)
            self._pages[pfn] = data
            self.stats.pages_materialised += 1
        return data

    def read_phys(self, hpa: int, size: int) -> bytes:
        """Read ``size`` bytes at host physical ``hpa``; untouched memory reads as zeros."""
        if size < 0 or hpa < 0:
            raise ValueError(f"read_phys: hpa {hpa:#x} and size {size} must be non-negative")
        out = bytearray()
        while size:
            off = hpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            data = self._pages.get(hpa >> PAGE_SHIFT)
            out += data[off : off + n] if data is not None else bytes(n)
            hpa += n
            size -= n
        return bytes(out)

    def write_phys(self, hpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at host physical ``hpa``, materialising pages as needed."""
        if hpa < 0:
            raise ValueError(f"write_phys: hpa {hpa:#x} must be non-negative")
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            off = hpa & (PAGE_SIZE - 1)
            n = min(len(mv) - pos, PAGE_SIZE - off)
            self._page_for_write(hpa >> PAGE_SHIFT)[off : off + n] = mv[pos : pos + n]
            hpa += n
            pos += n

    def read_u64(self, hpa: int) -> int:
        """Read one little-endian u64 (a page-table entry) at ``hpa``."""
        off = hpa & (PAGE_SIZE - 1)
        if off <= PAGE_SIZE - 8:
            data = self._pages.get(hpa >> PAGE_SHIFT)
            return 0 if data is None else _Q.unpack_from(data, off)[0]
        return int.from_bytes(self.read_phys(hpa, 8), "little")

    def write_u64(self, hpa: int, value: int) -> None:
        """Write one little-endian u64 at ``hpa``."""
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"write_u64: value {value:#x} is not a u64")
        self.write_phys(hpa, value.to_bytes(8, "little"))

    def read_u64_many(self, hpas: np.ndarray) -> np.ndarray:
        """Batch :meth:`read_u64` for 8-byte aligned ``hpas``; returns uint64 values."""
        addrs = np.asarray(hpas, dtype=np.uint64)
        out = np.zeros(addrs.shape, dtype=np.uint64)
        if addrs.size == 0:
            return out
        flat = addrs.reshape(-1)
        if np.any(flat & np.uint64(7)):
            raise ValueError("read_u64_many: every address must be 8-byte aligned")
        res = out.reshape(-1)
        pfns = flat >> np.uint64(PAGE_SHIFT)
        idx = ((flat & np.uint64(PAGE_SIZE - 1)) >> np.uint64(3)).astype(np.intp)
        order = np.argsort(pfns, kind="stable")
        spfns = pfns[order]
        cuts = np.flatnonzero(np.diff(spfns)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [spfns.size]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            data = self._pages.get(int(spfns[s]))
            if data is not None:
                sel = order[s:e]
                res[sel] = np.frombuffer(data, dtype="<u8")[idx[sel]]
        return out

    def resident_bytes(self) -> int:
        """Bytes of page contents held (materialised pages, swapped-out contents)."""
        return (len(self._pages) + len(self._swapped)) * PAGE_SIZE
