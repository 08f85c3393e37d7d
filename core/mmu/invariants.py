"""The TDP MMU's own invariants, checked over the whole pool with numpy.

Each violated rule becomes one message naming the rule and its source:

* every present leaf maps a gfn of a live (non-INVALID) slot to the pfn the
  slot's hva gives now (MMU-notifier correctness, spec/kvm-mmu.md §3.5);
* no writable SPTE for a write-tracked gfn or in a READONLY slot (§2.3, §3.5);
* no *writable* huge SPTE over a frame whose ``disallow_lpage`` is non-zero
  (kvm-mmu-2.md §5.1; a huge SPTE that existed before the count went up
  stays, write-protected, exactly as in KVM);
* no table of an invalid (obsolete) root reachable from a vCPU's root (§3.14);
* W ⇒ MMU-writable ⇒ host-writable (spte.h, §4.4);
* no shadow-present leaf has a bit of the format's ``rsvd_mask`` set (bit 11
  with the MMU-present bit high: VT-d reserves it; spec/consumers.md T6).
"""

from __future__ import annotations

import numpy as np
from kvmmu import spte as S
from kvmmu.mmu.tdp import TdpBase

__all__ = ["InvariantsMixin"]

_PS = np.uint64(S.PT_PAGE_SIZE_MASK)
_W = np.uint64(S.PT_WRITABLE_MASK)
_MAX_MSGS = 20


class InvariantsMixin(TdpBase):
    """``check_invariants`` and counters."""

    def leaves(self, as_id: int | None = None) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Present leaves per table: ``(table, level, gfns, sptes)`` arrays."""
        out = []
        for root in self.valid_roots(as_id):
            for idx, level, i0, i1 in self.walk_tables(root.idx, 0, 1 << 62):
                ents = self.pool.data[idx, i0:i1]
                sel = (ents & self._np_present) != 0
                if level > 1:
                    sel &= (ents & _PS) != 0
                hit = np.flatnonzero(sel)
                if hit.size:
                    span = S.KVM_PAGES_PER_HPAGE(level)
                    gfns = int(self.pool.gfn[idx]) + (hit + i0).astype(np.int64) * span
                    out.append((idx, level, gfns, ents[hit].copy()))
        return out

    def check_invariants(self) -> list[str]:
        """Return the violated MMU invariants (empty when all hold)."""
        msgs: list[str] = []
        fmt = self.fmt
        vm = self.vm
        host = vm.host
        mw = np.uint64(fmt.mmu_writable_mask)
        hw = np.uint64(fmt.host_writable_mask)
        rsvd = np.uint64(fmt.rsvd_mask)
        for root in self.valid_roots():
            for _idx, level, gfns, sptes in self.leaves(root.as_id):
                if len(msgs) >= _MAX_MSGS:
                    return msgs
                w = (sptes & _W) != 0
                bad = w & ((sptes & mw) == 0)
                if bad.any():
                    msgs.append(
                        f"spte.h W=>MMU-writable: gfn {int(gfns[bad][0]):#x} "
                        "is W without MMU-writable"
                    )
                if rsvd:
                    bad = (sptes & rsvd) != 0
                    if bad.any():
                        msgs.append(
                            f"T6 reserved bit {int(rsvd):#x} set in the SPTE of gfn "
                            f"{int(gfns[bad][0]):#x}"
                        )
                bad = ((sptes & mw) != 0) & ((sptes & hw) == 0)
                if bad.any():
                    msgs.append(f"spte.h MMU-writable=>host-writable: gfn {int(gfns[bad][0]):#x}")
                span = S.KVM_PAGES_PER_HPAGE(level)
                for j, gfn in enumerate(gfns.tolist()):
                    spte = int(sptes[j])
                    msg = self._check_leaf(root.as_id, gfn, level, span, spte, host)
                    if msg:
                        msgs.append(msg)
                        if len(msgs) >= _MAX_MSGS:
                            return msgs
        for entry in self._vcpu_roots.values():
            for as_id, r in entry[1].items():
                # A vCPU holding an obsolete root reloads before entry; it is a
                # violation only if that root's tables are still walkable.
                if r.invalid and r in self.roots and self.pool.live[r.idx]:
                    msgs.append(f"§3.14 vCPU root of as_id {as_id} is obsolete but still live")
        return msgs

    def _check_leaf(
        self, as_id: int, gfn: int, level: int, span: int, spte: int, host: object
    ) -> str | None:
        vm = self.vm
        slot = vm.memslots.gfn_to_memslot(gfn, as_id)
        last = gfn + span - 1
        if slot is None or slot.is_invalid or last >= slot.end_gfn:
            return f"§3.5 leaf for gfn {gfn:#x} (level {level}) is not inside a live memslot"
        writable = bool(spte & S.PT_WRITABLE_MASK)
        if writable and slot.is_readonly:
            return f"§3.5 writable SPTE for gfn {gfn:#x} in READONLY slot {slot.id}"
        pfn = S.spte_to_pfn(spte)
        hva = slot.gfn_to_hva(gfn)
        vma = vm.host.find_vma(hva)
        if vma is None:
            return f"§3.5 SPTE for gfn {gfn:#x} maps pfn {pfn:#x} but hva {hva:#x} has no VMA"
        if not vma.mmio and not vm.host.is_populated(hva):
            return f"§3.5 stale SPTE: gfn {gfn:#x} maps pfn {pfn:#x}, hva {hva:#x} is not populated"
        now = vm.host.hva_to_pfn(hva, write=False)
        if now != pfn:
            return f"§3.5 stale SPTE: gfn {gfn:#x} maps pfn {pfn:#x}, hva gives {now:#x}"
        if level > 1:
            if slot.lpage_info[level][slot.lpage_idx(gfn, level)] and writable:
                return (
                    f"§5.1 writable huge SPTE (level {level}) at gfn {gfn:#x} "
                    "over a disallowed frame"
                )
            if writable:
                track = slot.gfn_write_track
                rel = gfn - slot.base_gfn
                if np.asarray(track[rel : rel + span]).any():
                    return f"§2.3 writable huge SPTE at gfn {gfn:#x} covers a write-tracked gfn"
        elif writable and vm.page_track.is_write_tracked(slot, gfn):
            return f"§2.3 writable SPTE for write-tracked gfn {gfn:#x}"
        return None

    def counts(self) -> dict[str, int]:
        """Present leaf SPTEs by level, tables in use, and roots."""
        out: dict[str, int] = {"tables": int(self.pool.allocated), "roots": len(self.valid_roots())}
        for _, level, gfns, _ in self.leaves():
            key = f"leaf_sptes_level{level}"
            out[key] = out.get(key, 0) + len(gfns)
        out["mapped_gfns"] = sum(
            v * S.KVM_PAGES_PER_HPAGE(int(k[-1])) for k, v in out.items() if k.startswith("leaf_")
        )
        return out

    def stats(self) -> dict[str, int]:
        """:meth:`counts` plus the pool's capacity and bytes."""
        out = self.counts()
        out["pool_capacity"] = self.pool.capacity
        out["pool_bytes"] = self.pool.nbytes()
        return out
