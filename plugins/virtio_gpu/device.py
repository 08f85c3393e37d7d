"""The virtio-gpu device: the host-visible region, blob resources, their memslots.

virtio-gpu exposes a "host visible memory region" (shared memory id
``VIRTIO_GPU_SHM_ID_HOST_VISIBLE`` = 1); ``VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB``
maps a host blob at an offset in it and answers ``RESP_OK_MAP_INFO`` with a
``VIRTIO_GPU_MAP_CACHE_*`` value; the driver must not map a blob that is
already mapped; ``RESOURCE_UNMAP_BLOB`` undoes a map (spec/consumers.md §3.1,
[VSPEC]). QEMU (virgl) maps the blob's host pointer and inserts it as a RAM
sub-region of ``hostmem`` at the offset, so each mapped blob becomes its own
KVM memslot ([QEMU-BLOB]; ``slot_layout="per_blob"``). ``slot_layout="bar"``
is the other layout a VMM can use: one memslot over the whole region, blobs
placed into its host mapping.

Host backing (a modelling choice, docs/virtio-gpu.md): ``sysmem`` blobs are
RAM pages (an integrated GPU's buffers) that the host GPU driver maps WC for
userspace; KVM sees RAM pfns and cannot see that mapping's type (Yan Zhao,
seed 002: ``lookup_memtype`` is not exported). ``vram`` blobs are a host GPU
BAR: MMIO pfns mapped with the host type (``HostMemory.map_mmio``), which
KVM does see as MMIO (``kvm_is_mmio_pfn``, spec/consumers.md M1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmu import KVM_MEM_LOG_DIRTY_PAGES
from kvmmu.memtype import MemType
from kvmmu.plugins.virtio_gpu.config import VirtioGpuConfig

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = [
    "VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE",
    "VIRTIO_GPU_BLOB_MEM_HOST3D",
    "VIRTIO_GPU_MAP_CACHE",
    "VIRTIO_GPU_SHM_ID_HOST_VISIBLE",
    "Blob",
    "VirtioGpuDevice",
    "VirtioGpuError",
]

#: [VSPEC] constants (spec/consumers.md §3.1).
VIRTIO_GPU_SHM_ID_HOST_VISIBLE = 1
VIRTIO_GPU_BLOB_MEM_HOST3D = 2
VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE = 1
VIRTIO_GPU_MAP_CACHE: dict[str, int] = {"NONE": 0x00, "CACHED": 0x01, "UNCACHED": 0x02, "WC": 0x03}
_PAGE = 0x1000


class VirtioGpuError(Exception):
    """A command the device answers with an error response (``resp`` names it)."""

    def __init__(self, resp: str, message: str) -> None:
        super().__init__(f"{resp}: {message}")
        self.resp = resp


@dataclass
class Blob:
    """A host-visible blob resource and where it is mapped (if it is)."""

    resource_id: int
    size: int
    map_info: str = "WC"
    offset: int | None = None
    slot: int | None = None

    @property
    def mapped(self) -> bool:
        return self.offset is not None


class VirtioGpuDevice:
    """The device model: region, blobs, memslots, host mappings."""

    def __init__(self, vm: VM, config: VirtioGpuConfig) -> None:
        self.vm = vm
        self.config = config
        self.blobs: dict[int, Blob] = {}
        #: memslot id -> (base gfn, npages) of every memslot the device owns.
        self.slots: dict[int, tuple[int, int]] = {}
        self.bar_gfn = config.bar_gpa >> 12
        self.bar_npages = config.bar_size >> 12
        self.host_memtype = MemType.from_label(config.host_memtype)
        #: Dirty logging is on for the device's memslots (migration running).
        self.migrating = False

    # ------------------------------------------------------------- setup
    def realize(self) -> None:
        """Create the region; with ``slot_layout="bar"`` back it and add its memslot."""
        c = self.config
        if c.slot_layout == "bar":
            self._host_map(c.bar_hva, c.bar_size, c.bar_hpa)
            self.vm.set_user_memory_region(c.first_slot, 0, c.bar_gpa, c.bar_size, c.bar_hva)
            self.slots[c.first_slot] = (self.bar_gfn, self.bar_npages)
        for b in c.blobs:
            self.create_blob(b.resource_id, b.size, map_info=b.map_info)
            if b.offset is not None:
                self.map_blob(b.resource_id, b.offset)

    def _host_map(self, hva: int, size: int, hpa: int) -> None:
        host = self.vm.host
        if self.config.backing == "vram":
            host.map_mmio(hva, size, hpa=hpa, memtype=self.host_memtype)
        else:
            host.mmap_anon(hva, size)

    # ------------------------------------------------------------ blobs
    def create_blob(self, resource_id: int, size: int, *, map_info: str = "WC") -> Blob:
        """``RESOURCE_CREATE_BLOB`` (blob_mem HOST3D, flags USE_MAPPABLE)."""
        if resource_id in self.blobs:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID", f"resource {resource_id} exists"
            )
        if size <= 0 or size % _PAGE:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER",
                f"blob size {size:#x} is not a positive multiple of 4 KiB",
            )
        if map_info not in VIRTIO_GPU_MAP_CACHE:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER",
                f"map_info {map_info!r} is not a VIRTIO_GPU_MAP_CACHE_* value",
            )
        blob = Blob(resource_id, size, map_info)
        self.blobs[resource_id] = blob
        return blob

    def _blob(self, resource_id: int) -> Blob:
        blob = self.blobs.get(resource_id)
        if blob is None:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID", f"no resource {resource_id}"
            )
        return blob

    def map_blob(self, resource_id: int, offset: int) -> int:
        """``RESOURCE_MAP_BLOB``: map at ``offset``; return ``map_info`` (RESP_OK_MAP_INFO)."""
        blob = self._blob(resource_id)
        if blob.mapped:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER",
                f"resource {resource_id} is already mapped (driver MUST NOT)",
            )
        if offset % _PAGE or offset < 0 or offset + blob.size > self.config.bar_size:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER",
                f"offset {offset:#x} does not fit the region",
            )
        for other in self.blobs.values():
            if other.offset is not None and (
                other.offset < offset + blob.size and offset < other.offset + other.size
            ):
                raise VirtioGpuError(
                    "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER",
                    f"offset {offset:#x} overlaps resource {other.resource_id}",
                )
        c = self.config
        hva = c.bar_hva + offset
        if c.slot_layout == "per_blob":
            slot = self._free_slot()
            self._host_map(hva, blob.size, c.bar_hpa + offset)
            self.vm.set_user_memory_region(
                slot, self._slot_flags(), c.bar_gpa + offset, blob.size, hva
            )
            self.slots[slot] = ((c.bar_gpa + offset) >> 12, blob.size >> 12)
            blob.slot = slot
        blob.offset = offset
        return VIRTIO_GPU_MAP_CACHE[blob.map_info]

    def unmap_blob(self, resource_id: int) -> None:
        """``RESOURCE_UNMAP_BLOB``: QEMU deletes the sub-region's memslot (or, with
        one region slot, the host mapping goes away and MMU notifiers zap)."""
        blob = self._blob(resource_id)
        if blob.offset is None:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER", f"resource {resource_id} is not mapped"
            )
        c = self.config
        hva = c.bar_hva + blob.offset
        if blob.slot is not None:
            self.vm.set_user_memory_region(blob.slot, 0, c.bar_gpa + blob.offset, 0, hva)
            del self.slots[blob.slot]
            self.vm.host.munmap(hva, blob.size)
            blob.slot = None
        else:
            self.vm.invalidate_hva_range(hva, hva + blob.size)
        blob.offset = None

    def _free_slot(self) -> int:
        slot = self.config.first_slot
        while slot in self.slots or self.vm.memslots.id_to_memslot(0, slot) is not None:
            slot += 1
        return slot

    def _slot_flags(self) -> int:
        return KVM_MEM_LOG_DIRTY_PAGES if self.migrating else 0

    # ------------------------------------------------------------ queries
    def blob_gpa(self, resource_id: int) -> int:
        blob = self._blob(resource_id)
        if blob.offset is None:
            raise VirtioGpuError(
                "VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER", f"resource {resource_id} is not mapped"
            )
        return self.config.bar_gpa + blob.offset

    def owns_gfn(self, gfn: int) -> bool:
        """The gfn lies in one of the device's memslots."""
        if not self.bar_gfn <= gfn < self.bar_gfn + self.bar_npages:
            return False
        return any(base <= gfn < base + n for base, n in self.slots.values())

    def host_memtype_at(self, hpa: int) -> MemType:
        """The host mapping type of the buffer behind ``hpa``.

        ``vram``: the type ``HostMemory`` holds for the MMIO range. ``sysmem``:
        the GPU driver's mapping type (``host_memtype``); the host RAM pfn
        itself reads WB in ``HostMemory`` (KVM does not see the VMA type).
        """
        if self.config.backing == "vram":
            return MemType(self.vm.host.memtype_of(hpa))
        return self.host_memtype

    def set_logging(self, on: bool) -> None:
        """Set or clear ``KVM_MEM_LOG_DIRTY_PAGES`` on every device memslot (migration)."""
        self.migrating = on
        flags = self._slot_flags()
        for slot, (base, npages) in sorted(self.slots.items()):
            ms = self.vm.memslots.id_to_memslot(0, slot)
            assert ms is not None
            self.vm.set_user_memory_region(slot, flags, base << 12, npages << 12, ms.userspace_addr)
