"""An example third-party kvmmu plugin, installable on its own.

It watches the page-track notifier chain and the remote-TLB flushes and
reports what it saw; with ``max_flushes`` set it also contributes an
invariant. docs/plugins.md in the kvmmu repository walks through it.
"""

from __future__ import annotations

from typing import Any

from kvmmu import hookimpl
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TracerConfig", "TracerPlugin"]


class TracerConfig(BaseModel):
    """``[plugins.tracer]``."""

    model_config = ConfigDict(extra="forbid")

    max_flushes: int | None = Field(None, ge=0, description="flag more flushes than this")


class TracerPlugin:
    """Counts page-track writes and remote TLB flushes (example plugin)."""

    name = "tracer"
    kind = "consumer"

    def __init__(self, vm: Any, config: TracerConfig | None) -> None:
        self.config = config or TracerConfig()
        self.writes: list[tuple[int, bytes]] = []
        self.flushed_pages = 0
        self.flushes = 0

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[BaseModel]:
        return TracerConfig

    @hookimpl
    def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
        self.writes.append((gpa, new))

    @hookimpl
    def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        self.flushes += 1
        self.flushed_pages += nr_pages

    @hookimpl
    def kvmmu_check_invariants(self) -> list[str]:
        limit = self.config.max_flushes
        if limit is not None and self.flushes > limit:
            return [f"{self.flushes} remote TLB flushes, more than max_flushes={limit}"]
        return []

    @hookimpl
    def kvmmu_report_section(self) -> dict[str, Any]:
        return {
            "track_writes": len(self.writes),
            "flushes": self.flushes,
            "flushed_pages": self.flushed_pages,
        }
