"""The four KVM designs for honouring a virtio-gpu guest's WC mapping.

Each design is a way KVM could give the guest's WC mapping of a host-visible
blob its WC type on Intel EPT (spec/consumers.md §3.2). The model applies a
proposed design exactly where the proposal would have changed KVM: inside
``vmx_get_mt_mask`` (``arch/x86/kvm/vmx/vmx.c``), for the gfns of the
flagged memslot, *before* the vendor's own rule. The plugin's
``kvmmu_get_mt_mask`` is called before the vendor's (consumers first,
firstresult), so returning a mask here overrides the vendor for those gfns
and returning ``None`` leaves them to the vendor (spec/memtype.md §7).

- ``today``: no flag; the vendor and era decide (spec/memtype.md §7).
- ``kvm_mem_dma``: the ``KVM_MEM_DMA`` memslot flag of Chia-I Wu's 2020 RFC
  [CHIA-00] as Kevin Tian restated it in seed 001 ("KVM simply favor guest
  memory type") and as Yan Zhao's ``KVM_MEM_NON_COHERENT_DMA`` v1 did it
  [YAN-2024]: WB without IPAT for the slot, so the guest PAT decides and the
  guest MTRRs are ignored. ``scope="vm"`` is the RFC v1 mechanism instead:
  creating the flagged slot registers noncoherent DMA for the whole VM.
- ``kvm_mem_wc``: the ``KVM_MEM_WC`` flag of Yan Zhao's 2023-12 sketch
  (seed 002, [YAN-2023a]): ``MTRR_TYPE_WRCOMB << VMX_EPT_MT_EPTE_SHIFT |
  VMX_EPT_IPAT_BIT`` for the slot, whatever the guest PAT says.
- ``virtio_noncoherent``: the KVM VIRTIO device RFC [VIRTIO-DEV]
  (spec/memtype.md §10): ``KVM_DEV_VIRTIO_NONCOHERENT_SET`` registers
  noncoherent DMA once for the whole VM; the mask is the vendor's.

Every design keeps ``is_mmio`` first, as Yan's sketch does (host MMIO stays
EPT UC, spec/consumers.md M1). ``mmio_guard=False`` drops that guard for the
slot, modelling the earlier attempt that honoured guest types on MMIO and
caused machine checks (spec/consumers.md H2, bugzilla 104091): with
``kvm_mem_dma`` the slot's MMIO pfns then get WB without IPAT too.

AMD NPT has no memtype field and no IPAT (spec/memtype.md §9): there is
nothing a per-slot flag could put in an NPT SPTE, so on SVM (and on shadow
paging) the designs return ``None`` and the guest PAT is honoured as ever.
"""

from __future__ import annotations

from enum import StrEnum

from kvmmu.memtype import MemType

__all__ = [
    "DESIGNS",
    "VMX_EPT_IPAT_BIT",
    "VMX_EPT_MT_EPTE_SHIFT",
    "Design",
    "describe_ept",
    "design_mt_mask",
    "registers_noncoherent_dma",
]

#: ``VMX_EPT_MT_EPTE_SHIFT`` and ``VMX_EPT_IPAT_BIT`` (``arch/x86/include/asm/vmx.h``).
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_IPAT_BIT = 1 << 6


class Design(StrEnum):
    """The design, as named in config (``design = "kvm_mem_wc"``)."""

    TODAY = "today"
    KVM_MEM_DMA = "kvm_mem_dma"
    KVM_MEM_WC = "kvm_mem_wc"
    VIRTIO_NONCOHERENT = "virtio_noncoherent"


#: Every design, in the order reports list them: (a), (b), (c), (d).
DESIGNS: tuple[Design, ...] = tuple(Design)


def _mt(memtype: MemType, ipat: bool) -> int:
    return (int(memtype) << VMX_EPT_MT_EPTE_SHIFT) | (VMX_EPT_IPAT_BIT if ipat else 0)


def design_mt_mask(
    design: Design,
    *,
    ept: bool,
    in_slot: bool,
    is_mmio: bool,
    dma_scope: str = "slot",
    mmio_guard: bool = True,
    force_wb: bool = False,
) -> int | None:
    """The EPT memtype bits a design gives a gfn, or ``None`` to defer to the vendor.

    ``ept``: the VM is VMX with EPT (the only place a per-slot memtype can
    live). ``in_slot``: the gfn lies in one of the device's memslots.
    ``force_wb``: Sean Christopherson's 2020 mitigation is active (the flagged
    slot logs dirty pages, so KVM forces WB|IPAT; spec/consumers.md H4,
    [SJC-2020b]).
    """
    if not ept or not in_slot:
        return None
    if is_mmio and mmio_guard:
        return None  # the vendor's M1: host MMIO -> EPT UC, IPAT clear
    if design is Design.KVM_MEM_DMA and dma_scope == "slot":
        return _mt(MemType.WB, True) if force_wb else _mt(MemType.WB, False)
    if design is Design.KVM_MEM_WC:
        return _mt(MemType.WB, True) if force_wb else _mt(MemType.WC, True)
    return None


def registers_noncoherent_dma(design: Design, dma_scope: str) -> bool:
    """Whether the design calls ``kvm_arch_register_noncoherent_dma``.

    The KVM VIRTIO device does on ``KVM_DEV_VIRTIO_NONCOHERENT_SET``
    [VIRTIO-DEV]; the 2020 ``KVM_MEM_DMA`` RFC v1 does on creating the
    flagged slot [CHIA-00] (``scope="vm"``).
    """
    return design is Design.VIRTIO_NONCOHERENT or (
        design is Design.KVM_MEM_DMA and dma_scope == "vm"
    )


def describe_ept(spte: int) -> str:
    """``"WB|IPAT"``, ``"UC"``, ... for the memtype bits of a leaf EPT SPTE."""
    raw = (spte >> VMX_EPT_MT_EPTE_SHIFT) & 7
    try:
        name = MemType(raw).label
    except ValueError:
        name = f"reserved({raw})"
    return name + ("|IPAT" if spte & VMX_EPT_IPAT_BIT else "")
