"""The SPTE table pool: real 512-entry ``uint64`` page tables in one numpy array.

Every TDP (and, later, shadow) page table is a row of ``SptePool.data``
(``[N, 512] uint64``), grown by doubling. A table's host physical address is
derived from its row: ``hpa = pool.base + index * 4096``, with ``base`` above
every RAM or MMIO pfn the host hands out (``kvmmu.hostmem`` keeps RAM below
``2**(maxphyaddr-1)`` and BARs below ``2**maxphyaddr``), so a non-leaf SPTE
holds a real address and an IOMMU sharing the tables walks the same rows
(spec/consumers.md T2). Freed rows are recycled (``tdp_mmu_free_sp``).

Per-table metadata (``struct kvm_mmu_page``: ``role.level``, ``gfn``,
``nx_huge_page_disallowed``) lives in parallel numpy arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PAGE_SIZE", "SPTE_ENT_PER_PAGE", "SptePool", "pool_base_for"]

#: ``SPTE_ENT_PER_PAGE``: entries per table.
SPTE_ENT_PER_PAGE = 512
PAGE_SIZE = 4096


def pool_base_for(host_maxphyaddr: int) -> int:
    """The hpa of row 0: just above the host's physical address space.

    Capped at bit 51 so table addresses still fit an SPTE's frame field.
    """
    return 1 << min(host_maxphyaddr, 51)


class SptePool:
    """A growable pool of SPTE tables.

    ``data[i]`` is table ``i``; ``level[i]`` its ``role.level`` (1 = 4K
    leaves), ``gfn[i]`` the first gfn it covers, ``nx_disallowed[i]`` the
    ``sp->nx_huge_page_disallowed`` flag, ``live[i]`` whether it is in use.
    """

    def __init__(self, base: int, capacity: int = 64) -> None:
        if base & (PAGE_SIZE - 1):
            raise ValueError(f"pool base {base:#x} must be page aligned")
        self.base = base
        self.base_pfn = base >> 12
        self.data = np.zeros((capacity, SPTE_ENT_PER_PAGE), dtype=np.uint64)
        self.level = np.zeros(capacity, dtype=np.int8)
        self.gfn = np.zeros(capacity, dtype=np.int64)
        self.nx_disallowed = np.zeros(capacity, dtype=np.bool_)
        self.live = np.zeros(capacity, dtype=np.bool_)
        self._free: list[int] = []
        self._top = 0  # rows [0, _top) have been handed out at least once
        self.allocated = 0

    @property
    def capacity(self) -> int:
        return int(self.data.shape[0])

    def _grow(self, need: int) -> None:
        """Grow to at least ``need`` rows: double, or exactly ``need`` if more."""
        new_cap = max(self.capacity * 2, need)
        data = np.zeros((new_cap, SPTE_ENT_PER_PAGE), dtype=np.uint64)
        data[: self._top] = self.data[: self._top]
        self.data = data
        for name in ("level", "gfn", "nx_disallowed", "live"):
            old = getattr(self, name)
            arr = np.zeros(new_cap, dtype=old.dtype)
            arr[: self._top] = old[: self._top]
            setattr(self, name, arr)

    def alloc(self, level: int, gfn: int) -> int:
        """Allocate one zeroed table (``tdp_mmu_alloc_sp``); returns its index."""
        if self._free:
            idx = self._free.pop()
        else:
            if self._top >= self.capacity:
                self._grow(self._top + 1)
            idx = self._top
            self._top += 1
        self.level[idx] = level
        self.gfn[idx] = gfn
        self.nx_disallowed[idx] = False
        self.live[idx] = True
        self.allocated += 1
        return idx

    def alloc_many(self, n: int, level: int, gfns: np.ndarray) -> np.ndarray:
        """Allocate ``n`` zeroed tables at once (bulk pre-fault).

        The rows are those ``n`` calls of :meth:`alloc` would return, in the
        same order (free list last-in first, then fresh rows), so a bulk
        path builds the very tables the per-fault path builds. Fresh rows
        are contiguous when the free list is empty, which lets a caller write
        them as one slice. Returns the indices (int64).
        """
        from_free = min(n, len(self._free))
        idxs = np.empty(n, dtype=np.int64)
        if from_free:
            taken = self._free[len(self._free) - from_free :]
            del self._free[len(self._free) - from_free :]
            idxs[:from_free] = taken[::-1]
            self.data[idxs[:from_free]] = 0
        rest = n - from_free
        if rest:
            if self._top + rest > self.capacity:
                self._grow(self._top + rest)
            idxs[from_free:] = np.arange(self._top, self._top + rest, dtype=np.int64)
            self._top += rest
        self.level[idxs] = level
        self.gfn[idxs] = gfns
        self.nx_disallowed[idxs] = False
        self.live[idxs] = True
        self.allocated += n
        return idxs

    def free(self, idx: int) -> None:
        """Return a table to the pool (``tdp_mmu_free_sp``); it is zeroed."""
        self.data[idx] = 0
        self.live[idx] = False
        self._free.append(idx)
        self.allocated -= 1

    def hpa(self, idx: int) -> int:
        """Host physical address of table ``idx``."""
        return self.base + (idx << 12)

    def index_of(self, hpa: int) -> int:
        """Table index of a table hpa (the inverse of :meth:`hpa`)."""
        idx = (hpa - self.base) >> 12
        if not 0 <= idx < self._top or hpa & (PAGE_SIZE - 1):
            raise ValueError(f"hpa {hpa:#x} is not a table of this pool")
        return idx

    def table(self, hpa: int) -> np.ndarray:
        """The 512-entry view of the table at ``hpa`` (for an IOMMU walk)."""
        return self.data[self.index_of(hpa)]

    def is_table_hpa(self, hpa: int) -> bool:
        """Whether ``hpa`` is the address of a live table."""
        idx = (hpa - self.base) >> 12
        return 0 <= idx < self._top and not hpa & (PAGE_SIZE - 1) and bool(self.live[idx])

    def nbytes(self) -> int:
        """Bytes held by the pool (tables and metadata, whole capacity)."""
        return int(
            self.data.nbytes
            + self.level.nbytes
            + self.gfn.nbytes
            + self.nx_disallowed.nbytes
            + self.live.nbytes
        )
