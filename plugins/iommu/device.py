"""A DMA-capable device behind the IOMMU, with or without PRI/IOPF.

``dma_read(iova, size)`` / ``dma_write(iova, data)`` translate every 4K page
through the HWPT the device is attached to (IOTLB, then a walk). A device
with IOPF support sends the pages that failed to translate as *one* page
request group (spec/consumers.md T3) and retries after a SUCCESS response;
a device without IOPF gets a DMA fault (VT-d reports a non-recoverable
fault). Either way nothing is transferred unless every page translates:
an operation is all or nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmu.errors import KvmmuError
from kvmmu.plugins.iommu.iommufd import HwptKvm, HwptPaging
from kvmmu.plugins.iommu.iopf import IopfFault, PageResponse

if TYPE_CHECKING:
    from kvmmu.plugins.iommu.domain import Iommu
    from kvmmu.plugins.iommu.iommufd import BoundDevice

__all__ = ["DmaDevice", "DmaFault"]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DmaFault(KvmmuError):
    """A DMA the IOMMU did not complete: ``iova``, ``reason``, and ``response``
    (the page response the device got, or None when no page request was sent)."""

    def __init__(
        self, device: str, iova: int, reason: str, response: PageResponse | None = None
    ) -> None:
        self.device = device
        self.iova = iova
        self.reason = reason
        self.response = response
        extra = f", page response {response.name}" if response is not None else ""
        super().__init__(f"device {device!r}: DMA fault at iova {iova:#x}: {reason}{extra}")


class DmaDevice:
    """A PCIe function doing DMA through ``iommu``; ``iopf`` = PRI supported."""

    def __init__(self, iommu: Iommu, name: str, *, iopf: bool = False) -> None:
        self.iommu = iommu
        self.name = name
        self.iopf = iopf
        self.bound: BoundDevice | None = None
        self.stats = {"dma_ops": 0, "dma_faults": 0, "page_requests": 0, "groups": 0, "bytes": 0}

    def __repr__(self) -> str:
        return f"DmaDevice({self.name!r}, iopf={self.iopf})"

    def _hwpt(self, iova: int) -> HwptKvm | HwptPaging:
        if self.bound is None or self.bound.hwpt is None:
            self.stats["dma_faults"] += 1
            raise DmaFault(self.name, iova, "device is not attached to any HWPT (DMA blocked)")
        return self.bound.hwpt

    def _translate(self, iova: int, size: int, write: bool) -> list[int]:
        """Host page addresses for every page of ``[iova, iova+size)``, or raise."""
        if size <= 0 or iova < 0:
            raise ValueError(f"DMA needs iova >= 0 and size > 0, got {iova:#x}, {size}")
        hwpt = self._hwpt(iova)
        dom = hwpt.domain
        pages = list(range(iova >> PAGE_SHIFT, ((iova + size - 1) >> PAGE_SHIFT) + 1))
        self.stats["dma_ops"] += 1
        for attempt in range(2):
            out: list[int] = []
            failed: list[tuple[int, str]] = []
            for p in pages:
                t = self.iommu.translate(dom, p, write=write)
                if t.ok:
                    out.append(t.pfn << PAGE_SHIFT)
                else:
                    failed.append((p, t.reason))
            if not failed:
                return out
            p0, why = failed[0]
            if attempt or not self.iopf or why in ("reserved", "mmio"):
                self.stats["dma_faults"] += 1
                self.iommu.dma_faults += 1
                raise DmaFault(self.name, p0 << PAGE_SHIFT, why)
            faults = [IopfFault(p << PAGE_SHIFT, read=not write, write=write) for p, _ in failed]
            self.stats["page_requests"] += len(faults)
            self.stats["groups"] += 1
            if not isinstance(hwpt, HwptKvm):
                # no IOPF handler on a kernel-managed paging HWPT (no FAULT object modelled)
                self.stats["dma_faults"] += 1
                raise DmaFault(self.name, p0 << PAGE_SHIFT, why, PageResponse.INVALID)
            res = hwpt.handle_iopf(faults)
            if res.response is not PageResponse.SUCCESS:
                self.stats["dma_faults"] += 1
                raise DmaFault(
                    self.name,
                    p0 << PAGE_SHIFT,
                    f"{why}; IOPF failed ({res.first_error})",
                    res.response,
                )
        raise AssertionError("unreachable: the second attempt returns or raises")

    def dma_read(self, iova: int, size: int) -> bytes:
        """Read ``size`` bytes at ``iova`` through the IOMMU."""
        bases = self._translate(iova, size, write=False)
        out = bytearray()
        off = iova & (PAGE_SIZE - 1)
        left = size
        for base in bases:
            n = min(left, PAGE_SIZE - off)
            out += self.iommu.host.read_phys(base + off, n)
            left -= n
            off = 0
        self.stats["bytes"] += size
        return bytes(out)

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` through the IOMMU (all pages or none)."""
        bases = self._translate(iova, len(data), write=True)
        off = iova & (PAGE_SIZE - 1)
        pos = 0
        for base in bases:
            n = min(len(data) - pos, PAGE_SIZE - off)
            self.iommu.host.write_phys(base + off, data[pos : pos + n])
            pos += n
            off = 0
        self.stats["bytes"] += len(data)
