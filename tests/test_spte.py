"""SPTE construction rules (arch/x86/kvm/mmu/spte.c, spte.h; spec/kvm-mmu.md §3.10, §4)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from kvmmu import spte as S

EPT = S.SpteFormat(
    name="ept",
    present_mask=0,
    user_mask=1,
    x_mask=4,
    nx_mask=0,
    accessed_mask=1 << 8,
    dirty_mask=1 << 9,
    host_writable_mask=1 << 57,
    mmu_writable_mask=1 << 58,
    mmio_value=6,
    mmio_mask=7,
    mmio_access_mask=0,
    acc_track_mask=7,
    memtype_mask=0x78,
    ad_enabled=False,
)
NPT = S.SpteFormat(
    name="npt",
    present_mask=1,
    user_mask=4,
    x_mask=0,
    nx_mask=1 << 63,
    accessed_mask=1 << 5,
    dirty_mask=1 << 6,
    host_writable_mask=1 << 9,
    mmu_writable_mask=1 << 10,
    mmio_value=(1 << 51) | 1,
    mmio_mask=(1 << 51) | 1,
    mmio_access_mask=6,
    acc_track_mask=0,
    memtype_mask=0,
    ad_enabled=True,
)


def _make(fmt: S.SpteFormat, **kw: object) -> tuple[int, bool]:
    args: dict[str, object] = dict(
        level=1,
        pfn=0x1234,
        old_spte=0,
        pte_access=S.ACC_ALL,
        prefetch=False,
        synchronizing=False,
        host_writable=True,
        mt_mask=None,
        nx_huge_pages=False,
        ad_disabled=not fmt.ad_enabled,
        try_unsync=lambda: 0,
    )
    args.update(kw)
    return S.make_spte(fmt, **args)  # type: ignore[arg-type]


@given(st.integers(0, (1 << 19) - 1), st.integers(0, (1 << 34) - 1))
def test_mmio_generation_roundtrip_19_bits(gen: int, gfn: int) -> None:
    spte = S.make_mmio_spte(NPT, gfn, S.ACC_ALL, gen)
    assert S.get_mmio_spte_generation(spte) == gen
    assert S.get_mmio_spte_gfn(spte) == gfn
    assert S.is_mmio_spte(NPT, spte) and not S.is_shadow_present_pte(spte)
    assert S.check_mmio_spte(spte, gen)


def test_mmio_spte_never_matches_while_update_in_progress() -> None:
    spte = S.make_mmio_spte(EPT, 5, S.ACC_ALL, 42)
    assert not S.check_mmio_spte(spte, 42 | S.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS)
    assert not S.check_mmio_spte(spte, 44)
    assert spte & 7 == 6  # EPT misconfig W+X without R


def test_mmio_access_masked_per_format() -> None:
    assert S.get_mmio_spte_access(NPT, S.make_mmio_spte(NPT, 1, S.ACC_ALL, 0)) == 6
    assert S.get_mmio_spte_access(EPT, S.make_mmio_spte(EPT, 1, S.ACC_ALL, 0)) == 0


def test_make_spte_tracked_gfn_write_protected_without_mmu_writable() -> None:
    spte, wrprot = _make(NPT, try_unsync=lambda: 1)
    assert wrprot and not spte & S.PT_WRITABLE_MASK and not spte & NPT.mmu_writable_mask
    assert spte & NPT.host_writable_mask


def test_make_spte_writable_sets_w_mmu_writable_dirty() -> None:
    spte, wrprot = _make(NPT)
    assert not wrprot
    assert spte & (S.PT_WRITABLE_MASK | NPT.mmu_writable_mask | NPT.dirty_mask | NPT.accessed_mask)
    assert S.spte_to_pfn(spte) == 0x1234 and spte & S.SPTE_MMU_PRESENT_MASK


def test_make_spte_skips_unsync_when_old_leaf_writable() -> None:
    old, _ = _make(NPT)
    spte, wrprot = _make(NPT, old_spte=old, try_unsync=lambda: 1)
    assert not wrprot and spte & S.PT_WRITABLE_MASK


def test_make_spte_not_host_writable_drops_w() -> None:
    spte, wrprot = _make(NPT, host_writable=False, try_unsync=lambda: 1 / 0)
    assert not wrprot and not spte & S.PT_WRITABLE_MASK and not spte & NPT.host_writable_mask


def test_prefetch_spte_access_tracked_without_ad() -> None:
    spte, _ = _make(EPT, prefetch=True)
    assert spte & 7 == 0 and S.is_access_track_spte(EPT, spte)
    assert S.is_shadow_present_pte(spte)
    restored = S.restore_acc_track_spte(spte)
    assert restored & 7 == 5  # R and X saved; W is not saved


def test_prefetch_spte_not_accessed_with_ad() -> None:
    spte, _ = _make(NPT, prefetch=True)
    assert not spte & NPT.accessed_mask and spte & 1


def test_nx_huge_page_never_executable() -> None:
    huge, _ = _make(NPT, level=2, nx_huge_pages=True)
    assert huge & NPT.nx_mask and huge & S.PT_PAGE_SIZE_MASK
    child = S.make_small_spte(NPT, huge, 1, 3, exec_allowed=True, nx_huge_pages=True)
    assert not child & NPT.nx_mask and not child & S.PT_PAGE_SIZE_MASK
    assert S.spte_to_pfn(child) == 0x1234 + 3


def test_make_huge_spte_aligns_frame_and_drops_exec() -> None:
    small, _ = _make(EPT, pfn=0x40000 + 7, mt_mask=0x30)
    huge = S.make_huge_spte(EPT, small, 2, nx_huge_pages=True)
    assert S.spte_to_pfn(huge) == 0x40000 and huge & S.PT_PAGE_SIZE_MASK
    assert not huge & EPT.x_mask and huge & 0x38 == 0x30  # memtype copied unchanged


def test_nonleaf_spte_has_no_memtype_and_full_access() -> None:
    spte = S.make_nonleaf_spte(EPT, 0x5000, ad_disabled=True)
    assert spte & 7 == 7 and not spte & 0x78
    assert spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED


EPT_HIGH = S.SpteFormat(
    **{
        **{f: getattr(EPT, f) for f in EPT.__dataclass_fields__},
        "mmu_present_mask": S.SPTE_MMU_PRESENT_HIGH_MASK,
        "mmio_gen_layout": S.MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH,
        "rsvd_mask": S.SPTE_MMU_PRESENT_MASK,
    }
)


@given(st.integers(0, (1 << 19) - 1), st.integers(0, (1 << 34) - 1))
def test_mmio_generation_roundtrip_19_bits_both_layouts(gen: int, gfn: int) -> None:
    for fmt in (EPT, EPT_HIGH):
        layout = fmt.mmio_gen_layout
        spte = S.make_mmio_spte(fmt, gfn, S.ACC_ALL, gen)
        assert S.get_mmio_spte_generation(spte, layout) == gen
        assert S.get_mmio_spte_gfn(spte) == gfn
        assert S.check_mmio_spte(spte, gen, layout)
        assert not S.is_shadow_present_pte(spte, fmt.mmu_present_mask)
        assert S.is_mmio_spte(fmt, spte)


def test_mmio_generation_layouts_use_the_spec_bits() -> None:
    """spec/kvm-mmu.md §3.10 (3-10, 52-62) and consumers.md T6 (3-11, 52-58, 60-62)."""
    every = (1 << 19) - 1
    low = S.generation_mmio_spte_mask(every)
    assert low == (((1 << 8) - 1) << 3) | (((1 << 11) - 1) << 52)
    high = S.generation_mmio_spte_mask(every, S.MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH)
    assert high == (((1 << 9) - 1) << 3) | (((1 << 7) - 1) << 52) | (7 << 60)
    assert not high & S.SPTE_MMU_PRESENT_HIGH_MASK and high & (1 << 11)
    assert not low & S.SPTE_MMU_PRESENT_MASK
    # generation bit 8 moves from SPTE bit 52 to bit 11; bit 15 from 59 to 58; 16 to 60
    assert S.generation_mmio_spte_mask(1 << 8) == 1 << 52
    assert S.generation_mmio_spte_mask(1 << 8, S.MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH) == 1 << 11
    assert S.generation_mmio_spte_mask(1 << 16, S.MMIO_SPTE_GEN_LAYOUT_PRESENT_HIGH) == 1 << 60


def test_format_rejects_bad_generation_layouts() -> None:
    import pytest

    fields = {f: getattr(EPT, f) for f in EPT.__dataclass_fields__}
    with pytest.raises(ValueError, match="19 bits"):
        S.SpteFormat(**{**fields, "mmio_gen_layout": ((3, 8), (52, 10))})
    with pytest.raises(ValueError, match="MMU-present"):
        S.SpteFormat(**{**fields, "mmu_present_mask": 1 << 59})  # 52-62 covers 59


def test_present_high_format_sets_bit59_never_bit11() -> None:
    spte, _ = _make(EPT_HIGH)
    assert spte & S.SPTE_MMU_PRESENT_HIGH_MASK and not spte & S.SPTE_MMU_PRESENT_MASK
    assert S.is_shadow_present_pte(spte, EPT_HIGH.mmu_present_mask)
    assert not S.is_shadow_present_pte(spte)  # the default mask is bit 11
    nl = S.make_nonleaf_spte(EPT_HIGH, 0x5000, False)
    assert nl & S.SPTE_MMU_PRESENT_HIGH_MASK and not nl & EPT_HIGH.rsvd_mask
    tracked = S.mark_spte_for_access_track(EPT_HIGH, spte)
    assert S.is_shadow_present_pte(tracked, EPT_HIGH.mmu_present_mask)


def test_mark_spte_for_access_track_with_ad_clears_only_accessed() -> None:
    """§4.5: with A/D enabled only Accessed is cleared; RWX stay."""
    spte, _ = _make(NPT)
    assert spte & NPT.accessed_mask
    tracked = S.mark_spte_for_access_track(NPT, spte)
    assert tracked == spte & ~NPT.accessed_mask


def test_access_track_saves_r_and_x_not_w_and_restores_them() -> None:
    """§4.4/§4.5: without A/D, R and X are saved at bits 54/56 and RWX is
    cleared (hardware-non-present, still MMU-present); W is not saved."""
    spte, _ = _make(EPT, pte_access=S.ACC_ALL)
    assert spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED
    assert spte & 7 == 7
    tracked = S.mark_spte_for_access_track(EPT, spte)
    assert tracked & 7 == 0 and S.is_shadow_present_pte(tracked)
    assert S.is_access_track_spte(EPT, tracked)
    assert (tracked >> 54) & 1 and (tracked >> 56) & 1 and not (tracked >> 55) & 1
    assert S.mark_spte_for_access_track(EPT, tracked) == tracked  # idempotent
    restored = S.restore_acc_track_spte(tracked)
    assert restored & 7 == 5 and not restored & S.SHADOW_ACC_TRACK_SAVED_MASK
    assert restored & EPT.mmu_writable_mask  # MMU-writable kept: fast path may restore W


def test_make_spte_synchronizing_prefetch_is_accessed_not_tracked() -> None:
    """§3.12 step 2/7: ``prefetch && !synchronizing`` marks for access
    tracking; a synchronizing prefetch gets Accessed."""
    spte, _ = _make(NPT, prefetch=True, synchronizing=True)
    assert spte & NPT.accessed_mask
    spte, _ = _make(EPT, prefetch=True, synchronizing=True)
    assert spte & 7 == 7 and not S.is_access_track_spte(EPT, spte)


def test_make_spte_access_bits_per_format() -> None:
    """§3.12 step 4, §4.3: X/NX from ACC_EXEC, U (EPT: R) from ACC_USER, PS above 4K."""
    spte, _ = _make(NPT, pte_access=S.ACC_WRITE_MASK)
    assert spte & NPT.nx_mask and not spte & NPT.user_mask and not spte & S.PT_PAGE_SIZE_MASK
    spte, _ = _make(EPT, pte_access=S.ACC_EXEC_MASK, level=3)
    assert spte & EPT.x_mask and not spte & 1 and spte & S.PT_PAGE_SIZE_MASK
    assert not spte & S.PT_WRITABLE_MASK and not spte & EPT.mmu_writable_mask
    # NX huge only strips exec above 4K
    spte, _ = _make(NPT, nx_huge_pages=True)
    assert not spte & NPT.nx_mask


def test_is_access_allowed_exec_write_read() -> None:
    """§3.11 step 2: exec needs X (EPT X / NX clear), write needs W, read bit 0."""
    assert S.is_access_allowed(EPT, 4, write=False, exec_=True)
    assert not S.is_access_allowed(EPT, 4, write=False, exec_=False)  # exec-only: no read
    assert not S.is_access_allowed(NPT, 1 | NPT.nx_mask, write=False, exec_=True)
    assert S.is_access_allowed(NPT, 1, write=False, exec_=True)
    assert not S.is_access_allowed(NPT, 1, write=True, exec_=False)
    assert S.is_access_allowed(NPT, 3, write=True, exec_=False)


def test_make_small_spte_above_4k_keeps_ps_and_exec() -> None:
    """§4.6: splitting 1G into 2M children keeps PS and does not restore X
    (only 4K children get X back); memtype is copied unchanged."""
    huge, _ = _make(EPT, level=3, pfn=0x40000, mt_mask=0x30, nx_huge_pages=True)
    assert not huge & EPT.x_mask
    child = S.make_small_spte(EPT, huge, 2, 5, exec_allowed=True, nx_huge_pages=True)
    assert child & S.PT_PAGE_SIZE_MASK and not child & EPT.x_mask
    assert S.spte_to_pfn(child) == 0x40000 + 5 * 512 and child & 0x38 == 0x30
    leaf = S.make_small_spte(EPT, child, 1, 1, exec_allowed=False, nx_huge_pages=True)
    assert not leaf & EPT.x_mask  # the role forbids exec


def test_make_spte_executable_keeps_access_tracking() -> None:
    """§4.6/kvm-mmu-2 §5.2: X restored on an access-tracked SPTE goes into
    the saved bits; the SPTE stays access-tracked."""
    spte, _ = _make(EPT, level=2, nx_huge_pages=True)
    tracked = S.mark_spte_for_access_track(EPT, spte)
    x = S.make_spte_executable(EPT, tracked)
    assert S.is_access_track_spte(EPT, x) and x & 7 == 0
    assert S.restore_acc_track_spte(x) & EPT.x_mask
    assert not S.make_spte_nonexecutable(EPT, S.restore_acc_track_spte(x)) & EPT.x_mask
