"""The IOMMU hardware: domains, translation through the IOTLB, DMA faults.

A *domain* (``struct iommu_domain``) is what a device's DMA is translated
through:

* :class:`PagingDomain` - ``IOMMU_DOMAIN_UNMANAGED`` filled from an IOAS;
  its tables are the driver's own :class:`~.pgtable.IoPageTable`;
* :class:`KvmDomain` - the RFC's ``IOMMU_DOMAIN_KVM``: its root is KVM's
  exported TDP root and its tables are KVM's SPTE tables
  (spec/consumers.md §2.2 flow step 3).

:class:`Iommu` translates an IOVA page: IOTLB hit, or a walk whose result is
cached. It checks every translation it hands out against the host (a pfn
that is no longer live is a stale DMA and is counted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu.plugins.iommu.iotlb import Iotlb, IotlbEntry
from kvmmu.plugins.iommu.pgtable import IoPageTable, IoPteFormat, IoWalk, io_walk

if TYPE_CHECKING:
    from kvmmu.hostmem import HostMemory

__all__ = ["DomainBase", "Iommu", "KvmDomain", "PagingDomain", "Translation"]

PAGE_SHIFT = 12


class DomainBase(ABC):
    """What every domain offers the IOMMU: an id and a page walk."""

    kind = "base"

    def __init__(self, domain_id: int) -> None:
        self.id = domain_id

    @abstractmethod
    def walk(self, iova: int) -> IoWalk:
        """Walk this domain's tables for ``iova``."""


class PagingDomain(DomainBase):
    """A kernel-managed paging domain with its own I/O page table (pinned mode)."""

    kind = "paging"

    def __init__(self, domain_id: int) -> None:
        super().__init__(domain_id)
        self.pgtable = IoPageTable()

    def walk(self, iova: int) -> IoWalk:
        return self.pgtable.walk(iova)


class KvmDomain(DomainBase):
    """``IOMMU_DOMAIN_KVM``: walks KVM's SPTE tables from the exported root.

    ``table_of`` is ``vm.mmu.pool.table`` (looked up on every walk, since the
    pool may be reallocated as it grows); ``levels`` the TDP root level.
    """

    kind = "kvm"

    def __init__(
        self,
        domain_id: int,
        root_hpa: int,
        levels: int,
        fmt: IoPteFormat,
        table_of: Callable[[int], np.ndarray],
    ) -> None:
        super().__init__(domain_id)
        self.root_hpa = root_hpa
        self.levels = levels
        self.fmt = fmt
        self._table_of = table_of

    def walk(self, iova: int) -> IoWalk:
        return io_walk(self._table_of, self.root_hpa, self.levels, self.fmt, iova)


@dataclass(frozen=True, slots=True)
class Translation:
    """A translation the IOMMU produced: hit or walk, and the result."""

    ok: bool
    pfn: int = 0
    readable: bool = False
    writable: bool = False
    hit: bool = False
    reason: str = ""


class Iommu:
    """One IOMMU unit: an IOTLB shared by all domains and the walker."""

    def __init__(self, host: HostMemory | Any, iotlb_entries: int) -> None:
        self.host = host
        self.iotlb = Iotlb(iotlb_entries)
        self.walks = 0
        self.dma_faults = 0
        self.stale_dma: list[str] = []

    def translate(self, dom: DomainBase, iova_pfn: int, *, write: bool) -> Translation:
        """Translate one IOVA page for a read (``write`` False) or a write.

        A cached entry that lacks the permission is dropped and the tables
        are walked again (as VT-d re-walks on a permission miss would after
        the fault is fixed). A faulting walk is never cached.
        """
        e = self.iotlb.lookup(dom.id, iova_pfn)
        if e is not None:
            if e.writable if write else e.readable:
                return self._checked(Translation(True, e.pfn, e.readable, e.writable, hit=True))
            self.iotlb.invalidate_range(dom.id, iova_pfn, 1)
        self.walks += 1
        w = dom.walk(iova_pfn << PAGE_SHIFT)
        if not w.ok:
            return Translation(False, reason=w.reason)
        if not (w.writable if write else w.readable):
            return Translation(False, reason="permission")
        self.iotlb.insert(dom.id, iova_pfn, IotlbEntry(w.pfn, w.readable, w.writable))
        return self._checked(Translation(True, w.pfn, w.readable, w.writable))

    def _checked(self, t: Translation) -> Translation:
        if not self.host.pfn_is_live(t.pfn):
            self.stale_dma.append(f"DMA through pfn {t.pfn:#x}, which the host no longer backs")
        return t

    def invalidate(self, dom: DomainBase, first_pfn: int, npages: int) -> int:
        """Page-selective IOTLB (and devTLB) invalidation for ``dom``."""
        return self.iotlb.invalidate_range(dom.id, first_pfn, npages)
