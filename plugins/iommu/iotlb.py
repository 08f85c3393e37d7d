"""The IOTLB: cached IOVA-page translations, keyed by (domain, IOVA page).

Entries are cached per 4K IOVA page (a huge leaf fills one entry per 4K
page the device touched; a modelling simplification: real IOTLBs may hold
one superpage entry). Replacement is LRU. Invalidation is by domain and
page range, the granularity of ``cache_invalidate_kvm`` in the RFC
(``iommufd_kvmtdp_invalidate(start, size)``, spec/consumers.md T5 [TDP-15])
and of the VT-d page-selective IOTLB invalidation for unmaps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Iotlb", "IotlbEntry", "IotlbStats"]


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    """One cached translation: host ``pfn`` and the permissions the walk gave."""

    pfn: int
    readable: bool
    writable: bool


@dataclass
class IotlbStats:
    """Counters of one IOTLB."""

    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    invalidations: int = 0  # invalidation requests (range or domain)
    entries_invalidated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "inserts": self.inserts,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
            "entries_invalidated": self.entries_invalidated,
        }


class Iotlb:
    """An LRU cache of ``capacity`` 4K translations shared by all domains."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"IOTLB capacity must be at least 1 entry, got {capacity}")
        self.capacity = capacity
        self._d: OrderedDict[tuple[int, int], IotlbEntry] = OrderedDict()
        self.stats = IotlbStats()

    def __len__(self) -> int:
        return len(self._d)

    def lookup(self, domain: int, iova_pfn: int) -> IotlbEntry | None:
        """Return the cached entry (counting a hit) or None (counting a miss)."""
        key = (domain, iova_pfn)
        e = self._d.get(key)
        if e is None:
            self.stats.misses += 1
            return None
        self._d.move_to_end(key)
        self.stats.hits += 1
        return e

    def insert(self, domain: int, iova_pfn: int, entry: IotlbEntry) -> None:
        """Cache ``entry``; the least recently used entry makes room."""
        key = (domain, iova_pfn)
        if key in self._d:
            self._d.move_to_end(key)
        elif len(self._d) >= self.capacity:
            self._d.popitem(last=False)
            self.stats.evictions += 1
        self._d[key] = entry
        self.stats.inserts += 1

    def invalidate_range(self, domain: int, first_pfn: int, npages: int) -> int:
        """Drop ``domain``'s entries for IOVA pages ``[first_pfn, first_pfn + npages)``.

        Returns the number of entries dropped; counts one invalidation.
        """
        if npages < 0 or first_pfn < 0:
            raise ValueError(f"invalidate_range: bad range {first_pfn:#x} + {npages}")
        self.stats.invalidations += 1
        end = first_pfn + npages
        if npages <= len(self._d):
            keys = [(domain, p) for p in range(first_pfn, end) if (domain, p) in self._d]
        else:
            keys = [k for k in self._d if k[0] == domain and first_pfn <= k[1] < end]
        for k in keys:
            del self._d[k]
        self.stats.entries_invalidated += len(keys)
        return len(keys)

    def invalidate_domain(self, domain: int) -> int:
        """Drop every entry of ``domain`` (domain-selective invalidation)."""
        self.stats.invalidations += 1
        keys = [k for k in self._d if k[0] == domain]
        for k in keys:
            del self._d[k]
        self.stats.entries_invalidated += len(keys)
        return len(keys)

    def entries(self) -> Iterator[tuple[int, int, IotlbEntry]]:
        """``(domain, iova_pfn, entry)`` for every cached translation."""
        for (dom, pfn), e in list(self._d.items()):
            yield dom, pfn, e
