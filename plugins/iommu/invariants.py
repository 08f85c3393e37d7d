"""The iommu plugin's invariants and its report section.

Invariants (``vm.check_invariants()``):

* **IOTLB never outlives a zap** (spec/consumers.md T5): every IOTLB entry
  equals what a fresh walk of its domain's tables gives now (same pfn, and
  no permission the tables no longer grant). In shared mode those tables
  are KVM's, so a TDP zap without the matching IOTLB invalidation shows up
  here;
* **no stale DMA**: no DMA ever went through a pfn the host no longer backs;
* **pinned mode**: every pfn in a paging domain is pinned and live (a
  pinned page is never reclaimed while mapped), and the domain holds
  exactly the IOAS's pages;
* **T4**: each exported root is still a valid root of the MMU;
* **T7**: no non-coherent DMA registered while a TDP is exported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.plugins.iommu.iommufd import HwptKvm, HwptPaging

if TYPE_CHECKING:
    from kvmmu.plugins.iommu.plugin import IommuPlugin

__all__ = ["check", "report"]

PAGE_SHIFT = 12


def check(p: IommuPlugin) -> list[str]:
    """Return every violated iommu invariant as a message."""
    out = list(p.violations)
    iommu = p.iommu
    out.extend(f"iommu: {m}" for m in iommu.stale_dma)
    domains = {h.domain.id: h for h in p.iommufd.hwpts()}
    for dom_id, vpfn, e in iommu.iotlb.entries():
        h = domains.get(dom_id)
        if h is None:
            out.append(f"iommu: IOTLB entry of destroyed domain {dom_id} (iova page {vpfn:#x})")
            continue
        w = h.domain.walk(vpfn << PAGE_SHIFT)
        if (
            not w.ok
            or w.pfn != e.pfn
            or (e.writable and not w.writable)
            or (e.readable and not w.readable)
        ):
            now = f"pfn {w.pfn:#x} r={w.readable} w={w.writable}" if w.ok else w.reason
            out.append(
                f"iommu: T5 IOTLB entry domain {dom_id} iova page {vpfn:#x} -> pfn {e.pfn:#x} "
                f"(r={e.readable} w={e.writable}) but the tables now give {now}"
            )
    host = p.vm.host
    for h in p.iommufd.hwpts():
        if isinstance(h, HwptPaging):
            leaves = h.domain.pgtable.leaves()
            expected = 0
            for a in h.ioas.areas:
                expected += a.npages
                if a.pfns is None:
                    out.append(f"iommu: IOAS {h.ioas.id} area {a.iova:#x} mapped but not pinned")
            if len(leaves) != expected:
                out.append(
                    f"iommu: HWPT {h.id} holds {len(leaves)} pages, its IOAS maps {expected}"
                )
            for vpfn, pfn in leaves.items():
                if host.pin_count(pfn) <= 0 or not host.pfn_is_live(pfn):
                    out.append(
                        f"iommu: pinned mode: iova page {vpfn:#x} maps pfn {pfn:#x}, which is "
                        "no longer pinned/live (a mapped page was reclaimed)"
                    )
    for fd in p.tdp_fds:
        if fd.released:
            continue
        if p.vm.config.tdp and not p._root_valid(fd):
            out.append(f"iommu: T4 exported root {fd.root_hpa:#x} is not a valid MMU root")
        if p.vm.noncoherent_dma_count:
            out.append("iommu: T7 non-coherent DMA is registered while the TDP is exported")
    for h in p.iommufd.hwpts():
        if isinstance(h, HwptKvm) and h.domain.root_hpa != h.tdp_fd.root_hpa:
            out.append(f"iommu: KVM HWPT {h.id} root differs from its TDP FD's exported root")
    return sorted(set(out), key=out.index)


def report(p: IommuPlugin) -> dict[str, Any]:
    """The ``plugins.iommu`` section of a run report."""
    fd_ = p.iommufd
    kvm = [h for h in fd_.hwpts() if isinstance(h, HwptKvm)]
    return {
        "mode": p.config.mode,
        "pages_pinned": fd_.pinned_pages,
        "pins_total": fd_.pins_total,
        "iotlb": {**p.iommu.iotlb.stats.as_dict(), "entries": len(p.iommu.iotlb)},
        "walks": p.iommu.walks,
        "dma_faults": p.iommu.dma_faults,
        "io_page_faults": sum(d.stats["page_requests"] for d in p.devices.values()),
        "fault_groups": sum(h.groups for h in kvm),
        "responses": _merge([h.responses for h in kvm]),
        "tdp_invalidations": sum(h.invalidations for h in kvm),
        "kvm_fault_errors": _merge([fd.fault_errors for fd in p.tdp_fds]),
        "devices": {n: dict(d.stats) for n, d in p.devices.items()},
        "hooks": dict(p.stats),
    }


def _merge(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
