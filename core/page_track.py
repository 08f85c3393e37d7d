"""Write tracking and the page-track notifier chain (6.6+ API).

``kvm_write_track_add_gfn`` / ``kvm_write_track_remove_gfn`` keep a per-gfn
``unsigned short`` counter in the memslot (``slot->arch.gfn_write_track``);
a tracked gfn is write-protected at once, loses huge pages, and is never
mapped writable while tracked (``arch/x86/kvm/mmu/page_track.c``;
spec/kvm-mmu.md §2.2–2.3). Notifiers are plugins implementing
``kvmmu_track_write`` / ``kvmmu_track_remove_region``, called newest first;
KVM's own shadow-MMU handling (``kvm_mmu_track_write``) runs after them.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np
from kvmmu.errors import KvmError, PluginError

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot
    from kvmmu.vm import VM

__all__ = ["USHRT_MAX", "PageTrack"]

#: The counters are ``unsigned short`` (``gfn_write_track[]``).
USHRT_MAX = 0xFFFF


class PageTrack:
    """The VM's write-tracking state and notifier dispatch."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        #: ``kvm_page_track_write`` calls (emulated writes that reached notifiers).
        self.writes = 0

    def _slot_for(self, gfn: int, op: str) -> Memslot:
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        # spec/kvm-mmu.md §2.2: -EINVAL only when gfn_to_memslot finds no slot;
        # it does not skip the INVALID copy of a slot being deleted (which
        # shares the old slot's counters), so a track_remove_region notifier
        # may still add or remove gfns of that slot.
        if slot is None:
            raise KvmError(
                errno.EINVAL,
                f"{op}: gfn {gfn:#x} is not in any memslot (kvm_write_track_{op}_gfn)",
            )
        return slot

    def add_gfn(self, gfn: int) -> None:
        """``kvm_write_track_add_gfn``: look the slot up (EINVAL if none), then track."""
        self.add_gfn_in_slot(self._slot_for(gfn, "add"), gfn)

    def remove_gfn(self, gfn: int) -> None:
        """``kvm_write_track_remove_gfn``: look the slot up (EINVAL if none), then untrack."""
        self.remove_gfn_in_slot(self._slot_for(gfn, "remove"), gfn)

    def add_gfn_in_slot(self, slot: Memslot, gfn: int) -> None:
        """``__kvm_write_track_add_gfn``: count +1, disallow huge pages, write-protect.

        PT-68: the counter goes up, the gfn is disallowed at every huge level,
        and every SPTE mapping it (huge ones included) loses W and
        MMU-writable, followed by a ranged flush. Also KVM's own use for
        non-leaf shadowed guest tables (``account_shadowed``, spec §2.4), which
        may run on a slot being deleted (INVALID).
        """
        self.vm.memslots.enable_write_tracking()
        if int(slot.gfn_write_track[gfn - slot.base_gfn]) >= USHRT_MAX:
            # KVM WARNs and drops the update; the model refuses it visibly.
            raise KvmError(
                errno.EINVAL,
                f"add: write-track count of gfn {gfn:#x} would exceed USHRT_MAX "
                "(KVM WARN_ON_ONCE and drops the update)",
            )
        slot.update_gfn_write_track(gfn, +1)
        slot.disallow_lpage(gfn)
        self.vm.mmu.write_protect_gfn(slot, gfn)

    def remove_gfn_in_slot(self, slot: Memslot, gfn: int) -> None:
        """``__kvm_write_track_remove_gfn``: count -1 and allow huge pages again.

        There is no un-protect: write access comes back lazily on the next
        fault (spec/kvm-mmu.md §2.1).
        """
        if not self.is_write_tracked(slot, gfn):
            raise KvmError(
                errno.EINVAL,
                f"remove: gfn {gfn:#x} is not write-tracked; the count cannot go below 0 "
                "(KVM WARN_ON_ONCE and drops the update)",
            )
        slot.update_gfn_write_track(gfn, -1)
        slot.allow_lpage(gfn)

    def is_write_tracked(self, slot: Memslot | None, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked``: slot, tracking enabled, counter non-zero."""
        return slot is not None and bool(slot.gfn_write_track[gfn - slot.base_gfn])

    def count(self, gfn: int) -> int:
        """The write-track counter of ``gfn`` (0 outside every slot)."""
        slot = self.vm.memslots.gfn_to_memslot(gfn)
        return 0 if slot is None else int(slot.gfn_write_track[gfn - slot.base_gfn])

    def check_invariants(self) -> list[str]:
        """Every tracked gfn is disallowed at every huge level (spec/kvm-mmu.md §2.3 item 3)."""
        out: list[str] = []
        for slot in self.vm.memslots.all_slots():
            tracked = np.flatnonzero(slot.gfn_write_track).astype(np.int64) + slot.base_gfn
            if not tracked.size:
                continue
            for level, counts in slot.lpage_info.items():
                shift = 9 * (level - 1)
                idx = (tracked >> shift) - (slot.base_gfn >> shift)  # lpage_idx, vectorised
                bad = tracked[counts[idx] <= 0]
                if bad.size:
                    out.append(
                        f"page_track: slot {slot.id}: tracked gfn {int(bad[0]):#x} has a "
                        f"level-{level} disallow count of 0"
                    )
        return out

    def external_users(self) -> list[str]:
        """The plugins that are page-track notifier nodes right now.

        A plugin implementing ``kvmmu_track_write`` or
        ``kvmmu_track_remove_region`` is a registered node
        (``kvm_page_track_register_notifier``), unless it says otherwise with a
        false ``page_track_registered`` attribute (KVMGT registers its node
        only while a vGPU is attached).
        """
        host = self.vm.plugins
        names: list[str] = []
        for hook in ("kvmmu_track_write", "kvmmu_track_remove_region"):
            for name, _fn, _args in host.impls(hook):
                obj = host.get(name)
                registered = obj is not None and getattr(obj, "page_track_registered", True)
                if registered and name not in names:
                    names.append(name)
        return names

    def track_write(self, gpa: int, new: bytes) -> None:
        """``kvm_page_track_write``: notifiers newest first, then the shadow MMU.

        The bytes have already landed. A notifier that raises does not stop
        the others or KVM's own handling; its error is raised afterwards,
        naming the plugin and the hook (issue 6 item 5).
        """
        self.writes += 1
        err: PluginError | None = None
        try:
            self.vm.plugins.call("kvmmu_track_write", vm=self.vm, gpa=gpa, new=bytes(new))
        except PluginError as e:
            err = e
        self.vm.mmu.track_write(gpa, bytes(new))
        if err is not None:
            raise err

    def remove_region(self, slot: Memslot) -> None:
        """``kvm_page_track_delete_slot`` -> ``track_remove_region`` (DELETE only)."""
        self.vm.plugins.call(
            "kvmmu_track_remove_region", vm=self.vm, gfn=slot.base_gfn, nr_pages=slot.npages
        )
