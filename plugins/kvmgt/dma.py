"""Host pages for GVT and the vfio pin / DMA-map cache of a vGPU.

Two host-side resources the shadow PPGTT needs:

* :class:`HostPagePool` — pages GVT allocates for itself (shadow page tables,
  scratch pages): ``alloc_page`` + ``dma_map_page`` in the kernel. The model
  takes them from an anonymous host mapping at ``kernel_hva`` that it pins, so
  they have real host physical addresses and bytes in :class:`kvmmu.hostmem.HostMemory`.
* :class:`DmaCache` — ``intel_gvt_dma_map_guest_page`` /
  ``intel_gvt_dma_unmap_guest_page`` with the per-vGPU ``gfn_cache`` and
  ``dma_addr_cache`` of ``gvt_dma{gfn, dma_addr, size, kref}``
  (``drivers/gpu/drm/i915/gvt/kvmgt.c``; spec/consumers.md G7, G8).

DMA addresses are host physical addresses (``dma-direct`` without an IOMMU):
the GPU reaches exactly the host page that backs the guest page.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = ["DmaCache", "GvtDma", "HostPagePool"]

_ZERO_PAGE = bytes(PAGE_SIZE)


class HostPagePool:
    """GVT's own host pages, handed out one 4 KiB page at a time.

    ``limit`` bounds the pages in use (``None``: unbounded); running out is
    ``ENOMEM``, which the PPGTT code answers by reclaiming (L4).
    """

    CHUNK_PAGES = 512

    def __init__(self, vm: VM, kernel_hva: int, limit: int | None) -> None:
        self.vm = vm
        self.kernel_hva = kernel_hva
        self.limit = limit
        self._next_hva = kernel_hva
        self._free: list[int] = []  # pfns
        self.in_use = 0

    def _grow(self) -> None:
        size = self.CHUNK_PAGES * PAGE_SIZE
        host = self.vm.host
        host.mmap_anon(self._next_hva, size)
        pfns = host.pin(self._next_hva, self.CHUNK_PAGES)
        self._next_hva += size
        self._free.extend(int(p) for p in reversed(pfns))

    def alloc(self, what: str) -> int:
        """``get_zeroed_page`` + ``dma_map_page``: a zeroed page's pfn (== its dma pfn)."""
        if self.limit is not None and self.in_use >= self.limit:
            raise KvmError(
                errno.ENOMEM,
                f"kvmgt: no host page for {what} ({self.in_use} of max_shadow_pages="
                f"{self.limit} in use)",
            )
        if not self._free:
            self._grow()
        pfn = self._free.pop()
        self.vm.host.write_phys(pfn << PAGE_SHIFT, _ZERO_PAGE)
        self.in_use += 1
        return pfn

    def free(self, pfn: int) -> None:
        """``dma_unmap_page`` + ``__free_page``."""
        self.in_use -= 1
        self._free.append(pfn)


@dataclass
class GvtDma:
    """``struct gvt_dma``: one pinned, DMA-mapped guest range."""

    gfn: int
    dma_addr: int
    size: int
    kref: int
    hva: int


class DmaCache:
    """The per-vGPU ``gfn_cache`` / ``dma_addr_cache`` (spec/consumers.md G7, G8)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.by_gfn: dict[int, GvtDma] = {}
        # dma_addr -> entries; two gfns may alias one host page (two slots, one hva)
        self.by_addr: dict[int, list[GvtDma]] = {}
        self.maps = 0
        self.unmaps = 0

    def _pin(self, gfn: int, size: int) -> tuple[int, int]:
        """``gvt_pin_guest_page``: pin page by page; the pfns must be contiguous.

        Returns ``(hva, dma_addr)``. Not contiguous -> ``EINVAL`` and every
        page pinned so far is unpinned again.
        """
        npages = size >> PAGE_SHIFT
        host = self.vm.host
        pinned: list[int] = []
        base_pfn = -1
        try:
            for i in range(npages):
                hva = int(self.vm.memslots.gfn_to_hva(gfn + i))
                pfn = int(host.pin(hva, 1)[0])
                pinned.append(hva)
                if i == 0:
                    base_pfn = pfn
                elif pfn != base_pfn + i:
                    raise KvmError(
                        errno.EINVAL,
                        f"kvmgt: gfn {gfn:#x}+{i} pins host pfn {pfn:#x}, not "
                        f"{base_pfn + i:#x}: a {size >> 10} KiB DMA map needs physically "
                        "contiguous pages (gvt_pin_guest_page)",
                    )
        except KvmError:
            for hva in pinned:
                host.unpin(hva, 1)
            raise
        return pinned[0], base_pfn << PAGE_SHIFT

    def map(self, gfn: int, size: int = PAGE_SIZE) -> int:
        """``intel_gvt_dma_map_guest_page(gfn, size)`` -> dma_addr (G7).

        Hit with the same size: kref +1. Same gfn, other size: the old entry
        is unmapped whatever its kref, then mapped anew. Miss: pin + map.
        """
        e = self.by_gfn.get(gfn)
        if e is not None and e.size == size:
            e.kref += 1
            return e.dma_addr
        if e is not None:
            self._remove(e)
        hva, dma_addr = self._pin(gfn, size)
        e = GvtDma(gfn, dma_addr, size, 1, hva)
        self.by_gfn[gfn] = e
        self.by_addr.setdefault(dma_addr, []).append(e)
        self.maps += 1
        return dma_addr

    def unmap(self, dma_addr: int) -> None:
        """``intel_gvt_dma_unmap_guest_page``: kref -1, at 0 unmap and unpin.

        An address with no cache entry is ignored, as in kvmgt.c.
        """
        lst = self.by_addr.get(dma_addr)
        if not lst:
            return
        e = lst[-1]
        e.kref -= 1
        if e.kref == 0:
            self._remove(e)

    def _remove(self, e: GvtDma) -> None:
        """``gvt_dma_unmap_page`` + ``__gvt_cache_remove_entry``."""
        self.vm.host.unpin(e.hva, e.size >> PAGE_SHIFT)
        if self.by_gfn.get(e.gfn) is e:
            del self.by_gfn[e.gfn]
        lst = self.by_addr[e.dma_addr]
        lst.remove(e)
        if not lst:
            del self.by_addr[e.dma_addr]
        self.unmaps += 1

    def kref(self, gfn: int) -> int:
        """The kref of ``gfn``'s mapping (0 when not mapped)."""
        e = self.by_gfn.get(gfn)
        return e.kref if e is not None else 0

    def is_mapped(self, dma_addr: int) -> bool:
        """Whether some cache entry covers the page at ``dma_addr``."""
        if self.by_addr.get(dma_addr):
            return True
        base = dma_addr & ~((2 << 20) - 1)
        return any(e.size > PAGE_SIZE for e in self.by_addr.get(base, []))

    def unmap_range(self, gfn: int, nr_pages: int) -> int:
        """``intel_vgpu_dma_unmap``: force-unmap every entry in the IOVA range (G8)."""
        hit = [e for e in list(self.by_gfn.values()) if gfn <= e.gfn < gfn + nr_pages]
        for e in hit:
            self._remove(e)
        return len(hit)

    def destroy(self) -> None:
        """``gvt_cache_destroy``: unmap and unpin everything (L7)."""
        for e in list(self.by_gfn.values()):
            self._remove(e)
