"""Dirty bitmaps: the bit-packed ``slot->dirty_bitmap`` and its harvesting.

A bitmap is a numpy ``uint64`` array of ``ceil(npages / 64)`` little-endian
words, bit ``i`` of word ``w`` standing for page ``64*w + i`` of the slot, as
the kernel's ``unsigned long`` bitmap with ``set_bit_le`` on x86
(spec/kvm-mmu-2.md §7.2: ``ALIGN(npages, BITS_PER_LONG)/8`` bytes).  Bits past
``npages`` are never set.  A 64 GiB slot costs 2 MiB, and only while dirty
logging is on.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from kvmmu.errors import KvmError

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot

__all__ = [
    "BITS_PER_LONG",
    "DirtyLogMixin",
    "alloc_dirty_bitmap",
    "bitmap_clear_range",
    "bitmap_set_pages",
    "bitmap_to_pages",
]

BITS_PER_LONG = 64
_KVM_USER_MEM_SLOTS = 32764  # kvmmu.memslot.KVM_USER_MEM_SLOTS
_WORD = np.dtype("<u8")


def alloc_dirty_bitmap(npages: int, *, initially_set: bool = False) -> np.ndarray:
    """A zeroed bitmap for ``npages`` (``kvm_alloc_dirty_bitmap``).

    ``initially_set`` sets the first ``npages`` bits, as ``kvm_prepare_memory_region``
    does with manual-protect and ``KVM_DIRTY_LOG_INITIALLY_SET`` (spec/kvm-mmu.md §1.4).
    """
    words = (npages + BITS_PER_LONG - 1) // BITS_PER_LONG
    bm = np.zeros(words, dtype=_WORD)
    if initially_set and npages:
        bm[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        tail = npages % BITS_PER_LONG
        if tail:
            bm[-1] = np.uint64((1 << tail) - 1)
    return bm


def bitmap_set_pages(bm: np.ndarray, rel: np.ndarray) -> None:
    """Set the bits for slot-relative page numbers ``rel`` (vectorised ``set_bit_le``)."""
    rel = np.asarray(rel, dtype=np.uint64)
    words = (rel >> np.uint64(6)).astype(np.intp)
    bits = np.left_shift(np.uint64(1), rel & np.uint64(63))
    np.bitwise_or.at(bm, words, bits)


def bitmap_to_pages(bm: np.ndarray, first_word: int = 0) -> np.ndarray:
    """Slot-relative page numbers of the set bits (sorted uint64); word 0 is ``first_word``."""
    nz = np.flatnonzero(bm)
    if nz.size == 0:
        return np.zeros(0, dtype=np.uint64)
    sub = np.ascontiguousarray(bm[nz], dtype=_WORD)
    bits = np.unpackbits(sub.view(np.uint8), bitorder="little").reshape(-1, BITS_PER_LONG)
    rows, cols = np.nonzero(bits)
    return ((nz[rows] + first_word).astype(np.uint64) << np.uint64(6)) + cols.astype(np.uint64)


def bitmap_clear_range(
    bm: np.ndarray, first_page: int, num_pages: int, mask: np.ndarray | None
) -> np.ndarray:
    """Clear bits ``[first_page, first_page+num_pages)`` selected by ``mask``.

    ``first_page`` is a multiple of 64 (checked by the caller).  ``mask`` is a
    bool per page of the range (None: all).  Returns the slot-relative pages
    whose bits really were set and are now clear, the ``mask &=
    atomic_long_fetch_andnot(mask, p)`` of ``kvm_clear_dirty_log_protect``.
    """
    w0 = first_page // BITS_PER_LONG
    nwords = (num_pages + BITS_PER_LONG - 1) // BITS_PER_LONG
    if mask is None:
        sel = np.ones(num_pages, dtype=bool)
    else:
        sel = np.asarray(mask, dtype=bool)
        if sel.shape != (num_pages,):
            raise ValueError(
                f"clear_dirty_log: mask must be a bool array of num_pages={num_pages} "
                f"entries, got shape {sel.shape}"
            )
    padded = np.zeros(nwords * BITS_PER_LONG, dtype=bool)
    padded[:num_pages] = sel
    mwords = np.packbits(padded, bitorder="little").view(_WORD)
    window = bm[w0 : w0 + nwords]
    cleared = window & mwords[: window.size]
    window &= ~mwords[: window.size]
    return bitmap_to_pages(cleared, w0)


class DirtyLogMixin:
    """Dirty-log ioctls of :class:`kvmmu.memslot.Memslots` (spec/kvm-mmu-2.md §7)."""

    nr_as_ids: int
    manual_dirty_log_protect: bool
    _by_id: list[dict[int, Memslot]]

    def mark_page_dirty(self, slot: Memslot | None, gfn: int) -> None:
        """``mark_page_dirty_in_slot``: set the gfn's bit if the slot logs dirty pages."""
        if slot is None or slot.dirty_bitmap is None:
            return
        rel = gfn - slot.base_gfn
        if not 0 <= rel < slot.npages:
            raise ValueError(f"mark_page_dirty: gfn {gfn:#x} is outside slot {slot.id}")
        slot.dirty_bitmap[rel >> 6] |= np.uint64(1 << (rel & 63))

    def mark_pages_dirty(self, slot: Memslot | None, gfns: np.ndarray) -> None:
        """Batch :meth:`mark_page_dirty` (a PML-buffer flush)."""
        if slot is None or slot.dirty_bitmap is None:
            return
        rel = np.asarray(gfns, dtype=np.int64) - slot.base_gfn
        if rel.size and (rel.min() < 0 or rel.max() >= slot.npages):
            raise ValueError(f"mark_pages_dirty: gfns outside slot {slot.id}")
        bitmap_set_pages(slot.dirty_bitmap, rel)

    def dirty_gfns(self, slot: Memslot) -> np.ndarray:
        """The gfns currently marked dirty in ``slot`` (sorted uint64), not cleared."""
        if slot.dirty_bitmap is None:
            return np.zeros(0, dtype=np.uint64)
        return bitmap_to_pages(slot.dirty_bitmap) + np.uint64(slot.base_gfn)

    def _dirty_log_slot(self, what: str, as_id: int, id: int) -> Memslot:
        if not 0 <= as_id < self.nr_as_ids or not 0 <= id < _KVM_USER_MEM_SLOTS:
            raise KvmError(
                errno.EINVAL,
                f"{what}: address space {as_id} (allowed < {self.nr_as_ids}) / slot {id} "
                f"(allowed < {_KVM_USER_MEM_SLOTS})",
            )
        return self._by_id[as_id].get(id)  # type: ignore[return-value]

    def get_dirty_log(
        self, as_id: int, id: int, sync: Callable[[Memslot], object] | None = None
    ) -> np.ndarray:
        """``KVM_GET_DIRTY_LOG`` (``kvm_get_dirty_log_protect``): the dirty gfns, sorted uint64.

        EINVAL for a bad address space or slot id >= _KVM_USER_MEM_SLOTS, ENOENT
        for a missing slot or one without a bitmap.  Without manual protect the
        bitmap is cleared (the VM must then write-protect the returned gfns);
        with ``manual_dirty_log_protect`` it is only copied. ``sync`` is
        ``kvm_arch_sync_dirty_log``, run once the arguments passed the checks.
        """
        slot = self._dirty_log_slot("KVM_GET_DIRTY_LOG", as_id, id)
        if slot is None or slot.dirty_bitmap is None:
            raise KvmError(
                errno.ENOENT, f"KVM_GET_DIRTY_LOG: slot {as_id}:{id} has no dirty bitmap"
            )
        if sync is not None:
            sync(slot)
        gfns = self.dirty_gfns(slot)
        if not self.manual_dirty_log_protect:
            slot.dirty_bitmap[:] = 0
        return gfns

    def clear_dirty_log(
        self,
        as_id: int,
        id: int,
        first_page: int,
        num_pages: int,
        mask: np.ndarray | None = None,
        sync: Callable[[Memslot], object] | None = None,
    ) -> np.ndarray:
        """``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``); returns the cleared gfns.

        Errors in kernel order: EINVAL (address space / slot id), EINVAL
        (``first_page`` not a multiple of 64), ENOENT (no slot or no bitmap),
        EINVAL (range past the slot, or ``num_pages`` not a multiple of 64 unless
        the range ends at the slot's end).  ``mask`` (bool per page; None = all)
        is the userspace bitmap.  The VM re-protects exactly the returned gfns.
        ``sync`` is ``kvm_arch_sync_dirty_log``, run after the checks.
        """  # fmt: skip
        slot = self._dirty_log_slot("KVM_CLEAR_DIRTY_LOG", as_id, id)
        if first_page & 63:
            raise KvmError(errno.EINVAL, f"KVM_CLEAR_DIRTY_LOG: first_page {first_page} % 64 != 0")
        if slot is None or slot.dirty_bitmap is None:
            raise KvmError(
                errno.ENOENT, f"KVM_CLEAR_DIRTY_LOG: slot {as_id}:{id} has no dirty bitmap"
            )
        if (
            first_page > slot.npages
            or num_pages > slot.npages - first_page
            or (num_pages < slot.npages - first_page and num_pages & 63)
        ):
            raise KvmError(
                errno.EINVAL,
                f"KVM_CLEAR_DIRTY_LOG: [{first_page}, +{num_pages}) does not fit slot of "
                f"{slot.npages} pages in 64-page units",
            )
        if sync is not None:
            sync(slot)
        rel = bitmap_clear_range(slot.dirty_bitmap, first_page, num_pages, mask)
        return rel + np.uint64(slot.base_gfn)
