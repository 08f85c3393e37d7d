"""What must hold between a guest PPGTT, its shadow, page tracking and DMA.

Checked by ``kvmmu_check_invariants`` after any step:

* **shadow == guest** — every shadowed guest table translates as its shadow
  does: a present leaf maps the host page backing the guest page (split 64K
  and 2M included), a present pointer points at the spt of the guest's
  gfn, other bits are equal (IPS cleared). An entry whose 4-byte update is
  deferred (W6) may point at scratch instead; entries a refused (W1) or
  failed (W11) update left behind are listed in ``spt.stale`` and skipped.
* **refcounts** — each spt's refcount equals the shadow entries (and shadow
  root pointers) that point at it.
* **tracking** — each guest table gfn has our page-track record, is tracked,
  and (while attached and its slot exists) is in the protect table with a
  KVM write-track count of at least 1.
* **DMA** — the krefs at each DMA address equal the shadow leaves and host
  GGTT entries that use it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.hostmem import PAGE_SHIFT, PAGE_SIZE
from kvmmu.plugins.kvmgt import gtt
from kvmmu.plugins.kvmgt.gtt import GttType

if TYPE_CHECKING:
    from kvmmu.plugins.kvmgt.device import Vgpu
    from kvmmu.plugins.kvmgt.ppgtt import Spt

__all__ = ["check_vgpu"]

T = GttType
_FLAGS_4K = ~gtt.ADDR_4K_MASK & ~gtt.GTT_SPTE_FLAG_MASK & ((1 << 64) - 1)


def _host_pfn(vgpu: Vgpu, gfn: int) -> int | None:
    try:
        hva = int(vgpu.vm.memslots.gfn_to_hva(gfn))
    except KvmError:
        return None
    if not vgpu.vm.host.is_populated(hva):
        return None
    return vgpu.vm.host.hva_to_pfn(hva, write=False)


def _check_leaf4k(vgpu: Vgpu, g: int, gfn: int, s: int, want_flags: int) -> str | None:
    if not s & gtt.GEN8_PAGE_PRESENT:
        return "shadow not present"
    pfn = _host_pfn(vgpu, gfn)
    if pfn is None or gtt.get_pfn(s, T.PPGTT_PTE_4K_ENTRY) != pfn:
        return f"shadow pfn {gtt.get_pfn(s, T.PPGTT_PTE_4K_ENTRY):#x} != host pfn of gfn {gfn:#x}"
    if (s & _FLAGS_4K) != (want_flags & _FLAGS_4K):
        return f"flags {s & _FLAGS_4K:#x} != guest {want_flags & _FLAGS_4K:#x}"
    return None


def _check_entry(
    vgpu: Vgpu, spt: Spt, i: int, g: int, gt: GttType, shadow: np.ndarray
) -> str | None:
    g_gtt = vgpu.gtt
    s = int(shadow[i])
    st = gtt.real_type(gtt.entry_type(spt.shadow_type), s, False)
    scratch = g_gtt.scratch_pt[spt.shadow_type]
    if not gtt.test_present(g, gt):
        if gt == T.PPGTT_PTE_64K_ENTRY:
            slots = [int(shadow[i + k]) for k in range(gtt.GTT_64K_PTE_STRIDE)]
        else:
            slots = [s]
        for v in slots:
            vt = gtt.real_type(gtt.entry_type(spt.shadow_type), v, False)
            if gtt.test_present(v, vt) and gtt.get_pfn(v, vt) != scratch:
                return "guest entry not present but shadow maps something"
        return None
    gfn = gtt.get_pfn(g, gt)
    if not gtt.is_leaf_type(gt):
        child = g_gtt.find_spt_by_mfn(gtt.get_pfn(s, st)) if gtt.test_present(s, st) else None
        if child is None or child.gfn != gfn:
            return f"pointer does not reach the spt of guest gfn {gfn:#x}"
        want = g & ~gtt.GEN8_PDE_IPS_64K if gt == T.PPGTT_PDE_ENTRY else g
        if (s & _FLAGS_4K) != (want & _FLAGS_4K):
            return f"pointer flags {s & _FLAGS_4K:#x} != guest {want & _FLAGS_4K:#x}"
        return None
    if not g_gtt.gfn_is_valid(gfn):
        ok = gtt.get_pfn(s, st) == g_gtt.ggtt_scratch_mfn
        return None if ok else f"guest gfn {gfn:#x} is outside memory but shadow is not scratch"
    if gt == T.PPGTT_PTE_4K_ENTRY:
        return _check_leaf4k(vgpu, g, gfn, s, g)
    if gt == T.PPGTT_PTE_64K_ENTRY:
        for k in range(gtt.GTT_64K_PTE_STRIDE):
            v = int(shadow[i + k])
            if not v & gtt.GTT_SPTE_FLAG_64K_SPLITED:
                return f"split 64K slot {i + k} lacks GTT_SPTE_FLAG_64K_SPLITED"
            err = _check_leaf4k(vgpu, g, gfn + k, v, g)
            if err:
                return f"split 64K slot {i + k}: {err}"
        return None
    if gt == T.PPGTT_PTE_2M_ENTRY:
        if st == T.PPGTT_PTE_2M_ENTRY:
            pfn = _host_pfn(vgpu, gfn)
            if pfn is None or gtt.get_pfn(s, st) != pfn:
                return "2M shadow leaf does not map the guest's 2M page"
            return None
        sub = g_gtt.find_spt_by_mfn(gtt.get_pfn(s, st)) if gtt.test_present(s, st) else None
        if sub is None or sub.gfn is not None:
            return "split 2M entry does not point at a shadow-only PT"
        page = g_gtt.shadow_page(sub)
        sub_flags = (g & ~gtt.PAGE_PAT) | ((g & gtt.PAGE_PAT_LARGE) >> 5)
        for k in range(512):
            err = _check_leaf4k(vgpu, g, gfn + k, int(page[k]), sub_flags)
            if err:
                return f"split 2M sub-entry {k}: {err}"
        return None
    return f"{gt.name} entry is shadowed, which GVT never does"


def _check_spt(vgpu: Vgpu, spt: Spt, out: list[str]) -> None:
    g_gtt = vgpu.gtt
    assert spt.gfn is not None
    where = f"kvmgt: vGPU {vgpu.id} spt gfn {spt.gfn:#x} ({spt.shadow_type.name})"
    rec = vgpu.track.find(spt.gfn)
    if rec is None or rec.priv is not spt or not rec.tracked:
        out.append(f"{where}: no tracked page-track record (W9, G2/G3)")
    slot = vgpu.vm.memslots.gfn_to_memslot(spt.gfn)
    if slot is None or slot.is_invalid:
        return  # L6: the slot is gone; the spt lingers until it is freed
    if vgpu.attached and not vgpu.failsafe:
        if spt.gfn not in vgpu.ptable.gfns:
            out.append(f"{where}: not in the protect table (G3)")
        elif vgpu.vm.page_track.count(spt.gfn) < 1:
            out.append(f"{where}: KVM write-track count is 0 (K1, G3)")
    guest = np.frombuffer(vgpu.vm.read_guest(spt.gfn << PAGE_SHIFT, PAGE_SIZE), dtype="<u8")
    shadow = g_gtt.shadow_page(spt)
    step = gtt.GTT_64K_PTE_STRIDE if spt.pde_ips else 1
    etype = gtt.entry_type(spt.guest_type)
    # only entries where the guest or the shadow has the present bit can differ
    one = np.uint64(gtt.GEN8_PAGE_PRESENT)
    live = (guest & one) | (shadow & one)
    if step > 1:
        live = live.reshape(-1, step).max(axis=1)
    for j in np.nonzero(live)[0]:
        i = int(j) * step
        if i in spt.stale:
            continue
        g = int(guest[i])
        gt = gtt.real_type(etype, g, spt.pde_ips)
        err = _check_entry(vgpu, spt, i, g, gt, shadow)
        if err is None:
            continue
        if i in spt.post_shadow:
            s = int(shadow[i])
            st = gtt.real_type(gtt.entry_type(spt.shadow_type), s, False)
            scratch = g_gtt.scratch_pt[spt.shadow_type]
            if gtt.get_pfn(s, st) == gtt.get_pfn(gtt.set_pfn(0, st, scratch), st):
                continue  # W6: deferred, points at scratch until the flush
        out.append(f"{where}: index {i}: guest {g:#x} shadow {int(shadow[i]):#x}: {err}")


def _refcounts(vgpu: Vgpu, out: list[str]) -> None:
    g_gtt = vgpu.gtt
    refs: Counter[int] = Counter()
    for mm in g_gtt.mms:
        if mm.shadowed:
            for se in mm.shadow_pdps:
                if gtt.test_present(se, mm.root_type):
                    refs[gtt.get_pfn(se, mm.root_type)] += 1
    dma_refs: Counter[int] = Counter()
    for spt in g_gtt.spts.values():
        scratch = g_gtt.scratch_pt[spt.shadow_type]
        for _i, v, t in g_gtt.iter_present_shadow(spt):
            pfn = gtt.get_pfn(v, t)
            if pfn in (gtt.get_pfn(gtt.set_pfn(0, t, scratch), t), g_gtt.ggtt_scratch_mfn):
                continue  # scratch (2M entries mask the scratch pfn, W6)
            if gtt.is_leaf_type(t):
                dma_refs[pfn << PAGE_SHIFT] += 1
            else:
                refs[pfn] += 1
    for mfn, spt in g_gtt.spts.items():
        if spt.refcount != refs.get(mfn, 0):
            out.append(
                f"kvmgt: vGPU {vgpu.id} spt mfn {mfn:#x} gfn {spt.gfn}: refcount "
                f"{spt.refcount} != {refs.get(mfn, 0)} shadow references"
            )
    if not vgpu.attached:
        return
    host = vgpu.ggtt.host_ggtt
    for index in vgpu.ggtt.written:
        v = int(host[index])
        if v & gtt.GEN8_PAGE_PRESENT and gtt.get_pfn(v, T.GGTT_PTE) != vgpu.ggtt.scratch_mfn:
            dma_refs[gtt.get_pfn(v, T.GGTT_PTE) << PAGE_SHIFT] += 1
    krefs: Counter[int] = Counter()
    for addr, lst in vgpu.dma.by_addr.items():
        krefs[addr] += sum(e.kref for e in lst)
    for addr in set(krefs) | set(dma_refs):
        if krefs.get(addr, 0) != dma_refs.get(addr, 0):
            out.append(
                f"kvmgt: vGPU {vgpu.id} DMA address {addr:#x}: kref {krefs.get(addr, 0)} != "
                f"{dma_refs.get(addr, 0)} shadow/GGTT references (G7)"
            )


def _check_ggtt(vgpu: Vgpu, out: list[str]) -> None:
    gg = vgpu.ggtt
    for index in sorted(gg.written):
        v = int(gg.virtual_ggtt[index])
        h = int(gg.host_ggtt[index])
        where = f"kvmgt: vGPU {vgpu.id} GGTT index {index:#x}"
        if index in gg.half_written:
            if h & gtt.GEN8_PAGE_PRESENT or gtt.get_pfn(h, T.GGTT_PTE) != gg.scratch_mfn:
                out.append(f"{where}: half-written entry is not scratch + not present (GG3)")
            continue
        if index in gg.virtual_only:
            # a same-half write after an 8-byte one: the kernel updates the
            # virtual entry only (GG3), the host keeps the full update
            continue
        if not v & gtt.GEN8_PAGE_PRESENT:
            if h & gtt.GEN8_PAGE_PRESENT:
                out.append(f"{where}: guest entry not present, host entry present (GG4)")
            continue
        gfn = gtt.get_pfn(v, T.GGTT_PTE)
        pfn = _host_pfn(vgpu, gfn) if vgpu.gtt.gfn_is_valid(gfn) else gg.scratch_mfn
        if gtt.get_pfn(h, T.GGTT_PTE) != pfn:
            out.append(f"{where}: host entry {h:#x} does not map gfn {gfn:#x} (GG4)")


def check_vgpu(vgpu: Vgpu) -> list[str]:
    """Every violated invariant of one vGPU, as messages."""
    out: list[str] = []
    for spt in list(vgpu.gtt.spts.values()):
        if spt.gfn is not None:
            _check_spt(vgpu, spt, out)
    _refcounts(vgpu, out)
    if vgpu.attached:
        _check_ggtt(vgpu, out)
    return out
