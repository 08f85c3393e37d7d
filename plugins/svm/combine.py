"""How an AMD NPT guest access gets its memory type (spec/memtype.md §9).

Verified (spec/memtype.md §9, spec/kvm-mmu.md §4.2): NPT leaves never set
PWT/PCD/PAT, so the host side is host PAT entry 0 (WB on a Linux host,
required by KVM since 6.0) combined with the host MTRR type of the host
physical address; the guest side is the gPAT entry the guest PTE selects
(gPAT follows the guest's ``IA32_PAT``, 15038e147247); guest MTRRs play no
part. A guest WB access therefore gets the host MTRR type, as a
shadow-paging access does.

Unverified: the AMD APM Vol 2 §15.25.8 tables "Combining Guest and Host PAT
Types" and "Combining PAT and MTRR Types" are not in the spec. Every other
(guest PAT, host MTRR) pair goes through the single table
:data:`UNVERIFIED_AMD_GUEST_HOST_COMBINATION`; docs/svm-memtype.md explains
the assumption.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from kvmmu.memtype import MemType, effective_type

__all__ = ["MTRR_TYPES", "UNVERIFIED_AMD_GUEST_HOST_COMBINATION", "npt_effective_type"]

#: The types an MTRR (here: the host MTRR) can hold.
MTRR_TYPES = (MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB)


def _assumed_table() -> Mapping[tuple[MemType, MemType], MemType]:
    return MappingProxyType({(g, m): effective_type(m, g) for g in MemType for m in MTRR_TYPES})


#: (guest PAT type, host MTRR type) -> effective type, with host PAT0 = WB.
#:
#: ASSUMPTION (unverified, spec/memtype.md §9 and §12 item 1): combining the
#: guest PAT type with host PAT WB yields the guest PAT type ("the guest PAT
#: type generally prevails over host WB", a secondary-source remark), and
#: that type combines with the host MTRR type as in Intel SDM Table 11-7.
#: Known deviation not modelled: AMD can yield WC+ (guest WC over MTRR
#: WP/WT/WB) and CD (guest UC- over MTRR WC), which have no MemType; the
#: table gives WC for both. Replace this table when the APM tables are read.
UNVERIFIED_AMD_GUEST_HOST_COMBINATION: Mapping[tuple[MemType, MemType], MemType] = _assumed_table()


def npt_effective_type(guest_pat: MemType | None, host_mtrr: MemType) -> MemType:
    """Effective type of an NPT access with hardware CR0.CD clear.

    ``guest_pat`` is ``None`` with guest paging off, taken as WB (as on
    Intel; unverified). Guest WB gets the host MTRR type (verified path);
    every other guest type is looked up in
    :data:`UNVERIFIED_AMD_GUEST_HOST_COMBINATION`.
    """
    g = MemType.WB if guest_pat is None else MemType(guest_pat)
    if g is MemType.WB:
        return MemType(host_mtrr)
    return UNVERIFIED_AMD_GUEST_HOST_COMBINATION[(g, MemType(host_mtrr))]
