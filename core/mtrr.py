"""Guest MTRRs as KVM stores them, and the types KVM derived from them.

Re-exported by :mod:`kvmmu.memtype`, which is the public import path.

The MSR layout and the pure architectural precedence are SDM Vol 3A §11.11
(spec/memtype.md §4). The lookups KVM used for EPT memtypes follow
``arch/x86/kvm/mtrr.c`` (the 2015 rewrite, 4.2–6.10: ``kvm_mtrr_valid``,
``kvm_mtrr_set_msr``, ``update_mtrr``, ``mtrr_for_each_mem_type``,
``kvm_mtrr_get_guest_memory_type``, ``kvm_mtrr_check_gfn_range_consistency``)
and, before 4.2, the ``get_mtrr_type`` copy in ``arch/x86/kvm/mmu.c``
(spec/memtype.md §6). MTRR virtualization was removed in 6.11: the MSRs are
still stored and read back but never affect a memory type.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmu.era import KernelVersion
from kvmmu.errors import GuestFault
from kvmmu.pat import MemType, valid_mtrr_type

__all__ = [
    "ALL_GFNS_END",
    "FIXED_MTRR_MSRS",
    "KVM_NR_VAR_MTRR",
    "MSR_MTRR_CAP",
    "MSR_MTRR_DEF_TYPE",
    "MTRRCAP_VALUE",
    "MTRR_DEF_TYPE_E",
    "MTRR_DEF_TYPE_FE",
    "MtrrLookup",
    "MtrrState",
    "is_mtrr_msr",
    "mtrr_physbase",
    "mtrr_physmask",
]

#: ``IA32_MTRRCAP`` (read-only) and ``IA32_MTRR_DEF_TYPE``.
MSR_MTRR_CAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
#: ``KVM_NR_VAR_MTRR``: the number of variable ranges KVM exposes.
KVM_NR_VAR_MTRR = 8
#: KVM's ``IA32_MTRRCAP``: SMRR 0, WC 1 (bit 10), FIX 1 (bit 8), VCNT 8.
MTRRCAP_VALUE = 0x500 | KVM_NR_VAR_MTRR
MTRR_DEF_TYPE_FE = 1 << 10
MTRR_DEF_TYPE_E = 1 << 11
_DEF_TYPE_VALID = 0xCFF
#: The 11 fixed-range MSRs in ascending address order (SDM Table 11-9).
FIXED_MTRR_MSRS = (0x250, 0x258, 0x259, *range(0x268, 0x270))
#: End (exclusive) used for "every gfn" zaps; the kernel passes
#: ``gpa_to_gfn(~0ULL)`` or ``~0ULL``, which covers the same SPTEs.
ALL_GFNS_END = 1 << 52

_U64 = (1 << 64) - 1
_PAGE_MASK = _U64 & ~0xFFF
_ONE_MIB = 0x100000


@dataclass(frozen=True, slots=True)
class _Segment:
    """``struct fixed_mtrr_segment`` (``arch/x86/kvm/mtrr.c``)."""

    start: int
    end: int
    range_shift: int
    range_start: int

    def end_index(self) -> int:
        return self.range_start + ((self.end - self.start) >> self.range_shift) - 1

    def range_end(self, index: int) -> int:
        return self.start + ((index - self.range_start + 1) << self.range_shift)


_SEGMENTS = (
    _Segment(0x0, 0x80000, 16, 0),  # MTRRfix64K_00000: 8 x 64K
    _Segment(0x80000, 0xC0000, 14, 8),  # MTRRfix16K_80000/A0000: 16 x 16K
    _Segment(0xC0000, 0x100000, 12, 24),  # MTRRfix4K_C0000..F8000: 64 x 4K
)
_NR_FIXED_RANGES = 88


def mtrr_physbase(n: int) -> int:
    """``IA32_MTRR_PHYSBASEn`` = 0x200 + 2n."""
    return 0x200 + 2 * n


def mtrr_physmask(n: int) -> int:
    """``IA32_MTRR_PHYSMASKn`` = 0x201 + 2n."""
    return 0x201 + 2 * n


def is_mtrr_msr(index: int) -> bool:
    """True for the MTRR MSRs KVM routes to ``kvm_mtrr_{get,set}_msr`` (PAT excluded).

    ``IA32_MTRRCAP`` is one of them: it reads ``0x508`` and a write is #GP
    (read-only; ``msr_mtrr_valid`` lacks it), spec/memtype.md §4 MSR table.
    """
    return (
        index in (MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE)
        or 0x200 <= index < 0x200 + 2 * KVM_NR_VAR_MTRR
        or index in FIXED_MTRR_MSRS
    )


def _fixed_msr_seg_unit(index: int) -> tuple[int, int] | None:
    """``fixed_msr_to_seg_unit``."""
    if index == 0x250:
        return 0, 0
    if index in (0x258, 0x259):
        return 1, index - 0x258
    if 0x268 <= index <= 0x26F:
        return 2, index - 0x268
    return None


def _fixed_msr_range(index: int) -> tuple[int, int, int] | None:
    """(first range index, start gpa, end gpa) of a fixed-range MSR."""
    su = _fixed_msr_seg_unit(index)
    if su is None:
        return None
    seg = _SEGMENTS[su[0]]
    unit_size = 8 << seg.range_shift
    start = seg.start + su[1] * unit_size
    return seg.range_start + 8 * su[1], start, start + unit_size


@dataclass(frozen=True, slots=True)
class MtrrLookup:
    """Result of KVM's ``mtrr_for_each_mem_type`` over ``[start, end)``.

    ``types`` are the covering types in iteration order (fixed ranges, then
    variable ranges in KVM's list order); ``disabled`` is
    ``iter.mtrr_disabled`` (E = 0); ``partial_map`` is true when the range is
    not fully covered by variable ranges.
    """

    types: tuple[int, ...]
    disabled: bool
    partial_map: bool


class MtrrState:
    """One vCPU's guest MTRR MSRs (``struct kvm_mtrr``).

    ``maxphyaddr`` is the guest's CPUID MAXPHYADDR, used by the reserved-bit
    checks of the variable-range MSRs; ``guest_has_mtrr`` is CPUID.MTRR,
    which picks the type used while MTRRs are disabled (``mtrr_disabled_type``).
    """

    def __init__(self, maxphyaddr: int = 46, guest_has_mtrr: bool = True) -> None:
        self.maxphyaddr = maxphyaddr
        self.guest_has_mtrr = guest_has_mtrr
        self.deftype = 0
        self.fixed_ranges = [0] * _NR_FIXED_RANGES
        self.var_base = [0] * KVM_NR_VAR_MTRR
        self.var_mask = [0] * KVM_NR_VAR_MTRR
        #: Enabled variable ranges in the order of KVM's ``mtrr_state->head``.
        self.var_order: list[int] = []

    # ---------------------------------------------------------------- MSRs

    @property
    def enabled(self) -> bool:
        """``IA32_MTRR_DEF_TYPE.E``."""
        return bool(self.deftype & MTRR_DEF_TYPE_E)

    @property
    def fixed_enabled(self) -> bool:
        """``IA32_MTRR_DEF_TYPE.FE``."""
        return bool(self.deftype & MTRR_DEF_TYPE_FE)

    @property
    def default_type(self) -> int:
        """``mtrr_default_type``: bits 7:0 of ``IA32_MTRR_DEF_TYPE``."""
        return self.deftype & 0xFF

    def valid(self, index: int, value: int) -> bool:
        """``kvm_mtrr_valid``: would KVM accept ``value`` for MSR ``index``?"""
        if not is_mtrr_msr(index) or index == MSR_MTRR_CAP or value < 0 or value > _U64:
            return False  # MTRRCAP is read-only (#GP on write)
        if index == MSR_MTRR_DEF_TYPE:
            return not value & ~_DEF_TYPE_VALID and valid_mtrr_type(value & 0xFF)
        if index in FIXED_MTRR_MSRS:
            return all(valid_mtrr_type((value >> (8 * i)) & 0xFF) for i in range(8))
        mask = _U64 & (_U64 << self.maxphyaddr)
        if index % 2 == 0:  # PHYSBASE: type, bits 11:8 reserved
            if not valid_mtrr_type(value & 0xFF):
                return False
            mask |= 0xF00
        else:  # PHYSMASK: bits 10:0 reserved
            mask |= 0x7FF
        return not value & mask

    def set_msr(self, index: int, value: int) -> None:
        """``kvm_mtrr_set_msr``: store a guest WRMSR or raise #GP.

        Reserved bits or an invalid type give ``GuestFault(13, 0)``
        (``kvm_mtrr_valid``). Zapping (``update_mtrr``) is era and vendor
        policy: see :meth:`zap_range_after_write`.
        """
        if not self.valid(index, value):
            raise GuestFault(13, 0)
        fixed = _fixed_msr_range(index)
        if fixed is not None:
            first = fixed[0]
            for i in range(8):
                self.fixed_ranges[first + i] = (value >> (8 * i)) & 0xFF
        elif index == MSR_MTRR_DEF_TYPE:
            self.deftype = value
        else:
            self._set_var(index, value)

    def _set_var(self, index: int, value: int) -> None:
        """``set_var_mtrr_msr``: keeps KVM's list order of enabled ranges.

        KVM inserts an enabled range before the first listed range whose
        base is not above its own, so the list is ordered by descending base.
        """
        n = (index - 0x200) // 2
        if n in self.var_order:
            self.var_order.remove(n)
        if index % 2 == 0:
            self.var_base[n] = value
        else:
            self.var_mask[n] = value
        if self.var_mask[n] & (1 << 11):
            pos = len(self.var_order)
            for i, other in enumerate(self.var_order):
                if self.var_base[n] >= self.var_base[other]:
                    pos = i
                    break
            self.var_order.insert(pos, n)

    def get_msr(self, index: int) -> int:
        """``kvm_mtrr_get_msr``; ``IA32_MTRRCAP`` reads ``0x508``."""
        if index == MSR_MTRR_CAP:
            return MTRRCAP_VALUE
        if not is_mtrr_msr(index):
            raise GuestFault(13, 0)
        fixed = _fixed_msr_range(index)
        if fixed is not None:
            return sum(self.fixed_ranges[fixed[0] + i] << (8 * i) for i in range(8))
        if index == MSR_MTRR_DEF_TYPE:
            return self.deftype
        n = (index - 0x200) // 2
        return self.var_base[n] if index % 2 == 0 else self.var_mask[n]

    # -------------------------------------------------------------- ranges

    def var_range(self, n: int) -> tuple[int, int]:
        """``var_mtrr_range``: ``[start, end)`` gpa of variable range ``n``.

        ``end = (start | ~mask) + 1`` with the mask extended by ones above
        MAXPHYADDR; exact only for contiguous masks (spec/memtype.md §4).
        """
        start = self.var_base[n] & _PAGE_MASK
        mask = (self.var_mask[n] & _PAGE_MASK) | (_U64 & (_U64 << self.maxphyaddr))
        return start, ((start | (~mask & _U64)) + 1)

    def lookup(self, start: int, end: int) -> MtrrLookup:
        """``mtrr_for_each_mem_type`` over ``[start, end)`` (KVM 4.2–6.10).

        With FE set and ``start`` below 1 MiB the fixed ranges covering the
        span come first; only when the span runs past the last fixed range do
        the variable ranges follow.
        """
        if not self.enabled:
            return MtrrLookup((), True, False)
        types: list[int] = []
        if self.fixed_enabled and start < _ONE_MIB:
            seg_no = next(i for i, s in enumerate(_SEGMENTS) if s.start <= start < s.end)
            seg = _SEGMENTS[seg_no]
            index = seg.range_start + ((start - seg.start) >> seg.range_shift)
            while True:
                types.append(self.fixed_ranges[index])
                if seg.range_end(index) >= end:
                    return MtrrLookup(tuple(types), False, False)
                index += 1
                if index >= _NR_FIXED_RANGES:
                    break
                if index > seg.end_index():
                    seg_no += 1
                    seg = _SEGMENTS[seg_no]
        partial = False
        start_max = start
        for n in self.var_order:
            r_start, r_end = self.var_range(n)
            if not (r_start >= end or r_end <= start):
                types.append(self.var_base[n] & 0xFF)
                partial |= start_max < r_start
                start_max = max(start_max, r_end)
        partial |= start_max < end
        return MtrrLookup(tuple(types), False, partial)

    # ------------------------------------------------------ memory types

    def guest_memory_type(
        self, gfn: int, era: str | KernelVersion, *, kvm_visit_order: bool = False
    ) -> MemType:
        """The guest-MTRR type KVM put in EPT SPTEs for ``gfn``, by era.

        spec/memtype.md §6. ≤ 4.1 (``get_mtrr_type`` + ``kvm_get_guest_memory_type``):
        any other mismatch -> UC, MTRRs disabled -> WB. 4.2–6.10
        (``kvm_mtrr_get_guest_memory_type``): UC in any overlapping range
        wins (§4 rule 5, §6 "in every era"), WT+WB -> WT, any other mismatch
        -> WB ("undefined behavior"); disabled -> the default type field in
        4.2, ``mtrr_disabled_type`` (UC, or WB without CPUID.MTRR) from 4.3.
        ≥ 6.11 the function is gone and KVM treats all guest memory as WB
        (Documentation/virt/kvm/x86/errata.rst).

        ``kvm_visit_order`` follows the 4.2–6.10 loop of arch/x86/kvm/mtrr.c
        literally instead: it tests only the range being visited for UC, so a
        UC range met before a differing non-UC range (KVM visits ranges by
        descending base) ends in the "undefined" branch and gives WB. The
        spec's rule is the default (docs/decisions.md, "Memory types").
        """
        v = KernelVersion(era)
        if v >= (6, 11):
            return MemType.WB
        if v < (4, 2):
            return self._old_guest_memory_type(gfn)
        start = gfn << 12
        it = self.lookup(start, start + 0x1000)
        if not kvm_visit_order and len(set(it.types)) > 1 and MemType.UC in it.types:
            return MemType.UC
        result = -1
        for t in it.types:
            if result == -1 or result == t:
                result = t
                continue
            if t == MemType.UC:
                return MemType.UC
            if {result, t} <= {MemType.WT, MemType.WB}:
                result = MemType.WT
                continue
            return MemType.WB
        if it.disabled:
            if v < (4, 3):
                return MemType(self.default_type)
            return MemType.UC if self.guest_has_mtrr else MemType.WB
        if result == -1:
            return MemType(self.default_type)
        return MemType(result)

    def _old_guest_memory_type(self, gfn: int) -> MemType:
        """Pre-4.2 ``get_mtrr_type`` as KVM used it (spec/memtype.md §6, ≤ 4.1 row).

        Disabled MTRRs (0xFF/0xFE results) become WB; fixed ranges apply
        with FE below 1 MiB; overlapping variable ranges: UC wins, WT+WB ->
        WT, anything else -> UC; no match -> the default type.
        """
        if not self.enabled:
            return MemType.WB
        gpa = gfn << 12
        if self.fixed_enabled and gpa < _ONE_MIB:
            return MemType(self._fixed_type(gpa))
        result = -1
        for t in self._matching_var_types(gpa):
            if result == -1:
                result = t
                continue
            if MemType.UC in (result, t):
                return MemType.UC
            if {result, t} <= {MemType.WT, MemType.WB}:
                result = MemType.WT
                continue
            if result != t:
                return MemType.UC
        return MemType(self.default_type if result == -1 else result)

    def _fixed_type(self, gpa: int) -> int:
        seg = next(s for s in _SEGMENTS if s.start <= gpa < s.end)
        return self.fixed_ranges[seg.range_start + ((gpa - seg.start) >> seg.range_shift)]

    def _matching_var_types(self, gpa: int) -> list[int]:
        """Types of the enabled variable ranges with ``(A & mask) == (base & mask)``."""
        addr_bits = _PAGE_MASK & ((1 << self.maxphyaddr) - 1)
        out = []
        for n in range(KVM_NR_VAR_MTRR):
            if not self.var_mask[n] & (1 << 11):
                continue
            m = self.var_mask[n] & addr_bits
            if (gpa & m) == (self.var_base[n] & m):
                out.append(self.var_base[n] & 0xFF)
        return out

    def mtrr_type(self, gpa: int) -> MemType | None:
        """The architectural MTRR type of ``gpa`` (SDM §11.11.4.1 precedence).

        Rules 1–8 of spec/memtype.md §4: E = 0 -> UC; FE and gpa < 1 MiB ->
        the fixed range; one match or equal matches -> that type; any UC ->
        UC; only WT and WB -> WT; no match -> the default type. Any other
        overlap is undefined in the SDM and returns ``None`` (KVM picks WB,
        see :meth:`guest_memory_type`).
        """
        if not self.enabled:
            return MemType.UC
        if self.fixed_enabled and gpa < _ONE_MIB:
            return MemType(self._fixed_type(gpa))
        found = set(self._matching_var_types(gpa))
        if not found:
            return MemType(self.default_type)
        if len(found) == 1:
            return MemType(found.pop())
        if MemType.UC in found:
            return MemType.UC
        if found == {MemType.WT, MemType.WB}:
            return MemType.WT
        return None

    def check_gfn_range_consistency(self, gfn: int, npages: int) -> bool:
        """``kvm_mtrr_check_gfn_range_consistency`` (4.2–6.10).

        True if every type covering ``[gfn, gfn + npages)`` is the same and,
        when the coverage is partial, equal to the default type; always true
        while MTRRs are disabled.
        """
        it = self.lookup(gfn << 12, (gfn + npages) << 12)
        if any(t != it.types[0] for t in it.types):
            return False
        if it.disabled or not it.partial_map or not it.types:
            return True
        return it.types[0] == self.default_type

    def max_mapping_level(self, gfn: int, max_level: int) -> int:
        """Lower ``max_level`` until the huge page's gfn range is consistent.

        The loop of ``kvm_tdp_page_fault`` (``arch/x86/kvm/mmu/mmu.c``,
        spec/memtype.md §8): level 1 = 4K, 2 = 2M, 3 = 1G.
        """
        level = max_level
        while level > 1:
            pages = 1 << (9 * (level - 1))
            if self.check_gfn_range_consistency(gfn & ~(pages - 1), pages):
                break
            level -= 1
        return level

    def zap_range_after_write(self, index: int) -> tuple[int, int] | None:
        """The gfn range ``update_mtrr`` zaps after a write to MSR ``index``.

        ``[start_gfn, end_gfn)``, computed on the state after the write:
        nothing while MTRRs are disabled (except for DEF_TYPE itself);
        a fixed-range MSR's span only while FE is set; everything for
        DEF_TYPE; a variable range's ``var_mtrr_range`` span. Whether the
        zap happens at all (TDP, noncoherent DMA, era) is the caller's
        policy (spec/memtype.md §4 "Writes", §11.2).
        """
        if not is_mtrr_msr(index) or index == MSR_MTRR_CAP:
            return None
        if not self.enabled and index != MSR_MTRR_DEF_TYPE:
            return None
        fixed = _fixed_msr_range(index)
        if fixed is not None:
            if not self.fixed_enabled:
                return None
            return fixed[1] >> 12, fixed[2] >> 12
        if index == MSR_MTRR_DEF_TYPE:
            return 0, ALL_GFNS_END
        start, end = self.var_range((index - 0x200) // 2)
        return start >> 12, end >> 12
