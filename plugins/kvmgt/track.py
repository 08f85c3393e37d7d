"""GVT page tracking and the KVMGT protect table.

Two layers sit between a shadow page table and KVM's write tracking:

* GVT's ``page_track_tree`` (``drivers/gpu/drm/i915/gvt/page_track.c``): gfn ->
  ``{handler, priv_data, tracked}``; register only records, enable
  write-protects (spec/consumers.md G2–G4).
* KVMGT's protect table ``ptable`` (``drivers/gpu/drm/i915/gvt/kvmgt.c``): the
  gfns KVMGT has write-tracked in KVM, so KVM's counter moves at most once per
  gfn (G3); ``track_remove_region`` only forgets entries (L6).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmmu.errors import KvmError

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = ["GvtPageTrack", "Handler", "PageTrackRecord", "ProtectTable"]

#: A page-track handler: ``handler(priv, gpa, data)`` (``gvt_page_track_handler_t``).
Handler = Callable[[Any, int, bytes], None]


class ProtectTable:
    """``kvmgt_protect_table_*`` plus ``intel_gvt_page_track_add/remove`` (G3, L6, L7)."""

    def __init__(self, vm: VM, attached: Callable[[], bool]) -> None:
        self.vm = vm
        self._attached = attached
        self.gfns: set[int] = set()
        self.kvm_adds = 0
        self.kvm_removes = 0

    def add(self, gfn: int) -> None:
        """``intel_gvt_page_track_add``: ESRCH unless attached; KVM at most once per gfn."""
        if not self._attached():
            raise KvmError(errno.ESRCH, f"kvmgt: page_track_add gfn {gfn:#x}: vGPU not attached")
        if gfn in self.gfns:
            return
        self.vm.write_track_add_gfn(gfn)
        self.kvm_adds += 1
        self.gfns.add(gfn)

    def remove(self, gfn: int) -> None:
        """``intel_gvt_page_track_remove``: KVM only if attached and in the table."""
        if not self._attached() or gfn not in self.gfns:
            return
        self.vm.write_track_remove_gfn(gfn)
        self.kvm_removes += 1
        self.gfns.discard(gfn)

    def remove_region(self, gfn: int, nr_pages: int) -> int:
        """``kvmgt_page_track_remove_region`` (v6.6+): forget entries, no KVM call (L6)."""
        hit = [g for g in self.gfns if gfn <= g < gfn + nr_pages]
        for g in hit:
            self.gfns.discard(g)
        return len(hit)

    def destroy(self) -> None:
        """``kvmgt_protect_table_destroy``: entries freed, no KVM calls (L7)."""
        self.gfns.clear()


@dataclass
class PageTrackRecord:
    """``struct intel_vgpu_page_track``."""

    handler: Handler
    priv: Any
    tracked: bool = False


class GvtPageTrack:
    """``intel_vgpu_{register,unregister,enable,disable}_page_track`` (G2–G4)."""

    def __init__(self, ptable: ProtectTable) -> None:
        self.ptable = ptable
        self.records: dict[int, PageTrackRecord] = {}

    def find(self, gfn: int) -> PageTrackRecord | None:
        """``intel_vgpu_find_page_track``."""
        return self.records.get(gfn)

    def register(self, gfn: int, handler: Handler, priv: Any) -> None:
        """G2: EEXIST if the gfn already has a record; no write-protection yet."""
        if gfn in self.records:
            raise KvmError(errno.EEXIST, f"kvmgt: gfn {gfn:#x} already has a page-track record")
        self.records[gfn] = PageTrackRecord(handler, priv)

    def unregister(self, gfn: int) -> None:
        """G4: delete the record; a tracked one loses write-protection."""
        rec = self.records.pop(gfn, None)
        if rec is not None and rec.tracked:
            self.ptable.remove(gfn)

    def enable(self, gfn: int) -> None:
        """G3: ENXIO without a record; no-op if already tracked."""
        rec = self.records.get(gfn)
        if rec is None:
            raise KvmError(errno.ENXIO, f"kvmgt: enable_page_track gfn {gfn:#x}: no record")
        if rec.tracked:
            return
        self.ptable.add(gfn)
        rec.tracked = True

    def disable(self, gfn: int) -> None:
        """``intel_vgpu_disable_page_track``: ENXIO without a record."""
        rec = self.records.get(gfn)
        if rec is None:
            raise KvmError(errno.ENXIO, f"kvmgt: disable_page_track gfn {gfn:#x}: no record")
        if not rec.tracked:
            return
        self.ptable.remove(gfn)
        rec.tracked = False
