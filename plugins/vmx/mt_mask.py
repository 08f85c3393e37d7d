"""``vmx_get_mt_mask`` across kernel eras, as a pure function.

spec/memtype.md §7 (``arch/x86/kvm/vmx/vmx.c: vmx_get_mt_mask``). The value
is ``(memtype << 3) | IPAT << 6`` and is ORed into every leaf EPT SPTE
(spec/kvm-mmu.md §4.6): WB|IPAT = 0x70, WB = 0x30, UC = 0x00, UC|IPAT = 0x40.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmmu.era import KernelVersion, era_of
from kvmmu.memtype import MemType

__all__ = [
    "VMX_EPT_IPAT_BIT",
    "VMX_EPT_MT_EPTE_SHIFT",
    "VMX_EPT_MT_MASK",
    "VMX_MT_MASK_ERAS",
    "ept_memtype",
    "mt_value",
    "vmx_get_mt_mask",
    "vmx_get_mt_mask_row",
    "vmx_mt_mask_row",
]

#: ``VMX_EPT_MT_EPTE_SHIFT``, ``VMX_EPT_MT_MASK`` and ``VMX_EPT_IPAT_BIT``
#: (``arch/x86/include/asm/vmx.h``; spec/kvm-mmu.md §4.1).
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_MT_MASK = 7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = 1 << 6

#: First versions of the rows of spec/memtype.md §7, oldest first.
VMX_MT_MASK_ERAS = ("2.6.32", "3.13", "4.2", "6.7", "6.11", "6.12", "6.16")


def mt_value(memtype: MemType, ipat: bool) -> int:
    """``(memtype << VMX_EPT_MT_EPTE_SHIFT) | (ipat ? VMX_EPT_IPAT_BIT : 0)``."""
    return (int(memtype) << VMX_EPT_MT_EPTE_SHIFT) | (VMX_EPT_IPAT_BIT if ipat else 0)


def ept_memtype(spte: int) -> tuple[int, bool]:
    """(memtype field, IPAT) of a leaf EPT SPTE (bits 5:3 and bit 6)."""
    return (spte & VMX_EPT_MT_MASK) >> VMX_EPT_MT_EPTE_SHIFT, bool(spte & VMX_EPT_IPAT_BIT)


def vmx_get_mt_mask(
    era: str | KernelVersion,
    *,
    is_mmio: bool,
    noncoherent_dma: bool,
    guest_cd: bool,
    cd_nw_cleared: bool,
    ignore_guest_pat: bool,
    self_snoop: bool,
    guest_mtrr_type: Callable[[], MemType],
) -> int:
    """The EPT memtype bits KVM of ``era`` gives a leaf SPTE (spec/memtype.md §7).

    - every era: host MMIO -> UC without IPAT;
    - ≤ 6.10 and 6.12–6.15: no noncoherent DMA -> WB|IPAT;
    - 6.11 as released: WB|IPAT only without self-snoop, else WB;
    - ≥ 6.16: WB|IPAT while ``IGNORE_GUEST_PAT`` is enabled and there is no
      noncoherent DMA, else WB (``vmx_ignore_guest_pat``);
    - 4.2–6.6 with CR0.CD: ``CD_NW_CLEARED`` on -> WB|IPAT, off -> UC|IPAT
      (b18d5431acc7, fb279950ba02);
    - 6.7–6.10 with CR0.CD: quirk on -> WB without IPAT (8925b3194512),
      off -> UC|IPAT;
    - ≤ 6.10 otherwise: the guest MTRR type without IPAT (CD not considered
      before 4.2); 6.11+ with noncoherent DMA: WB.

    ``guest_mtrr_type`` is called only when the era consults guest MTRRs.
    """
    return vmx_get_mt_mask_row(
        vmx_mt_mask_row(era),
        is_mmio=is_mmio,
        noncoherent_dma=noncoherent_dma,
        guest_cd=guest_cd,
        cd_nw_cleared=cd_nw_cleared,
        ignore_guest_pat=ignore_guest_pat,
        self_snoop=self_snoop,
        guest_mtrr_type=guest_mtrr_type,
    )


def vmx_mt_mask_row(era: str | KernelVersion) -> str:
    """The row of spec/memtype.md §7 that ``era`` falls in (its first version)."""
    return era_of(era, VMX_MT_MASK_ERAS)


def vmx_get_mt_mask_row(
    row: str,
    *,
    is_mmio: bool,
    noncoherent_dma: bool,
    guest_cd: bool,
    cd_nw_cleared: bool,
    ignore_guest_pat: bool,
    self_snoop: bool,
    guest_mtrr_type: Callable[[], MemType],
) -> int:
    """:func:`vmx_get_mt_mask` for an era already resolved to its ``row``
    (:func:`vmx_mt_mask_row`); the VMX plugin resolves it once per VM."""
    if is_mmio:
        return mt_value(MemType.UC, False)
    if row == "6.16":
        ignore = ignore_guest_pat and not noncoherent_dma
        return mt_value(MemType.WB, ignore)
    if row == "6.12":
        return mt_value(MemType.WB, not noncoherent_dma)
    if row == "6.11":
        return mt_value(MemType.WB, not noncoherent_dma and not self_snoop)
    if not noncoherent_dma:
        return mt_value(MemType.WB, True)
    if guest_cd and row in ("4.2", "6.7"):
        if not cd_nw_cleared:
            return mt_value(MemType.UC, True)
        return mt_value(MemType.WB, row == "4.2")
    return mt_value(guest_mtrr_type(), False)
