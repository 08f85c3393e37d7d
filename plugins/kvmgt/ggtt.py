"""The vGPU's GGTT: trapped MMIO in BAR0, partial writes, host entries (GG1–GG5).

``intel_vgpu_emulate_ggtt_mmio_write`` / ``_read`` and
``intel_vgpu_reset_ggtt`` (``drivers/gpu/drm/i915/gvt/gtt.c``). The GGTT is
**not** page-tracked: guest writes reach it as emulated MMIO through the
core's ``kvmmu_mmio_write`` hook (spec/consumers.md GG1).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SHIFT
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.gtt import GttType

if TYPE_CHECKING:
    from kvmmu.plugins.kvmgt.dma import DmaCache

__all__ = ["GGTT_START_OFFSET", "Ggtt", "GmRange"]

#: ``info->gtt_start_offset``: the GGTT starts 8 MiB into BAR0 (GG1).
GGTT_START_OFFSET = 8 << 20
T = GttType.GGTT_PTE


@dataclass(frozen=True)
class GmRange:
    """A range of graphics-memory addresses ``[base, base + size)``."""

    base: int
    size: int

    def contains(self, gma: int) -> bool:
        return self.base <= gma < self.base + self.size


class Ggtt:
    """One vGPU's view of the GGTT (``ggtt_mm``) over the shared host GGTT."""

    def __init__(
        self,
        host_ggtt: np.ndarray,
        dma: DmaCache,
        scratch_mfn: int,
        aperture: GmRange,
        hidden: GmRange,
        gfn_is_valid: Callable[[int], bool],
    ) -> None:
        self.host_ggtt = host_ggtt
        self.dma = dma
        self.scratch_mfn = scratch_mfn
        self.aperture = aperture
        self.hidden = hidden
        self.gfn_is_valid = gfn_is_valid
        self.virtual_ggtt = np.zeros(len(host_ggtt), dtype=np.uint64)
        #: ``partial_pte_list``: entry index -> (byte offset written, saved u64)
        self.partial: dict[int, tuple[int, int]] = {}
        #: indices whose host entry a first-half write set to scratch (GG3).
        #: An 8-byte write does not touch ``partial_pte_list`` in the kernel,
        #: so a record can outlive its half-written state; these sets say
        #: which state the host entry is in (model bookkeeping for invariants).
        self.half_written: set[int] = set()
        #: indices whose virtual entry a same-half write changed after a full
        #: update left a stale record: the host entry keeps the full value.
        self.virtual_only: set[int] = set()
        self.written: set[int] = set()
        self.flushes = 0

    def gmadr_is_valid(self, gma: int) -> bool:
        """``vgpu_gmadr_is_valid``: inside this vGPU's aperture or hidden range."""
        return self.aperture.contains(gma) or self.hidden.contains(gma)

    @staticmethod
    def _check_size(what: str, nbytes: int) -> None:
        if nbytes not in (4, 8):
            raise KvmError(
                errno.EINVAL, f"kvmgt: GGTT {what} of {nbytes} bytes: only 4 or 8 allowed (GG1)"
            )

    def mmio_read(self, off: int, nbytes: int) -> bytes:
        """``emulate_ggtt_mmio_read``: the virtual entry's bytes (0 outside, GG2)."""
        self._check_size("read", nbytes)
        index = off >> 3
        if index >= len(self.virtual_ggtt):
            raise KvmError(errno.EINVAL, f"kvmgt: GGTT offset {off:#x} is past the GTT")
        v = int(self.virtual_ggtt[index]) if self.gmadr_is_valid(index << 12) else 0
        return v.to_bytes(8, "little")[off & 7 : (off & 7) + nbytes]

    def mmio_write(self, off: int, data: bytes) -> None:
        """``emulate_ggtt_mmio_write`` (GG1–GG4)."""
        nbytes = len(data)
        self._check_size("write", nbytes)
        if (off & 7 and nbytes == 8) or off & 3:
            raise KvmError(errno.EINVAL, f"kvmgt: GGTT write at {off:#x} is not aligned")
        index = off >> 3
        if index >= len(self.virtual_ggtt):
            raise KvmError(errno.EINVAL, f"kvmgt: GGTT offset {off:#x} is past the GTT")
        if not self.gmadr_is_valid(index << 12):
            return  # ballooning: the VM may write the whole GM space (GG2)
        shift = (off & 7) * 8
        e = int.from_bytes(data, "little") << shift
        partial_update = False
        if nbytes < 8:
            pos = self.partial.get(index)
            if pos is not None and pos[0] != off:
                # the second half: merge with the saved one (GG3)
                mask = ((1 << 32) - 1) << ((pos[0] & 7) * 8)
                e |= pos[1] & mask
                del self.partial[index]
            elif pos is not None:
                # the same half again: update the saved data and the virtual entry only
                self.partial[index] = (off, e)
                self.virtual_ggtt[index] = np.uint64(e)
                if index not in self.half_written:
                    self.virtual_only.add(index)
                return
            else:
                self.partial[index] = (off, e)
                partial_update = True
        self.written.add(index)
        # an 8-byte write leaves any partial record in place, as
        # emulate_ggtt_mmio_write does (only ``bytes < gtt_entry_size`` looks
        # at the list): a later other-half write still merges with it
        if partial_update:
            self.half_written.add(index)
        else:
            self.half_written.discard(index)
            self.virtual_only.discard(index)
        if not partial_update and gtt.test_present(e, T):
            gfn = gtt.get_pfn(e, T)
            if not self.gfn_is_valid(gfn):
                m = gtt.set_pfn(e, T, self.scratch_mfn)
            else:
                try:
                    dma_addr = self.dma.map(gfn)
                    m = gtt.set_pfn(e, T, dma_addr >> PAGE_SHIFT)
                except KvmError:
                    m = gtt.set_pfn(e, T, self.scratch_mfn)  # still present (GG4)
        else:
            # GG3/GG4: the host entry ``m`` starts from 0, not from the guest
            # value: only the scratch pfn, not present, no other guest bits.
            m = gtt.set_pfn(0, T, self.scratch_mfn)
        self.virtual_ggtt[index] = np.uint64(e)
        self._invalidate_host_pte(index)
        self.host_ggtt[index] = np.uint64(m)
        self.flushes += 1  # ggtt_invalidate: GFX_FLSH_CNTL_GEN6

    def _invalidate_host_pte(self, index: int) -> None:
        """``ggtt_invalidate_pte``: unmap the old host entry's DMA unless scratch."""
        pfn = gtt.get_pfn(int(self.host_ggtt[index]), T)
        if pfn != self.scratch_mfn:
            self.dma.unmap(pfn << PAGE_SHIFT)

    def reset(self, invalidate_old: bool) -> None:
        """``intel_vgpu_reset_ggtt`` (GG5): scratch + present in every host entry.

        The virtual GGTT is left as it was, as in the kernel; the guest driver
        rewrites what it uses. Entries written before the reset therefore no
        longer pair a virtual entry with its host entry, so the invariants
        (which check the entries written since) start afresh.
        """
        entry = gtt.set_pfn(0, T, self.scratch_mfn) | gtt.GEN8_PAGE_PRESENT
        self.written.clear()
        self.half_written.clear()
        self.virtual_only.clear()
        for r in (self.aperture, self.hidden):
            lo, hi = r.base >> 12, (r.base + r.size) >> 12
            if invalidate_old:
                for index in np.nonzero(self.host_ggtt[lo:hi])[0]:
                    self._invalidate_host_pte(lo + int(index))
            self.host_ggtt[lo:hi] = np.uint64(entry)
        self.flushes += 1

    def destroy(self) -> None:
        """``intel_vgpu_destroy_ggtt_mm``: drop partial records."""
        self.partial.clear()
        self.half_written.clear()
        self.virtual_only.clear()

    def host_translate(self, gma: int) -> int | None:
        """The GPU's GGTT lookup: host address for ``gma``, or None if not present."""
        index = gma >> 12
        if index >= len(self.host_ggtt):
            return None
        v = int(self.host_ggtt[index])
        if not gtt.test_present(v, T):
            return None
        return (gtt.get_pfn(v, T) << PAGE_SHIFT) | (gma & 0xFFF)
