"""The ``[plugins.kvmgt]`` config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["KvmgtConfig"]


class KvmgtConfig(BaseModel):
    """Options of the KVMGT consumer (every field has a default)."""

    model_config = ConfigDict(extra="forbid")

    gen: int = Field(9, ge=8, le=12, description="GPU generation: 8 (BDW) .. 12")
    gamw_eco_64k_ips: bool = Field(
        True, description="gen9/10: the guest set GAMW_ECO_ENABLE_64K_IPS_FIELD (64K pages)"
    )
    has_2m_gtt: bool = Field(
        True, description="HAS_PAGE_SIZES(I915_GTT_PAGE_SIZE_2M): 2M shadow entries allowed"
    )
    vgpus: int = Field(1, ge=1, le=8, description="vGPUs created on the GVT device")
    attach: bool = Field(True, description="open vGPU 0 on this VM at vm_init (G1)")
    bar0_gpa: int = Field(
        0xF000_0000, ge=0, description="guest physical address of BAR0 (16 MiB, 4 GiB aligned-down)"
    )
    gm_size: int = Field(4 << 30, description="graphics-memory space (GGTT covers it)")
    aperture_base: int = Field(0x0800_0000, ge=0, description="vGPU aperture GM base")
    aperture_size: int = Field(64 << 20, ge=0, description="vGPU aperture GM size")
    hidden_base: int = Field(0x4000_0000, ge=0, description="vGPU hidden GM base")
    hidden_size: int = Field(384 << 20, ge=0, description="vGPU hidden GM size")
    max_shadow_pages: int | None = Field(
        4096, ge=1, description="host pages for shadow tables before reclaim (L4); null: no cap"
    )
    kernel_hva: int = Field(
        0x7F00_0000_0000, description="host VA where the model maps GVT's own pages"
    )

    @model_validator(mode="after")
    def _ranges(self) -> KvmgtConfig:
        if self.bar0_gpa % (16 << 20) or self.bar0_gpa + (16 << 20) > 1 << 32:
            raise ValueError(
                "bar0_gpa must be 16 MiB aligned and BAR0 must end below 4 GiB "
                "(the guest reaches it with paging off)"
            )
        if self.gm_size % (1 << 12) or not 0 < self.gm_size <= 4 << 30:
            raise ValueError("gm_size must be a multiple of 4 KiB in (0, 4 GiB] (8 MiB of GTT)")
        for name in ("aperture", "hidden"):
            base, size = getattr(self, f"{name}_base"), getattr(self, f"{name}_size")
            if base % 4096 or size % 4096 or base + size > self.gm_size:
                raise ValueError(
                    f"{name}_base/{name}_size must be 4 KiB aligned and inside gm_size "
                    f"({self.gm_size:#x})"
                )
        a = (self.aperture_base, self.aperture_base + self.aperture_size)
        h = (self.hidden_base, self.hidden_base + self.hidden_size)
        if a[0] < h[1] and h[0] < a[1]:
            raise ValueError("the vGPU aperture and hidden ranges must not overlap")
        if self.kernel_hva % (2 << 20):
            raise ValueError("kernel_hva must be 2 MiB aligned")
        return self
