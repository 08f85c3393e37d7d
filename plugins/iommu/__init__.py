"""The ``iommu`` consumer plugin: IOMMUFD and "Sharing KVM TDP to IOMMU".

Entry point ``kvmmu.plugins.iommu:IommuPlugin``. See docs/iommu.md.
"""

from __future__ import annotations

from kvmmu.plugins.iommu.compare import Workload, compare_modes
from kvmmu.plugins.iommu.device import DmaDevice, DmaFault
from kvmmu.plugins.iommu.iopf import IopfFault, PageResponse
from kvmmu.plugins.iommu.plugin import IommuConfig, IommuPlugin
from kvmmu.plugins.iommu.tdp_fd import KvmTdpFd

__all__ = [
    "DmaDevice",
    "DmaFault",
    "IommuConfig",
    "IommuPlugin",
    "IopfFault",
    "KvmTdpFd",
    "PageResponse",
    "Workload",
    "compare_modes",
]
