"""The ``virtio_gpu`` consumer plugin (entry point ``kvmmu.plugins.virtio_gpu:VirtioGpuPlugin``).

virtio-gpu host-visible blobs mapped WC by the guest: the device and its
memslots (:mod:`.device`), the four KVM designs (:mod:`.designs`), the
coherency check with hazards H1–H6 (:mod:`.coherency`) and the
vendor × era × design table (:func:`hazard_table`). docs/virtio-gpu.md.
"""

from __future__ import annotations

from kvmmu.plugins.virtio_gpu.coherency import Hazard, PageCheck, classify
from kvmmu.plugins.virtio_gpu.config import BlobConfig, VirtioGpuConfig
from kvmmu.plugins.virtio_gpu.designs import DESIGNS, Design, design_mt_mask
from kvmmu.plugins.virtio_gpu.device import Blob, VirtioGpuDevice, VirtioGpuError
from kvmmu.plugins.virtio_gpu.guest import LINUX_PAT, LinuxGuest
from kvmmu.plugins.virtio_gpu.plugin import GuestMapping, MigrationBlocked, VirtioGpuPlugin
from kvmmu.plugins.virtio_gpu.table import GUEST_TYPES, ROW_KEYS, build_scenario, hazard_table

__all__ = [
    "DESIGNS",
    "GUEST_TYPES",
    "LINUX_PAT",
    "ROW_KEYS",
    "Blob",
    "BlobConfig",
    "Design",
    "GuestMapping",
    "Hazard",
    "LinuxGuest",
    "MigrationBlocked",
    "PageCheck",
    "VirtioGpuConfig",
    "VirtioGpuDevice",
    "VirtioGpuError",
    "VirtioGpuPlugin",
    "build_scenario",
    "classify",
    "design_mt_mask",
    "hazard_table",
]
