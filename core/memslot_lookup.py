"""Memslot lookup: gfn -> slot, gfn -> hva, and the hva ranges notifiers hit.

``__gfn_to_memslot``, ``id_to_memslot``, ``kvm_for_each_memslot_in_gfn_range``,
``gfn_to_hva`` and the ``kvm_handle_hva_range`` iteration
(``virt/kvm/kvm_main.c``) over the sorted slots of
:class:`kvmmu.memslot.Memslots`.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator

from kvmmu.errors import KvmError
from kvmmu.memory_slot import (
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SHIFT,
    PAGE_SIZE,
    Memslot,
)

__all__ = ["MemslotLookupMixin"]


class MemslotLookupMixin:
    """Lookups of :class:`kvmmu.memslot.Memslots` (every address space)."""

    nr_as_ids: int
    _gen: list[int]
    _by_id: list[dict[int, Memslot]]
    _bases: list[list[int]]
    _sorted: list[list[Memslot]]
    _last: list[Memslot | None]

    @property
    def generation(self) -> int:
        """Generation of address space 0 (``kvm_memslots(kvm)->generation``)."""
        return self._gen[0]

    def generation_of(self, as_id: int) -> int:
        """Generation of ``as_id``; congruent to ``as_id`` modulo ``nr_as_ids``."""
        return self._gen[as_id]

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """``__gfn_to_memslot``: the slot covering ``gfn`` (INVALID slots included).

        Last-hit cache (``slots->last_used_slot``), then bisect on base gfns.
        """
        last = self._last[as_id]
        if last is not None and last.base_gfn <= gfn < last.end_gfn:
            return last
        i = bisect.bisect_right(self._bases[as_id], gfn) - 1
        if i >= 0:
            slot = self._sorted[as_id][i]
            if gfn < slot.end_gfn:
                self._last[as_id] = slot
                return slot
        return None

    def id_to_memslot(self, as_id: int, id: int) -> Memslot | None:
        """``id_to_memslot``: the slot with ``id`` in ``as_id``, or None."""
        return self._by_id[as_id].get(id)

    def slots(self, as_id: int = 0) -> Iterator[Memslot]:
        """Slots of ``as_id`` in base-gfn order (``kvm_for_each_memslot``)."""
        return iter(list(self._sorted[as_id]))

    def __iter__(self) -> Iterator[Memslot]:
        for as_id in range(self.nr_as_ids):
            yield from self.slots(as_id)

    def all_slots(self) -> list[Memslot]:
        """Every slot of every address space (INVALID ones included)."""
        return list(self)

    def slots_in_gfn_range(self, start: int, end: int, as_id: int = 0) -> list[Memslot]:
        """``kvm_for_each_memslot_in_gfn_range``: slots overlapping ``[start, end)``."""
        bases, srt = self._bases[as_id], self._sorted[as_id]
        i = max(bisect.bisect_right(bases, start) - 1, 0)
        out = []
        while i < len(srt) and srt[i].base_gfn < end:
            if srt[i].end_gfn > start:
                out.append(srt[i])
            i += 1
        return out

    def hva_range_to_gfn_ranges(
        self, hva_start: int, hva_end: int
    ) -> list[tuple[Memslot, int, int]]:
        """(slot, gfn_start, gfn_end) for every slot, every address space, mapping
        part of ``[hva_start, hva_end)``: what ``kvm_handle_hva_range`` iterates
        for an MMU-notifier invalidation (INVALID slots included)."""
        out = []
        for slot in self:
            s_hva = slot.userspace_addr
            e_hva = s_hva + (slot.npages << PAGE_SHIFT)
            lo, hi = max(hva_start, s_hva), min(hva_end, e_hva)
            if lo < hi:
                g0 = slot.base_gfn + ((lo - s_hva) >> PAGE_SHIFT)
                g1 = slot.base_gfn + ((hi - s_hva + PAGE_SIZE - 1) >> PAGE_SHIFT)
                out.append((slot, g0, g1))
        return out

    def gfn_to_hva(self, gfn: int, as_id: int = 0, *, write: bool = False) -> int:
        """``gfn_to_hva``: the hva of ``gfn``; ``KvmError(EFAULT)`` if it has none.

        EFAULT when no slot covers the gfn or the slot is INVALID
        (``KVM_HVA_ERR_BAD``), and for ``write`` to a READONLY slot
        (``KVM_HVA_ERR_RO_BAD``) - ``__gfn_to_hva_many`` in kvm_main.c.
        """
        slot = self.gfn_to_memslot(gfn, as_id)
        if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
            what = "no memslot covers" if slot is None else "the memslot is being changed for"
            raise KvmError(errno.EFAULT, f"{what} gfn {gfn:#x} (address space {as_id})")
        if write and slot.flags & KVM_MEM_READONLY:
            raise KvmError(errno.EFAULT, f"gfn {gfn:#x} is in read-only slot {slot.id}")
        return slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)

    def translate_range(
        self, gpa: int, size: int, *, as_id: int = 0, write: bool = False
    ) -> list[tuple[Memslot, int, int, int]]:
        """Split ``[gpa, gpa+size)`` into per-page ``(slot, gfn, offset, length)``.

        Pages are walked like ``kvm_read_guest``/``kvm_write_guest``
        (``next_segment``); any page without a usable hva raises EFAULT as in
        :meth:`gfn_to_hva`.  ``write`` refuses READONLY slots.
        """
        if size < 0 or gpa < 0:
            raise ValueError(f"translate_range: gpa {gpa:#x} and size {size} must be >= 0")
        out = []
        while size:
            gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
            n = min(size, PAGE_SIZE - off)
            self.gfn_to_hva(gfn, as_id, write=write)
            slot = self.gfn_to_memslot(gfn, as_id)
            assert slot is not None
            out.append((slot, gfn, off, n))
            gpa += n
            size -= n
        return out
