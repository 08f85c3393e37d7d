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
