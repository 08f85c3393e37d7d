"""SPTE formats: the global masks a vendor chooses, and KVM's software bits.

The format is the set of ``shadow_*_mask`` values KVM sets once at module
load (``arch/x86/kvm/mmu/spte.c: kvm_mmu_set_ept_masks`` for EPT,
``kvm_mmu_reset_all_pte_masks`` for NPT and shadow paging; spec/kvm-mmu.md
§4.3). The vendor plugin returns one from ``kvmmu_spte_format``; the MMU
builds every SPTE from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ACC_ALL",
    "ACC_EXEC_MASK",
    "ACC_USER_MASK",
    "ACC_WRITE_MASK",
    "FROZEN_SPTE",
    "KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS",
    "KVM_PAGES_PER_HPAGE",
    "MMIO_GPA_MASK",
    "MMIO_SPTE_GEN_HIGH_END",
    "MMIO_SPTE_GEN_HIGH_MASK",
    "MMIO_SPTE_GEN_HIGH_SHIFT",
    "MMIO_SPTE_GEN_HIGH_START",
    "MMIO_SPTE_GEN_LAYOUT",
    "MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH",
    "MMIO_SPTE_GEN_LOW_BITS",
    "MMIO_SPTE_GEN_LOW_END",
    "MMIO_SPTE_GEN_LOW_MASK",
    "MMIO_SPTE_GEN_LOW_SHIFT",
    "MMIO_SPTE_GEN_LOW_START",
    "MMIO_SPTE_GEN_MASK",
    "PAGE_SHIFT",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "PT_PAGE_SIZE_MASK",
    "PT_PRESENT_MASK",
    "PT_WRITABLE_MASK",
    "SHADOW_ACC_TRACK_SAVED_BITS_MASK",
    "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT",
    "SHADOW_ACC_TRACK_SAVED_MASK",
    "SHADOW_NONPRESENT_VALUE",
    "SPTE_BASE_ADDR_MASK",
    "SPTE_MMU_PRESENT_HIGH_MASK",
    "SPTE_MMU_PRESENT_MASK",
    "SPTE_TDP_AD_DISABLED",
    "SPTE_TDP_AD_ENABLED",
    "SPTE_TDP_AD_MASK",
    "SPTE_TDP_AD_SHIFT",
    "SPTE_TDP_AD_WRPROT_ONLY",
    "SpteFormat",
    "check_mmio_spte",
    "generation_mmio_spte_mask",
    "get_mmio_spte_access",
    "get_mmio_spte_generation",
    "get_mmio_spte_gfn",
    "is_access_allowed",
    "is_access_track_spte",
    "is_executable_pte",
    "is_large_pte",
    "is_last_spte",
    "is_mmio_spte",
    "is_mmu_writable_spte",
    "is_shadow_present_pte",
    "is_writable_pte",
    "make_huge_spte",
    "make_mmio_spte",
    "make_nonleaf_spte",
    "make_small_spte",
    "make_spte",
    "make_spte_executable",
    "make_spte_nonexecutable",
    "mark_spte_for_access_track",
    "restore_acc_track_spte",
    "spte_ad_enabled",
    "spte_to_pfn",
]

#: ``SPTE_MMU_PRESENT_MASK``: bit 11 in every shadow-present SPTE (spec/kvm-mmu.md §4.4).
SPTE_MMU_PRESENT_MASK = 1 << 11
#: Bit 59: ``SPTE_MMU_PRESENT_MASK`` with ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH``
#: (VT-d reserves bit 11; spec/consumers.md T6 [TDP-24]).
SPTE_MMU_PRESENT_HIGH_MASK = 1 << 59
#: The MMIO generation layout (``MMIO_SPTE_GEN_*``, spte.h; spec/kvm-mmu.md
#: §3.10) as ``(spte_shift, bits)`` pieces, lowest generation bits first:
#: bits 0-7 in SPTE bits 3-10, bits 8-18 in SPTE bits 52-62.
MMIO_SPTE_GEN_LAYOUT: tuple[tuple[int, int], ...] = ((3, 8), (52, 11))
#: With the MMU-present bit at 59 (spec/consumers.md T6 [TDP-24]): low 3-11
#: (9 bits; MMIO SPTEs may use bit 11, VT-d never walks them), mid 52-58 (7),
#: high 60-62 (3).
MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH: tuple[tuple[int, int], ...] = ((3, 9), (52, 7), (60, 3))
#: ``PT_WRITABLE_MASK``: bit 1, W in both EPT and x86 formats.
PT_WRITABLE_MASK = 1 << 1
#: ``PT_PAGE_SIZE_MASK``: bit 7, PS in huge leaves (EPT and x86).
PT_PAGE_SIZE_MASK = 1 << 7
#: ACC bits (``arch/x86/kvm/mmu/spte.h``).
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = 7


@dataclass(frozen=True, slots=True)
class SpteFormat:
    """One vendor's SPTE format (spec/kvm-mmu.md §4.1–4.4).

    ``name`` is ``"ept"``, ``"npt"`` or ``"shadow"``. The masks carry KVM's
    names without the ``shadow_`` prefix. ``memtype_mask`` is
    ``shadow_memtype_mask`` (EPT ``0x78``, else 0). ``max_level`` is the
    largest huge-page level the MMU may map (1 = 4K, 2 = 2M, 3 = 1G);
    ``root_level`` the paging depth (4 or 5). ``mmu_present_mask`` is
    ``SPTE_MMU_PRESENT_MASK`` (bit 11, or bit 59 with
    ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH``, spec/consumers.md T6);
    ``mmio_gen_layout`` the ``(spte_shift, bits)`` pieces of the 19-bit MMIO
    generation; ``rsvd_mask`` bits that must be clear in every
    shadow-present SPTE (the part of ``shadow_zero_check`` the model checks:
    bit 11 with the present bit high).
    """

    name: str
    present_mask: int
    user_mask: int
    x_mask: int
    nx_mask: int
    accessed_mask: int
    dirty_mask: int
    host_writable_mask: int
    mmu_writable_mask: int
    mmio_value: int
    mmio_mask: int
    mmio_access_mask: int
    acc_track_mask: int
    memtype_mask: int
    ad_enabled: bool
    max_level: int = 3
    root_level: int = 4
    writable_mask: int = PT_WRITABLE_MASK
    large_mask: int = PT_PAGE_SIZE_MASK
    mmu_present_mask: int = SPTE_MMU_PRESENT_MASK
    mmio_gen_layout: tuple[tuple[int, int], ...] = MMIO_SPTE_GEN_LAYOUT
    rsvd_mask: int = 0

    def __post_init__(self) -> None:
        if sum(bits for _, bits in self.mmio_gen_layout) != 19:
            raise ValueError(f"mmio_gen_layout {self.mmio_gen_layout} must hold 19 bits")
        gen = _gen_spte_bits(self.mmio_gen_layout)
        if gen & self.mmu_present_mask:
            raise ValueError("the MMIO generation must not use the MMU-present bit")

    @property
    def mmio_caching(self) -> bool:
        """MMIO SPTEs are cached only when ``shadow_mmio_value`` is non-zero (§3.10)."""
        return self.mmio_value != 0


# ---------------------------------------------------------------------------
# KVM software bits and helpers (arch/x86/kvm/mmu/spte.h, spte.c;
# spec/kvm-mmu.md §4.4–4.6). Everything below works on plain Python ints.
# ---------------------------------------------------------------------------

PAGE_SHIFT = 12
#: ``PT_PRESENT_MASK``: bit 0 (P on x86, R on EPT); what a read needs.
PT_PRESENT_MASK = 1 << 0
#: ``SPTE_BASE_ADDR_MASK``: the frame, bits 51:12.
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
#: ``SPTE_TDP_AD_SHIFT``/``SPTE_TDP_AD_MASK``: the A/D type, bits 53:52.
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT
#: ``SHADOW_ACC_TRACK_SAVED_BITS_MASK`` (R|X) saved at bit 54 (spec §4.4).
SHADOW_ACC_TRACK_SAVED_BITS_MASK = 0x5
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
SHADOW_ACC_TRACK_SAVED_MASK = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
#: ``FROZEN_SPTE`` (formerly ``REMOVED_SPTE``): non-present marker (spec §4.4).
FROZEN_SPTE = 0x5A0
#: ``SHADOW_NONPRESENT_VALUE``: a zapped SPTE. The model writes 0 (no
#: ``SUPPRESS_VE`` in non-present SPTEs; EPT #VE is not modelled).
SHADOW_NONPRESENT_VALUE = 0

#: MMIO generation layout (``MMIO_SPTE_GEN_*``, spte.h; spec/kvm-mmu.md §3.10):
#: generation bits 0–7 in SPTE bits 3–10, bits 8–18 in SPTE bits 52–62.
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1
MMIO_SPTE_GEN_LOW_MASK = ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_MASK = (
    (1 << (MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1)) - 1
) << MMIO_SPTE_GEN_HIGH_START
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS
#: ``MMIO_SPTE_GEN_MASK``: 19 bits of the memslots generation.
MMIO_SPTE_GEN_MASK = (1 << 19) - 1
#: ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS``: bit 63 of the memslots generation.
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
#: ``shadow_nonpresent_or_rsvd_lower_gfn_mask`` with the L1TF relocation off
#: (``shadow_nonpresent_or_rsvd_mask`` = 0 in the model: hosts without
#: X86_BUG_L1TF); the gpa of an MMIO SPTE sits in bits 51:12.
MMIO_GPA_MASK = SPTE_BASE_ADDR_MASK

#: Levels: ``PG_LEVEL_4K`` = 1, 2M = 2, 1G = 3.
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    """Number of 4K pages one SPTE at ``level`` maps (1, 512, 262144, ...)."""
    return 1 << (9 * (level - 1))


def is_shadow_present_pte(spte: int, mask: int = SPTE_MMU_PRESENT_MASK) -> bool:
    """``is_shadow_present_pte``: ``SPTE_MMU_PRESENT_MASK`` set (§4.4).

    ``mask`` is the format's ``mmu_present_mask`` (bit 59 with the T6 move).
    """
    return bool(spte & mask)


def is_large_pte(spte: int) -> bool:
    """``is_large_pte``: PS (bit 7) set."""
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    """``is_last_spte``: a 4K entry, or a huge leaf."""
    return level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE_MASK)


def is_writable_pte(spte: int) -> bool:
    """``is_writable_pte``: hardware W (bit 1)."""
    return bool(spte & PT_WRITABLE_MASK)


def spte_to_pfn(spte: int) -> int:
    """``spte_to_pfn``: the frame in bits 51:12."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def is_mmio_spte(fmt: SpteFormat, spte: int) -> bool:
    """``is_mmio_spte``: ``(spte & mmio_mask) == mmio_value`` and caching on (§3.10)."""
    return fmt.mmio_value != 0 and (spte & fmt.mmio_mask) == fmt.mmio_value


def is_mmu_writable_spte(fmt: SpteFormat, spte: int) -> bool:
    """``is_mmu_writable_spte``: the MMU-writable software bit (§4.4)."""
    return bool(spte & fmt.mmu_writable_mask)


def is_executable_pte(fmt: SpteFormat, spte: int) -> bool:
    """``is_executable_pte``: ``(spte & (x_mask | nx_mask)) == x_mask``."""
    return (spte & (fmt.x_mask | fmt.nx_mask)) == fmt.x_mask


def spte_ad_enabled(spte: int) -> bool:
    """``spte_ad_enabled``: the AD type is not ``SPTE_TDP_AD_DISABLED``."""
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED


def is_access_track_spte(fmt: SpteFormat, spte: int) -> bool:
    """``is_access_track_spte``: A/D disabled and the acc-track bits clear (§4.5)."""
    return not spte_ad_enabled(spte) and (spte & fmt.acc_track_mask) == 0


def is_access_allowed(fmt: SpteFormat, spte: int, *, write: bool, exec_: bool) -> bool:
    """``is_access_allowed`` (mmu.c): exec needs X, write needs W, read needs bit 0."""
    if exec_:
        return is_executable_pte(fmt, spte)
    if write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & PT_PRESENT_MASK)


def _gen_spte_bits(layout: tuple[tuple[int, int], ...]) -> int:
    """The SPTE bits a generation layout occupies."""
    out = 0
    for shift, bits in layout:
        out |= ((1 << bits) - 1) << shift
    return out


def generation_mmio_spte_mask(
    gen: int, layout: tuple[tuple[int, int], ...] = MMIO_SPTE_GEN_LAYOUT
) -> int:
    """``generation_mmio_spte_mask``: spread 19 generation bits into the SPTE.

    ``layout`` is the format's ``mmio_gen_layout`` (two pieces, or three with
    the T6 present-high split).
    """
    mask = 0
    pos = 0
    for shift, bits in layout:
        mask |= ((gen >> pos) & ((1 << bits) - 1)) << shift
        pos += bits
    return mask


def get_mmio_spte_generation(
    spte: int, layout: tuple[tuple[int, int], ...] = MMIO_SPTE_GEN_LAYOUT
) -> int:
    """``get_mmio_spte_generation``: gather the 19 generation bits back."""
    gen = 0
    pos = 0
    for shift, bits in layout:
        gen |= ((spte >> shift) & ((1 << bits) - 1)) << pos
        pos += bits
    return gen


def get_mmio_spte_gfn(spte: int, phys_bits: int = 46) -> int:
    """``get_mmio_spte_gfn``: bits ``phys_bits-1:12`` (no L1TF relocation).

    ``shadow_nonpresent_or_rsvd_lower_gfn_mask`` stops below the host
    MAXPHYADDR, so MMIO marker bits above it (bit 51 on NPT) are not read.
    """
    return (spte & ((1 << phys_bits) - 1) & MMIO_GPA_MASK) >> PAGE_SHIFT


def get_mmio_spte_access(fmt: SpteFormat, spte: int) -> int:
    """``get_mmio_spte_access``: the ACC bits kept under ``mmio_access_mask``."""
    return spte & fmt.mmio_access_mask


def make_mmio_spte(fmt: SpteFormat, gfn: int, access: int, memslots_generation: int) -> int:
    """``make_mmio_spte`` (spte.c; spec/kvm-mmu.md §3.10).

    generation bits | ``mmio_value`` | (access & ``mmio_access_mask``) | gpa.
    The IN_PROGRESS bit (63) is outside ``MMIO_SPTE_GEN_MASK`` and so is
    never encoded.
    """
    gen = memslots_generation & MMIO_SPTE_GEN_MASK
    spte = generation_mmio_spte_mask(gen, fmt.mmio_gen_layout)
    spte |= fmt.mmio_value | (access & fmt.mmio_access_mask)
    spte |= (gfn << PAGE_SHIFT) & MMIO_GPA_MASK
    return spte


def check_mmio_spte(
    spte: int,
    memslots_generation: int,
    layout: tuple[tuple[int, int], ...] = MMIO_SPTE_GEN_LAYOUT,
) -> bool:
    """``check_mmio_spte`` (mmu.c): false while a memslot update is in progress,
    or when the SPTE's generation differs from the memslots generation."""
    if memslots_generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return (memslots_generation & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte, layout)


def mark_spte_for_access_track(fmt: SpteFormat, spte: int) -> int:
    """``mark_spte_for_access_track`` (spte.c; spec/kvm-mmu.md §4.5).

    With A/D: clear Accessed. Without: save R and X at bits 54/56 and clear
    RWX and Accessed, so the SPTE is hardware-non-present but still
    ``MMU_PRESENT``.
    """
    if spte_ad_enabled(spte):
        return spte & ~fmt.accessed_mask
    if is_access_track_spte(fmt, spte):
        return spte
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    return spte & ~(fmt.acc_track_mask | fmt.accessed_mask)


def restore_acc_track_spte(spte: int) -> int:
    """``restore_acc_track_spte``: move the saved R/X bits back (spte.h)."""
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~SHADOW_ACC_TRACK_SAVED_MASK
    return spte | saved


def make_spte_executable(fmt: SpteFormat, spte: int) -> int:
    """``make_spte_executable``: set X / clear NX, keeping access tracking."""
    tracked = is_access_track_spte(fmt, spte)
    if tracked:
        spte = restore_acc_track_spte(spte)
    spte = (spte & ~fmt.nx_mask) | fmt.x_mask
    if tracked:
        spte = mark_spte_for_access_track(fmt, spte)
    return spte


def make_spte_nonexecutable(fmt: SpteFormat, spte: int) -> int:
    """``make_spte_nonexecutable``: clear X / set NX, keeping access tracking."""
    tracked = is_access_track_spte(fmt, spte)
    if tracked:
        spte = restore_acc_track_spte(spte)
    spte = (spte & ~fmt.x_mask) | fmt.nx_mask
    if tracked:
        spte = mark_spte_for_access_track(fmt, spte)
    return spte


def make_nonleaf_spte(fmt: SpteFormat, child_hpa: int, ad_disabled: bool) -> int:
    """``make_nonleaf_spte`` (spte.c; spec/kvm-mmu.md §4.6).

    ``mmu_present_mask | child table | present | W | U | X`` plus Accessed (or the
    AD-disabled marker). No memtype: EPT non-leaf bits 6:3 are reserved.
    """
    spte = fmt.mmu_present_mask | child_hpa | fmt.present_mask | PT_WRITABLE_MASK
    spte |= fmt.user_mask | fmt.x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= fmt.accessed_mask
    return spte


def make_spte(
    fmt: SpteFormat,
    *,
    level: int,
    pfn: int,
    old_spte: int,
    pte_access: int,
    prefetch: bool,
    synchronizing: bool,
    host_writable: bool,
    mt_mask: int | None,
    nx_huge_pages: bool,
    ad_disabled: bool,
    try_unsync: Callable[[], int],
) -> tuple[int, bool]:
    """``make_spte`` (spte.c, ≥6.x; spec/kvm-mmu.md §3.12, §4.6).

    Returns ``(new_spte, wrprot)``. ``mt_mask`` is what the vendor's
    ``get_mt_mask`` returned (``None`` when the era/vendor has none: nothing
    is folded in). ``try_unsync`` is ``mmu_try_to_unsync_pages`` for this
    gfn; it is called only when W is wanted and the old SPTE was not a
    writable leaf, and a non-zero result write-protects (no W, no
    MMU-writable). Marking the slot dirty is the caller's job (it needs the
    slot), done when the result is writable and the slot logs dirty pages.
    """
    spte = fmt.mmu_present_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    spte |= fmt.present_mask
    if not prefetch or synchronizing:
        spte |= fmt.accessed_mask
    # NX huge pages: a huge SPTE is never executable (spec kvm-mmu-2.md §5.2).
    if level > PG_LEVEL_4K and (pte_access & ACC_EXEC_MASK) and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    spte |= fmt.x_mask if pte_access & ACC_EXEC_MASK else fmt.nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= fmt.user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if mt_mask is not None:
        spte |= mt_mask
    if host_writable:
        spte |= fmt.host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << PAGE_SHIFT
    wrprot = False
    if pte_access & ACC_WRITE_MASK:
        old_writable_leaf = is_last_spte(old_spte, level) and bool(old_spte & PT_WRITABLE_MASK)
        if not old_writable_leaf and try_unsync():
            wrprot = True
        else:
            spte |= PT_WRITABLE_MASK | fmt.mmu_writable_mask | fmt.dirty_mask
    if prefetch and not synchronizing:
        spte = mark_spte_for_access_track(fmt, spte)
    return spte, wrprot


def make_small_spte(
    fmt: SpteFormat,
    huge_spte: int,
    child_level: int,
    index: int,
    *,
    exec_allowed: bool,
    nx_huge_pages: bool,
) -> int:
    """``make_small_spte`` (spte.c; spec/kvm-mmu.md §4.6).

    The child maps ``index * pages_per_child`` further on; at 4K PS is
    cleared and X comes back when the role allows exec and NX huge pages is
    on. Memtype and permissions are inherited unchanged.
    """
    child = huge_spte | ((index * KVM_PAGES_PER_HPAGE(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        child &= ~PT_PAGE_SIZE_MASK
        if exec_allowed and nx_huge_pages:
            child = make_spte_executable(fmt, child)
    return child


def make_huge_spte(fmt: SpteFormat, small_spte: int, level: int, *, nx_huge_pages: bool) -> int:
    """``make_huge_spte`` (spte.c): set PS, align the frame, drop X under NX huge."""
    huge = small_spte | PT_PAGE_SIZE_MASK
    huge &= ~(((KVM_PAGES_PER_HPAGE(level)) - 1) << PAGE_SHIFT)
    if nx_huge_pages:
        huge = make_spte_nonexecutable(fmt, huge)
    return huge
