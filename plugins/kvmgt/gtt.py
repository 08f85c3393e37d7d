"""Gen8+ GTT entry formats as GVT-g sees them.

Bit definitions come from ``drivers/gpu/drm/i915/gt/intel_gtt.h`` and the
pte ops of ``drivers/gpu/drm/i915/gvt/gtt.c`` (``gen8_gtt_pte_ops``); the
type enum and the type table from ``gvt/gtt.h`` / ``gtt_type_table``
(spec/consumers.md §1.2). Entries are plain ``int`` values (u64); an entry's
*type* travels next to it, as ``struct intel_gvt_gtt_entry`` does.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ADDR_1G_MASK",
    "ADDR_2M_MASK",
    "ADDR_4K_MASK",
    "ADDR_64K_MASK",
    "GEN8_PAGE_PRESENT",
    "GEN8_PAGE_RW",
    "GEN8_PDE_IPS_64K",
    "GTT_64K_PTE_STRIDE",
    "GTT_ENTRY_NUM_IN_ONE_PAGE",
    "GTT_HAW",
    "GTT_SPTE_FLAG_64K_SPLITED",
    "GTT_SPTE_FLAG_MASK",
    "PAGE_DIRTY",
    "PAGE_PAT",
    "PAGE_PAT_LARGE",
    "PAGE_PCD",
    "PAGE_PSE",
    "PAGE_PWT",
    "PPAT_CACHED",
    "PPAT_CACHED_PDE",
    "PPAT_DISPLAY_ELLC",
    "PPAT_UNCACHED",
    "GttType",
    "clear_pse",
    "entry_type",
    "get_pfn",
    "gma_index",
    "is_leaf_type",
    "next_pt_type",
    "pse_type",
    "real_type",
    "set_pfn",
    "test_present",
]

#: ``GEN8_PAGE_PRESENT`` / ``GEN8_PAGE_RW`` (bits 0 and 1).
GEN8_PAGE_PRESENT = 1 << 0
GEN8_PAGE_RW = 1 << 1
PAGE_PWT = 1 << 3
PAGE_PCD = 1 << 4
#: ``_PAGE_DIRTY``: cleared in a PDE whose 2M entry is split (``split_2MB_gtt_entry``).
PAGE_DIRTY = 1 << 6
#: ``_PAGE_PSE``: PS in a PDE (``GEN8_PDE_PS_2M``) or PDPE (``GEN8_PDPE_PS_1G``).
PAGE_PSE = 1 << 7
#: ``_PAGE_PAT`` (bit 7 of a 4K PTE) and ``_PAGE_PAT_LARGE`` (bit 12 of a PS entry).
PAGE_PAT = 1 << 7
PAGE_PAT_LARGE = 1 << 12
#: ``GEN8_PDE_IPS_64K``: bit 11 of a PDE, the PT below holds 64K entries.
GEN8_PDE_IPS_64K = 1 << 11
PPAT_UNCACHED = PAGE_PWT | PAGE_PCD
PPAT_CACHED_PDE = 0
PPAT_CACHED = PAGE_PAT
PPAT_DISPLAY_ELLC = PAGE_PCD

#: ``GTT_HAW`` and the address masks (``GENMASK_ULL(GTT_HAW - 1, n)``).
GTT_HAW = 46
ADDR_1G_MASK = ((1 << GTT_HAW) - 1) & ~((1 << 30) - 1)
ADDR_2M_MASK = ((1 << GTT_HAW) - 1) & ~((1 << 21) - 1)
ADDR_64K_MASK = ((1 << GTT_HAW) - 1) & ~((1 << 16) - 1)
ADDR_4K_MASK = ((1 << GTT_HAW) - 1) & ~((1 << 12) - 1)
#: GVT's private shadow-entry flags, bits 62:52; bit 52 marks a split 64K entry.
GTT_SPTE_FLAG_MASK = ((1 << 63) - 1) & ~((1 << 52) - 1)
GTT_SPTE_FLAG_64K_SPLITED = 1 << 52
GTT_64K_PTE_STRIDE = 16
GTT_ENTRY_NUM_IN_ONE_PAGE = 512


class GttType(IntEnum):
    """``intel_gvt_gtt_type_t`` in the kernel's order (gvt/gtt.h)."""

    INVALID = 0
    GGTT_PTE = 1
    PPGTT_PTE_4K_ENTRY = 2
    PPGTT_PTE_64K_ENTRY = 3
    PPGTT_PTE_2M_ENTRY = 4
    PPGTT_PTE_1G_ENTRY = 5
    PPGTT_PTE_ENTRY = 6
    PPGTT_PDE_ENTRY = 7
    PPGTT_PDP_ENTRY = 8
    PPGTT_PML4_ENTRY = 9
    PPGTT_ROOT_ENTRY = 10
    PPGTT_ROOT_L3_ENTRY = 11
    PPGTT_ROOT_L4_ENTRY = 12
    PPGTT_ENTRY = 13
    PPGTT_PTE_PT = 14
    PPGTT_PDE_PT = 15
    PPGTT_PDP_PT = 16
    PPGTT_PML4_PT = 17
    MAX = 18


T = GttType
# gtt_type_table: type -> (entry_type, pt_type, next_pt_type, pse_entry_type)
_TABLE: dict[GttType, tuple[GttType, GttType, GttType, GttType]] = {
    T.PPGTT_ROOT_L4_ENTRY: (T.PPGTT_ROOT_L4_ENTRY, T.INVALID, T.PPGTT_PML4_PT, T.INVALID),
    T.PPGTT_PML4_PT: (T.PPGTT_PML4_ENTRY, T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.INVALID),
    T.PPGTT_PML4_ENTRY: (T.PPGTT_PML4_ENTRY, T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.INVALID),
    T.PPGTT_PDP_PT: (T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_ROOT_L3_ENTRY: (T.PPGTT_ROOT_L3_ENTRY, T.INVALID, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_PDP_ENTRY: (T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_PDE_PT: (T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT, T.PPGTT_PTE_2M_ENTRY),
    T.PPGTT_PDE_ENTRY: (T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT, T.PPGTT_PTE_2M_ENTRY),
    # "We take IPS bit as 'PSE' for PTE level."
    T.PPGTT_PTE_PT: (T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_4K_ENTRY: (T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_64K_ENTRY: (T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_2M_ENTRY: (T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.INVALID, T.PPGTT_PTE_2M_ENTRY),
    T.PPGTT_PTE_1G_ENTRY: (T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.INVALID, T.PPGTT_PTE_1G_ENTRY),
    T.GGTT_PTE: (T.GGTT_PTE, T.INVALID, T.INVALID, T.INVALID),
}


def entry_type(t: GttType) -> GttType:
    """``get_entry_type``: the type of the entries inside a table of type ``t``."""
    return _TABLE[t][0]


def next_pt_type(t: GttType) -> GttType:
    """``get_next_pt_type``: the table an entry of type ``t`` points to (or INVALID)."""
    return _TABLE[t][2]


def pse_type(t: GttType) -> GttType:
    """``get_pse_type``: the leaf type when PS (or IPS at PTE level) is set."""
    return _TABLE[t][3]


def is_leaf_type(t: GttType) -> bool:
    """An entry that maps memory rather than pointing to a table."""
    return next_pt_type(t) == GttType.INVALID


def real_type(t: GttType, value: int, ips: bool) -> GttType:
    """``update_entry_type_for_real``: PS makes a PDE/PDPE a leaf; IPS makes a PTE 64K."""
    if t in (GttType.PPGTT_PDE_ENTRY, GttType.PPGTT_PDP_ENTRY):
        return pse_type(t) if value & PAGE_PSE else t
    if t == GttType.PPGTT_PTE_4K_ENTRY:
        return pse_type(t) if ips else t
    return t


def _mask(t: GttType) -> int:
    if t == GttType.PPGTT_PTE_1G_ENTRY:
        return ADDR_1G_MASK
    if t == GttType.PPGTT_PTE_2M_ENTRY:
        return ADDR_2M_MASK
    if t == GttType.PPGTT_PTE_64K_ENTRY:
        return ADDR_64K_MASK
    return ADDR_4K_MASK


def get_pfn(value: int, t: GttType) -> int:
    """``gen8_gtt_get_pfn``: the 4K frame number, masked by the entry's page size."""
    return (value & _mask(t)) >> 12


def set_pfn(value: int, t: GttType, pfn: int) -> int:
    """``gen8_gtt_set_pfn``: replace the address bits (the pfn is masked to the size)."""
    m = _mask(t)
    return (value & ~m) | ((pfn << 12) & m)


def test_present(value: int, t: GttType) -> bool:
    """``gen8_gtt_test_present``: root pointers count as present when non-zero.

    "i915 writes PDP root pointer registers without present bit"
    (``drivers/gpu/drm/i915/gvt/gtt.c: gen8_gtt_test_present``).
    """
    if t in (GttType.PPGTT_ROOT_L3_ENTRY, GttType.PPGTT_ROOT_L4_ENTRY):
        return value != 0
    return bool(value & GEN8_PAGE_PRESENT)


def clear_pse(value: int, t: GttType) -> tuple[int, GttType]:
    """``gen8_gtt_clear_pse``: a 2M/1G leaf becomes a PDE/PDPE pointer."""
    if not value & PAGE_PSE:
        return value, t
    if t == GttType.PPGTT_PTE_2M_ENTRY:
        return value & ~PAGE_PSE, GttType.PPGTT_PDE_ENTRY
    if t == GttType.PPGTT_PTE_1G_ENTRY:
        return value & ~PAGE_PSE, GttType.PPGTT_PDP_ENTRY
    return value, t


def gma_index(gma: int, level_pt: GttType, *, l3: bool = False) -> int:
    """``DEFINE_PPGTT_GMA_TO_INDEX``: the index of ``gma`` inside a table of that type."""
    if level_pt == GttType.PPGTT_PML4_PT:
        return gma >> 39 & 0x1FF
    if level_pt == GttType.PPGTT_PDP_PT:
        return gma >> 30 & (0x3 if l3 else 0x1FF)
    if level_pt == GttType.PPGTT_PDE_PT:
        return gma >> 21 & 0x1FF
    if level_pt == GttType.PPGTT_PTE_PT:
        return gma >> 12 & 0x1FF
    raise ValueError(f"gma_index: {level_pt.name} is not a page-table type")
