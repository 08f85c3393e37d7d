"""The ``[plugins.virtio_gpu]`` config section (pydantic, ``extra="forbid"``)."""

from __future__ import annotations

from typing import Literal

from kvmmu.plugins.virtio_gpu.designs import Design
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BlobConfig", "MemTypeLabel", "VirtioGpuConfig"]

#: A memory type by its report label (``kvmmu.memtype.MemType.label``).
MemTypeLabel = Literal["UC", "WC", "WT", "WP", "WB", "UC-"]

_PAGE = 0x1000


class BlobConfig(BaseModel):
    """A host-visible blob resource (``VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB``).

    ``offset`` set: the driver maps it at that BAR offset when the VM starts
    (``VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB``); ``None``: created, not mapped.
    ``map_info`` is the ``VIRTIO_GPU_MAP_CACHE_*`` the host reports [VSPEC].
    """

    model_config = ConfigDict(extra="forbid")

    resource_id: int = Field(ge=1, description="virtio-gpu resource id")
    size: int = Field(gt=0, description="bytes, a multiple of 4 KiB")
    offset: int | None = Field(None, ge=0, description="BAR offset to map it at, or unmapped")
    map_info: Literal["NONE", "CACHED", "UNCACHED", "WC"] = Field(
        "WC", description="VIRTIO_GPU_MAP_CACHE_* reported in RESP_OK_MAP_INFO"
    )

    @model_validator(mode="after")
    def _aligned(self) -> BlobConfig:
        if self.size % _PAGE or (self.offset is not None and self.offset % _PAGE):
            raise ValueError("blob size and offset must be multiples of 4 KiB")
        return self


class VirtioGpuConfig(BaseModel):
    """Options of the ``virtio_gpu`` consumer plugin."""

    model_config = ConfigDict(extra="forbid")

    design: Design = Field(
        Design.TODAY,
        description="today | kvm_mem_dma | kvm_mem_wc | virtio_noncoherent (docs/virtio-gpu.md)",
    )
    report_designs: list[Design] | None = Field(
        None,
        description="designs the report's hazard table covers (default: this VM's design); "
        "list all four to compare them under `kvmmu compare`",
    )
    kvm_mem_dma_scope: Literal["slot", "vm"] = Field(
        "slot",
        description="kvm_mem_dma: 'slot' honours guest PAT in the slot only; 'vm' is the 2020 "
        "RFC v1 (creating the slot registers noncoherent DMA for the whole VM)",
    )
    mmio_guard: bool = Field(
        True, description="keep host MMIO at EPT UC inside the slot (false: the pre-guard attempt)"
    )
    backing: Literal["sysmem", "vram"] = Field(
        "sysmem",
        description="host memory behind blobs: 'sysmem' (RAM pages the host GPU driver maps WC) "
        "or 'vram' (a host GPU BAR: MMIO pfns)",
    )
    slot_layout: Literal["per_blob", "bar"] = Field(
        "per_blob",
        description="'per_blob': each mapped blob is its own memslot (QEMU virgl); 'bar': one "
        "memslot covers the whole host-visible region",
    )
    host_memtype: MemTypeLabel = Field("WC", description="host mapping type of GPU buffers")
    migration_reader_memtype: MemTypeLabel = Field(
        "WB", description="type the VMM's migration thread reads the region with (cached)"
    )
    migration_mitigation: Literal["none", "flush", "force_wb", "block"] = Field(
        "flush", description="spec/consumers.md H4: what the VMM/KVM does about H3"
    )
    bar_gpa: int = Field(0x1_0000_0000, ge=0, description="guest physical base of the region")
    bar_size: int = Field(0x100_0000, gt=0, description="size of the host-visible region")
    bar_hva: int = Field(0x7E00_0000_0000, ge=0, description="VMM virtual base of the region")
    bar_hpa: int = Field(0xC000_0000, ge=0, description="host physical base (backing='vram')")
    first_slot: int = Field(16, ge=0, le=32000, description="first memslot id the device uses")
    blobs: list[BlobConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _layout(self) -> VirtioGpuConfig:
        for name in ("bar_gpa", "bar_size", "bar_hva", "bar_hpa"):
            if getattr(self, name) % _PAGE:
                raise ValueError(f"{name} must be a multiple of 4 KiB")
        ids = [b.resource_id for b in self.blobs]
        if len(ids) != len(set(ids)):
            raise ValueError("blob resource ids must be unique")
        for b in self.blobs:
            if b.offset is not None and b.offset + b.size > self.bar_size:
                raise ValueError(f"blob {b.resource_id} does not fit in the region")
        return self
