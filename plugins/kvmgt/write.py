"""The guest-write handler of the shadow PPGTT (spec/consumers.md W1–W12).

``ppgtt_write_protection_handler`` -> ``ppgtt_handle_guest_write_page_table_bytes``
-> ``ppgtt_handle_guest_write_page_table`` and the post-shadow flush
``intel_vgpu_flush_post_shadow`` (``drivers/gpu/drm/i915/gvt/gtt.c``).
The out-of-sync path (W12) is compiled out, as ``enable_out_of_sync = false``
makes it in the kernel.
"""

from __future__ import annotations

import errno

from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SIZE
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.gtt import GttType
from kvmmu.plugins.kvmgt.ppgtt import Spt, VgpuGtt

__all__ = ["ShadowPpgtt"]

T = GttType
#: ``enable_out_of_sync`` (W12): false in every kernel the spec cites.
ENABLE_OUT_OF_SYNC = False


class ShadowPpgtt(VgpuGtt):
    """:class:`VgpuGtt` plus the write-protection handler and the post-shadow flush."""

    def write_protection_handler(self, priv: object, gpa: int, data: bytes) -> None:
        """``ppgtt_write_protection_handler``: only 4- or 8-byte writes (W1).

        Any other size is ``EINVAL`` and the shadow is not touched; guest
        memory already holds the bytes, so that entry stays different from
        its shadow until it is shadowed again (recorded in ``spt.stale``).
        """
        assert isinstance(priv, Spt)
        spt = priv
        index = (gpa & (PAGE_SIZE - 1)) >> 3
        if len(data) not in (4, 8):
            spt.stale.add(index)
            raise KvmError(
                errno.EINVAL,
                f"kvmgt: {len(data)}-byte write to PPGTT page gfn {spt.gfn:#x} at gpa "
                f"{gpa:#x}: only 4- or 8-byte writes are handled (W1)",
            )
        self.handle_write_bytes(spt, gpa, len(data))

    def handle_write_bytes(self, spt: Spt, gpa: int, nbytes: int) -> None:
        """``ppgtt_handle_guest_write_page_table_bytes`` (W2–W6).

        W2: index = ``(gpa & 0xfff) >> 3``, so both halves hit one entry.
        W3: the written data is ignored; the whole entry is re-read.
        W4: a write to a non-16th slot of a 64K table is ignored.
        W5: 8 bytes -> full update now. W6: 4 bytes -> shadow at scratch,
        real update deferred to the next submission's flush.
        """
        index = (gpa & (PAGE_SIZE - 1)) >> 3
        g = self.get_guest(spt, index)
        if g is None:
            spt.stale.add(index)
            raise KvmError(errno.EFAULT, f"kvmgt: cannot read guest entry at gpa {gpa:#x}")
        we, wt = g
        if wt == T.PPGTT_PTE_64K_ENTRY and index % gtt.GTT_64K_PTE_STRIDE:
            return  # "Ignore write to unused PTE entry" (W4)
        try:
            if nbytes == 8:
                self.handle_write_page_table(spt, we, wt, index)
            elif index not in spt.post_shadow:
                se, st = self.get_shadow(spt, index)
                self.remove_entry(spt, se, st, index)
                self.set_shadow(spt, index, gtt.set_pfn(se, st, self.scratch_pt[spt.shadow_type]))
            else:
                # The bit is already set and a full write since the first half
                # does not clear it (gtt.c ppgtt_handle_guest_write_page_table
                # leaves post_shadow_bitmap alone): the kernel keeps the shadow
                # the full write made while the guest entry changes, until the
                # flush re-reads it. Model bookkeeping for the invariants.
                spt.stale.add(index)
        except KvmError:
            spt.stale.add(index)
            raise
        if nbytes != 8:
            self.set_post_shadow(spt, index)

    def set_post_shadow(self, spt: Spt, index: int) -> None:
        """``ppgtt_set_post_shadow``: set the bit; queue the spt once."""
        spt.post_shadow.add(index)
        if spt not in self.post_shadow_list:
            self.post_shadow_list.append(spt)

    def handle_write_page_table(self, spt: Spt, we: int, wt: GttType, index: int) -> None:
        """``ppgtt_handle_guest_write_page_table`` (W7): add the new, then remove the old.

        "Adding the new entry first and then removing the old one" keeps the
        table valid in between; rewriting a PDE with the same value therefore
        keeps its child (refcount +1 then -1). A non-present new entry leaves
        a scratch entry built from the old one (all 16 slots of a split 64K
        entry; PS cleared for a 2M/1G one). Decision (§5 Q11): the 15 other
        slots of a split 64K entry are DMA-unmapped too.
        """
        old_se, old_t = self.get_shadow(spt, index)
        tail: list[tuple[int, GttType]] = []
        if old_se & gtt.GTT_SPTE_FLAG_64K_SPLITED and index % gtt.GTT_64K_PTE_STRIDE == 0:
            tail = [self.get_shadow(spt, index + k) for k in range(1, gtt.GTT_64K_PTE_STRIDE)]
        new_present = gtt.test_present(we, wt)
        if new_present:
            self.add_entry(spt, we, wt, index)
        self.remove_entry(spt, old_se, old_t, index)
        for v, t in tail:
            if v & gtt.GTT_SPTE_FLAG_64K_SPLITED and gtt.test_present(v, t):
                self.invalidate_pte(spt, v, t)
        if not new_present:
            scratch = self.scratch_pt[spt.shadow_type]
            if tail:
                v = old_se & ~gtt.GTT_SPTE_FLAG_64K_SPLITED
                v = gtt.set_pfn(v, old_t, scratch)
                for k in range(gtt.GTT_64K_PTE_STRIDE):
                    self.set_shadow(spt, index + k, v)
            elif old_t in (T.PPGTT_PTE_2M_ENTRY, T.PPGTT_PTE_1G_ENTRY):
                v, t = gtt.clear_pse(old_se, old_t)
                self.set_shadow(spt, index, gtt.set_pfn(v, t, scratch))
            else:
                self.set_shadow(spt, index, gtt.set_pfn(old_se, old_t, scratch))
        spt.stale.discard(index)

    def flush_post_shadow(self) -> int:
        """``intel_vgpu_flush_post_shadow`` (L3 step 4): re-read and apply W7.

        Returns the number of entries flushed. An error stops the flush with
        the remaining bits still set, as the kernel returns it.
        """
        done = 0
        for spt in list(self.post_shadow_list):
            if self.spts.get(spt.mfn) is not spt:
                continue  # freed by an earlier entry of this flush
            for index in sorted(spt.post_shadow):
                g = self.get_guest(spt, index)
                if g is None:
                    raise KvmError(
                        errno.EFAULT,
                        f"kvmgt: flush: guest entry of gfn "
                        f"{spt.gfn:#x} index {index} is unreadable",
                    )
                try:
                    self.handle_write_page_table(spt, g[0], g[1], index)
                except KvmError:
                    spt.stale.add(index)
                    raise
                spt.post_shadow.discard(index)
                done += 1
            if spt in self.post_shadow_list:
                self.post_shadow_list.remove(spt)
        return done
