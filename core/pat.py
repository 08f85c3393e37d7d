"""Memory-type encodings, the PAT MSR and SDM Table 11-7.

Re-exported by :mod:`kvmmu.memtype`, which is the public import path.

Sources: Intel SDM Vol 3A Table 11-8 / 11-10 (encodings), §11.12 (PAT),
Table 11-7 (PAT x MTRR); ``arch/x86/kvm/mtrr.c: valid_pat_type`` and
``arch/x86/kvm/x86.h: kvm_pat_valid`` (spec/memtype.md §1–§3).
"""

from __future__ import annotations

from enum import IntEnum

from kvmmu.errors import GuestFault

__all__ = [
    "MSR_IA32_CR_PAT",
    "PAT_DEFAULT",
    "PAT_TYPE_MASK",
    "MemType",
    "check_pat_write",
    "effective_type",
    "kvm_pat_valid",
    "make_pat",
    "pat_entries",
    "pat_index",
    "pat_type",
    "valid_mtrr_type",
    "valid_pat_type",
]


class MemType(IntEnum):
    """x86 memory types with their architectural encodings (SDM Table 11-10).

    The same numbers are used in PAT entries, MTRRs and EPT memtype fields;
    ``UC_MINUS`` (7) is valid only in PAT entries (spec/memtype.md §1).
    """

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6
    UC_MINUS = 7

    @property
    def label(self) -> str:
        """The short name used in reports: ``"UC"``, ``"WC"``, ..., ``"UC-"``."""
        return "UC-" if self is MemType.UC_MINUS else self.name

    @classmethod
    def from_label(cls, label: str) -> MemType:
        """Inverse of :attr:`label` (accepts ``"UC-"`` and ``"UC_MINUS"``)."""
        text = label.strip().upper()
        if text in ("UC-", "UC_MINUS", "UCM"):
            return cls.UC_MINUS
        try:
            return cls[text]
        except KeyError:
            raise ValueError(f"not a memory type: {label!r}") from None


#: ``MSR_IA32_CR_PAT`` (SDM §11.12.2).
MSR_IA32_CR_PAT = 0x277
#: Power-up value and KVM's vCPU default ``MSR_IA32_CR_PAT_DEFAULT``:
#: WB, WT, UC-, UC, WB, WT, UC-, UC (SDM Table 11-12).
PAT_DEFAULT = 0x0007040600070406
#: Bits 2:0 of each PAT byte hold the type; bits 7:3 are reserved.
PAT_TYPE_MASK = 0x07

_PAT_RESERVED = 0xF8F8F8F8F8F8F8F8
#: Bit sets of valid encodings: PAT {0,1,4,5,6,7} = 0xf3, MTRR {0,1,4,5,6} = 0x73
#: (``arch/x86/kvm/mtrr.c: valid_pat_type / valid_mtrr_type``).
_VALID_PAT_BITS = 0xF3
_VALID_MTRR_BITS = 0x73


def valid_pat_type(t: int) -> bool:
    """``valid_pat_type``: 0, 1, 4, 5, 6 and 7 (``arch/x86/kvm/mtrr.c``)."""
    return 0 <= t < 8 and bool((1 << t) & _VALID_PAT_BITS)


def valid_mtrr_type(t: int) -> bool:
    """``valid_mtrr_type``: 0, 1, 4, 5 and 6 (``arch/x86/kvm/mtrr.c``)."""
    return 0 <= t < 8 and bool((1 << t) & _VALID_MTRR_BITS)


def kvm_pat_valid(value: int) -> bool:
    """``kvm_pat_valid``: no byte has bits 7:3 set and no byte is type 2 or 3.

    spec/memtype.md §1 (``arch/x86/kvm/x86.h``). Values wider than 64 bits
    are invalid as an MSR value.
    """
    if value < 0 or value >> 64:
        return False
    if value & _PAT_RESERVED:
        return False
    return all(valid_pat_type((value >> (8 * i)) & 0xFF) for i in range(8))


def check_pat_write(value: int) -> int:
    """Validate a guest WRMSR to ``IA32_PAT``; raise #GP if KVM refuses it.

    An invalid value makes ``set_msr`` return 1, i.e. #GP(0) is injected
    (spec/memtype.md §1). Returns ``value`` unchanged when it is accepted.
    """
    if not kvm_pat_valid(value):
        raise GuestFault(13, 0)
    return value


def pat_index(pat: int | bool, pcd: int | bool, pwt: int | bool) -> int:
    """PAT entry selected by a paging entry: ``4*PAT + 2*PCD + PWT`` (SDM Table 11-11)."""
    return (int(bool(pat)) << 2) | (int(bool(pcd)) << 1) | int(bool(pwt))


def pat_type(pat_msr: int, index: int) -> MemType:
    """Memory type held in entry ``index`` (PA0..PA7) of a PAT MSR value.

    ``pat_msr`` must be a value KVM accepted (:func:`kvm_pat_valid`).
    """
    if not 0 <= index < 8:
        raise ValueError(f"PAT index {index} out of range 0..7")
    raw = (pat_msr >> (8 * index)) & 0xFF
    if not valid_pat_type(raw):
        raise ValueError(f"PA{index} holds reserved encoding {raw:#x}")
    return MemType(raw)


def pat_entries(pat_msr: int) -> tuple[MemType, ...]:
    """All eight entries of a PAT MSR value, PA0 first."""
    return tuple(pat_type(pat_msr, i) for i in range(8))


def make_pat(*types: MemType | int) -> int:
    """Build a PAT MSR value from up to eight types (PA0 first).

    Missing trailing entries are taken from :data:`PAT_DEFAULT`.
    """
    if len(types) > 8:
        raise ValueError("a PAT has eight entries")
    value = PAT_DEFAULT
    for i, t in enumerate(types):
        value &= ~(0xFF << (8 * i))
        value |= (int(t) & 0xFF) << (8 * i)
    return value


_MTRR_TYPES = frozenset({MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB})


def effective_type(mtrr: MemType | int, pat: MemType | int) -> MemType:
    """SDM Table 11-7: the effective type of an MTRR type and a PAT type.

    Applies when CR0.CD = 0 and CR0.NW = 0 (spec/memtype.md §3). By PAT
    type: UC -> UC; WC -> WC (even over MTRR UC); UC- -> WC if the MTRR is
    WC or WP, else UC; WT and WP -> UC if the MTRR is UC or WC, else the PAT
    type; WB -> the MTRR type. ``mtrr`` must be an MTRR type (UC- is not).
    """
    m = MemType(mtrr)
    p = MemType(pat)
    if m not in _MTRR_TYPES:
        raise ValueError(f"{m.label} is not an MTRR memory type")
    if p is MemType.UC:
        return MemType.UC
    if p is MemType.WC:
        return MemType.WC
    if p is MemType.UC_MINUS:
        return MemType.WC if m in (MemType.WC, MemType.WP) else MemType.UC
    if p in (MemType.WT, MemType.WP):
        return MemType.UC if m in (MemType.UC, MemType.WC) else p
    return m  # PAT WB: the MTRR type
