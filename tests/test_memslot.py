"""Memslots: spec/kvm-mmu.md §1 (validation order, commit, generation),
spec/kvm-mmu-2.md §5.1 (lpage_info) and §7 (dirty log)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from kvmmu.errors import KvmError
from kvmmu.memslot import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_USER_MEM_SLOTS,
    TASK_SIZE_MAX,
    MemslotChange,
    Memslots,
)

HVA = 0x7F00_0000_0000
MB2, GB = 1 << 21, 1 << 30
U64 = (1 << 64) - 1


def kerr(fn, *a, **kw) -> KvmError:
    with pytest.raises(KvmError) as ei:
        fn(*a, **kw)
    return ei.value


def errno_of(fn, *a, **kw) -> int:
    return kerr(fn, *a, **kw).errno


@pytest.fixture
def ms() -> Memslots:
    return Memslots()


# ------------------------------------------------------------- §1.3 in order
def test_check2_v1_rejects_gmem_and_unknown_flags(ms):
    assert errno_of(ms.prepare, 0, KVM_MEM_GUEST_MEMFD, 0, 4096, HVA) == errno.EINVAL
    assert errno_of(ms.prepare, 0, 1 << 5, 0, 4096, HVA) == errno.EINVAL
    # check 2 precedes check 3 (bad slot id) and check 5 (bad size)
    e = kerr(ms.prepare, 40000, 1 << 3, 0, 5, HVA)
    assert "check 2" in e.message


def test_check3_slot_id_bounds(ms):
    ms.set_memory_region(KVM_USER_MEM_SLOTS - 1, 0, 0, 4096, HVA)  # 32763 ok
    e = kerr(ms.prepare, KVM_USER_MEM_SLOTS, 0, 0x10000, 4096, HVA)
    assert e.errno == errno.EINVAL and "check 3" in e.message
    # (u16)slot: as_id 1, id 32764 still fails check 3
    assert "check 3" in kerr(ms.prepare, (1 << 16) | KVM_USER_MEM_SLOTS, 0, 0, 4096, HVA).message


def test_check4_flags_via_region2(ms):
    e = kerr(ms.prepare, 0, KVM_MEM_GUEST_MEMFD, 0, 4096, HVA, region2=True)
    assert e.errno == errno.EINVAL and "check 4" in e.message
    gm = Memslots(supports_gmem=True)
    # gmem + LOG_DIRTY or + READONLY is refused by check 4; gmem alone passes
    for fl in (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY):
        e2 = kerr(gm.prepare, 0, KVM_MEM_GUEST_MEMFD | fl, 0, 4096, HVA, region2=True)
        assert "check 4" in e2.message
    assert gm.prepare(0, KVM_MEM_GUEST_MEMFD, 0, 4096, HVA, region2=True).change is (
        MemslotChange.CREATE
    )


@pytest.mark.parametrize(
    ("args", "check"),
    [
        ((0, 0, 0, 4095, HVA), "5"),
        ((0, 0, 0, 4096 + 1, HVA), "5"),
        ((0, 0, 0x800, 4096, HVA), "6"),
        ((0, 0, 0, 4096, HVA + 8), "7"),
        ((0, 0, 0, 4096, HVA | (1 << 57)), "7"),  # tagged (LAM)
        ((0, 0, 0, 4096, TASK_SIZE_MAX - 4096 + 4096), "7"),  # access_ok fails
        ((2 << 16, 0, 0, 4096, HVA), "9"),  # as_id 2
        ((0, 0, U64 - 0xFFF, 0x2000, 0), "10"),  # gpa + size overflows u64
        ((0, 0, 0, (KVM_MEM_MAX_NR_PAGES + 1) << 12, 0), "11"),
        ((0, 0, 0, 0, 0), "12"),  # delete a slot that does not exist
    ],
)
def test_single_check_errno(ms, args, check):
    e = kerr(ms.prepare, *args)
    assert e.errno == errno.EINVAL
    assert f"check {check})" in e.message


def test_access_ok_boundary(ms):
    # hva + size == TASK_SIZE_MAX is fine; one page more is not
    assert ms.prepare(0, 0, 0, 4096, TASK_SIZE_MAX - 4096).change is MemslotChange.CREATE
    assert errno_of(ms.prepare, 0, 0, 0, 8192, TASK_SIZE_MAX - 4096) == errno.EINVAL


def test_max_nr_pages_boundary(ms):
    size = KVM_MEM_MAX_NR_PAGES << 12
    p = ms.prepare(0, 0, 0, size, 0, max_gfn=(1 << 52) - 1)
    assert p.new is not None and p.new.npages == KVM_MEM_MAX_NR_PAGES


def test_gpa_overflow_boundary(ms):
    # the last page of the u64 space: gpa + size == 2**64 overflows
    assert "check 10" in kerr(ms.prepare, 0, 0, U64 - 0xFFF, 4096, 0).message
    # one page lower is within u64 but past kvm_mmu_max_gfn (x86 §1.5)
    e = kerr(ms.prepare, 0, 0, U64 - 0x1FFF, 4096, 0)
    assert e.errno == errno.EINVAL and "kvm_mmu_max_gfn" in e.message


def test_as_id_1_ok_2_rejected():
    ms = Memslots()
    ms.set_memory_region(1 << 16 | 3, 0, 0, 4096, HVA)
    assert ms.id_to_memslot(1, 3) is not None and ms.gfn_to_memslot(0, 1) is not None
    assert ms.gfn_to_memslot(0, 0) is None
    assert errno_of(ms.prepare, 2 << 16 | 3, 0, 0, 4096, HVA) == errno.EINVAL
    one = Memslots(nr_as_ids=1)  # private-memory VM type: no SMM address space
    assert "check 9" in kerr(one.prepare, 1 << 16, 0, 0, 4096, HVA).message


def test_check5_wins_over_check16(ms):
    ms.set_memory_region(0, 0, 0, 0x10000, HVA)
    # overlaps slot 0 (16) and has a bad size (5): 5 comes first
    e = kerr(ms.prepare, 1, 0, 0, 0x1001, HVA)
    assert e.errno == errno.EINVAL and "check 5" in e.message
    assert errno_of(ms.prepare, 1, 0, 0x8000, 0x10000, HVA) == errno.EEXIST


def test_check12b_eio(ms):
    ms.set_memory_region(0, 0, 0, 0x4000, HVA)
    ms.nr_memslot_pages = 1  # corrupt: cannot happen in the kernel (WARN)
    assert errno_of(ms.prepare, 0, 0, 0, 0, 0) == errno.EIO


def test_check13_total_pages_overflow(ms):
    ms.nr_memslot_pages = U64 - 1
    assert "check 13" in kerr(ms.prepare, 0, 0, 0, 0x2000, HVA).message


def test_check14_gmem_slot_is_immutable():
    gm = Memslots(supports_gmem=True)
    gm.set_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, 0x4000, HVA, region2=True, guest_memfd=5)
    e = kerr(gm.prepare, 0, KVM_MEM_GUEST_MEMFD, 0x4000, 0x4000, HVA, region2=True)
    assert "check 14" in e.message
    e8 = kerr(
        gm.prepare,
        1,
        KVM_MEM_GUEST_MEMFD,
        0x10000,
        0x1000,
        HVA,
        region2=True,
        guest_memfd_offset=0x800,
    )
    assert "check 8" in e8.message


@pytest.mark.parametrize(
    ("flags", "gpa", "size", "hva"),
    [
        (0, 0, 0x4000, HVA + 0x1000),  # changed userspace_addr
        (0, 0, 0x8000, HVA),  # changed size
        (KVM_MEM_READONLY, 0, 0x4000, HVA),  # READONLY toggled
    ],
)
def test_check15_modify_restrictions(ms, flags, gpa, size, hva):
    ms.set_memory_region(0, 0, 0, 0x4000, HVA)
    assert "check 15" in kerr(ms.prepare, 0, flags, gpa, size, hva).message


def test_check16_overlap_only_same_as_and_other_id(ms):
    ms.set_memory_region(0, 0, 0x10000, 0x10000, HVA)
    assert errno_of(ms.prepare, 1, 0, 0x1F000, 0x2000, HVA) == errno.EEXIST
    assert ms.prepare(1, 0, 0x20000, 0x2000, HVA).change is MemslotChange.CREATE  # adjacent
    assert ms.prepare(1 << 16 | 1, 0, 0x10000, 0x10000, HVA).change is MemslotChange.CREATE
    # moving a slot onto itself-overlapping range is fine (same id)
    assert ms.prepare(0, 0, 0x18000, 0x10000, HVA).change is MemslotChange.MOVE


def test_prepare_changes_nothing(ms):
    ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x4000, HVA)
    before = (ms.generation, ms.nr_memslot_pages, ms.nr_memslots_dirty_logging)
    for args in [(0, 0, 0x8000, 0x4000, HVA), (0, 0, 0, 0, 0), (1, 0, 0x10000, 0x1000, HVA)]:
        ms.prepare(*args)
    assert (ms.generation, ms.nr_memslot_pages, ms.nr_memslots_dirty_logging) == before
    assert ms.id_to_memslot(0, 0).base_gfn == 0 and ms.id_to_memslot(0, 1) is None


def test_classification_and_noop(ms):
    ms.set_memory_region(0, 0, 0, 0x4000, HVA)
    assert ms.prepare(0, 0, 0, 0x4000, HVA).change is None
    assert ms.prepare(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x4000, HVA).change is (
        MemslotChange.FLAGS_ONLY
    )
    assert ms.prepare(0, 0, 0x4000, 0x4000, HVA).change is MemslotChange.MOVE
    g = ms.generation
    assert ms.set_memory_region(0, 0, 0, 0x4000, HVA) is ms.id_to_memslot(0, 0)
    assert ms.generation == g


def test_arch_prepare_kvmgt_move_and_deferred_revert(ms):
    ms.set_memory_region(0, 0, 0, 0x4000, HVA)
    e = kerr(ms.prepare, 0, 0, 0x4000, 0x4000, HVA, external_page_track_user=True)
    assert e.errno == errno.EINVAL and "KVMGT" in e.message
    # kernel order: invalidate, then arch check fails, then revert: two bumps
    g = ms.generation
    p = ms.prepare(0, 0, 0x4000, 0x4000, HVA, external_page_track_user=True, defer_arch_checks=True)
    ms.install_invalid(p)
    with pytest.raises(KvmError):
        ms.arch_prepare(p)
    ms.revert_invalid(p)
    slot = ms.id_to_memslot(0, 0)
    assert slot is p.old and not slot.is_invalid and ms.generation == g + 4


def test_internal_slots(ms):
    ms.set_memory_region(KVM_USER_MEM_SLOTS, 0, 0xFEE00000, 4096, HVA, internal=True)
    assert ms.id_to_memslot(0, KVM_USER_MEM_SLOTS) is not None
    assert errno_of(ms.prepare, KVM_USER_MEM_SLOTS, 1, 0, 4096, HVA, internal=True) == errno.EINVAL


def test_uapi_width_is_a_valueerror(ms):
    with pytest.raises(ValueError, match="guest_phys_addr"):
        ms.prepare(0, 0, 1 << 64, 4096, HVA)


# ------------------------------------------------------------------ §1.4
def test_generation_arithmetic_per_address_space():
    ms = Memslots()
    assert (ms.generation_of(0), ms.generation_of(1)) == (0, 1)
    ms.set_memory_region(0, 0, 0, 0x1000, HVA)  # CREATE: one swap
    assert ms.generation_of(0) == 2 and ms.generation_of(1) == 1
    ms.set_memory_region(1 << 16, 0, 0, 0x1000, HVA)
    ms.set_memory_region(1 << 16, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x1000, HVA)  # FLAGS_ONLY
    ms.set_memory_region(1 << 16, KVM_MEM_LOG_DIRTY_PAGES, 0x1000, 0x1000, HVA)  # MOVE: 2 swaps
    ms.set_memory_region(0, 0, 0, 0, 0)  # DELETE: 2 swaps
    assert ms.generation_of(0) == 6 and ms.generation_of(1) == 9
    assert ms.generation_of(0) % 2 == 0 and ms.generation_of(1) % 2 == 1
    one = Memslots(nr_as_ids=1)
    one.set_memory_region(0, 0, 0, 0x1000, HVA)
    assert one.generation == 1


def test_generation_in_progress_seen_by_memslots_updated(ms):
    seen = []
    ms.memslots_updated.append(lambda as_id, gen: seen.append((as_id, gen, ms.generation)))
    ms.set_memory_region(0, 0, 0, 0x1000, HVA)
    assert seen == [(0, 2, KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS | 0)]
    assert ms.generation == 2


def test_delete_and_move_go_through_invalid(ms):
    ms.set_memory_region(0, 0, 0x1000, 0x4000, HVA)
    p = ms.prepare(0, 0, 0x10000, 0x4000, HVA)
    with pytest.raises(ValueError, match="install_invalid"):
        ms.commit(p)
    g = ms.generation
    inv = ms.install_invalid(p)
    assert ms.generation == g + 2 and inv.flags & KVM_MEMSLOT_INVALID
    assert ms.gfn_to_memslot(0x1) is inv  # the fault path sees it and RETRYs
    assert errno_of(ms.gfn_to_hva, 0x1) == errno.EFAULT
    with pytest.raises(RuntimeError, match="in flight"):
        ms.prepare(1, 0, 0x100000, 0x1000, HVA)
    new = ms.commit(p)
    assert ms.gfn_to_memslot(0x1) is None and ms.gfn_to_memslot(0x10) is new
    with pytest.raises(RuntimeError):
        ms.commit(p)


def test_stale_prepared_change_is_refused(ms):
    p1 = ms.prepare(0, 0, 0, 0x1000, HVA)
    ms.set_memory_region(1, 0, 0x10000, 0x1000, HVA)
    with pytest.raises(RuntimeError, match="stale"):
        ms.commit(p1)


def test_counters(ms):
    ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x4000, HVA)
    ms.set_memory_region(1, 0, 0x10000, 0x2000, HVA)
    assert (ms.nr_memslot_pages, ms.nr_memslots_dirty_logging) == (6, 1)
    ms.set_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 0x10000, 0x2000, HVA)
    assert ms.nr_memslots_dirty_logging == 2
    ms.set_memory_region(0, 0, 0, 0, 0)
    assert (ms.nr_memslot_pages, ms.nr_memslots_dirty_logging) == (2, 1)


def test_metadata_fresh_on_move_carried_on_flags_only(ms):
    ms.enable_write_tracking()
    s = ms.set_memory_region(0, 0, 0, 0x400000, 0x40000000)
    s.update_gfn_write_track(5, 1)
    s.disallow_lpage(5)
    f = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x400000, 0x40000000)
    assert f.gfn_write_track[5] == 1 and f.lpage_info[2][0] == 1
    m = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x400000, 0x400000, 0x40000000)
    assert m.gfn_write_track[0x405 - 0x400] == 0 and not m.gfn_write_track.any()
    assert m.lpage_info[2].tolist() == [0, 0]


def test_write_tracking_lazy(ms):
    s = ms.set_memory_region(0, 0, 0, 0x4000, HVA)
    assert not s.write_tracking_allocated and s.gfn_write_track[3] == 0
    with pytest.raises(ValueError, match="enable_write_tracking"):
        s.update_gfn_write_track(3, 1)
    ms.enable_write_tracking()
    assert s.update_gfn_write_track(3, 1) == 1
    assert ms.set_memory_region(1, 0, 0x10000, 0x1000, HVA).write_tracking_allocated
    with pytest.raises(ValueError, match="u16"):
        s.update_gfn_write_track(3, -2)


# ---------------------------------------------------------- lookup helpers
def test_gfn_to_memslot_boundaries(ms):
    a = ms.set_memory_region(0, 0, 0x10000, 0x10000, HVA)
    b = ms.set_memory_region(1, 0, 0x20000, 0x1000, HVA + GB)
    assert ms.gfn_to_memslot(0xF) is None
    assert ms.gfn_to_memslot(0x10) is a and ms.gfn_to_memslot(0x1F) is a  # last page
    assert ms.gfn_to_memslot(0x20) is b and ms.gfn_to_memslot(0x21) is None
    assert ms.gfn_to_memslot(0x1F) is a  # after a cache miss elsewhere
    assert [s.id for s in ms.slots()] == [0, 1] and len(ms.all_slots()) == 2
    assert ms.slots_in_gfn_range(0x1F, 0x21) == [a, b]


def test_gfn_to_hva_and_translate_range(ms):
    ms.set_memory_region(0, 0, 0, 0x2000, HVA)
    ms.set_memory_region(1, KVM_MEM_READONLY, 0x2000, 0x1000, HVA + GB)
    assert ms.gfn_to_hva(1) == HVA + 0x1000
    e = kerr(ms.gfn_to_hva, 7)
    assert e.errno == errno.EFAULT and "0x7" in e.message
    segs = ms.translate_range(0x1FF8, 0x10)
    assert [(s.id, g, o, n) for s, g, o, n in segs] == [(0, 1, 0xFF8, 8), (1, 2, 0, 8)]
    assert errno_of(ms.translate_range, 0x1FF8, 0x10, write=True) == errno.EFAULT
    assert errno_of(ms.translate_range, 0x2FF8, 0x10) == errno.EFAULT


def test_hva_range_to_gfn_ranges(ms):
    ms.set_memory_region(0, 0, 0x100000, 0x10000, HVA)
    ms.set_memory_region(1 << 16, 0, 0, 0x10000, HVA)  # SMM alias of the same hva
    r = ms.hva_range_to_gfn_ranges(HVA + 0x1800, HVA + 0x3000)
    assert sorted((s.as_id, a, b) for s, a, b in r) == [(0, 0x101, 0x103), (1, 1, 3)]


# ------------------------------------------------------------------ §5.1
@pytest.mark.parametrize(
    ("gpa", "size", "hva", "l2", "l3"),
    [
        (0, 4 * MB2, 0x40000000, [0, 0, 0, 0], [1]),  # aligned, smaller than 1G
        (0x1000, 4 * MB2, 0x40001000, [1, 0, 0, 0, 1], [1]),  # head and tail
        (0, GB, 0x40000000, [0] * 512, [0]),  # whole 1G frame
        (0, 2 * MB2, 0x40001000, [1, 1], [1]),  # gpa/hva not congruent
        (0, 2 * MB2, 0x40200000, [0, 0], [1]),  # congruent at 2M, not at 1G; tail at 1G
        (GB - MB2, 2 * MB2, 0x7F3FE00000, [0, 0], [1, 1]),  # spans two 1G frames
    ],
)
def test_lpage_info_initialisation(ms, gpa, size, hva, l2, l3):
    s = ms.set_memory_region(0, 0, gpa, size, hva, max_gfn=(1 << 40) - 1)
    assert s.lpage_info[2].tolist() == l2
    assert s.lpage_info[3].tolist() == l3
    assert s.lpage_info[2].dtype == np.int32


def test_disallow_allow_lpage(ms):
    s = ms.set_memory_region(0, 0, 0, GB, 0x40000000)
    s.disallow_lpage(513)
    assert s.lpage_info[2][1] == 1 and s.lpage_info[3][0] == 1
    assert s.lpage_disallowed(600, 2) and not s.lpage_disallowed(0, 2)
    s.allow_lpage(513)
    assert not s.lpage_info[2].any() and not s.lpage_info[3].any()
    with pytest.raises(ValueError, match="negative"):
        s.allow_lpage(0)
    with pytest.raises(ValueError, match="outside"):
        s.disallow_lpage(1 << 18)


# -------------------------------------------------------------------- §7
def test_dirty_bitmap_lifecycle_across_flags_only(ms):
    s = ms.set_memory_region(0, 0, 0, 0x100000, HVA)
    assert s.dirty_bitmap is None
    assert errno_of(ms.get_dirty_log, 0, 0) == errno.ENOENT
    on = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x100000, HVA)
    bm = on.dirty_bitmap
    assert bm is not None and bm.dtype == np.uint64 and bm.size == 4 and not bm.any()
    ms.mark_page_dirty(on, 3)
    ms.mark_page_dirty(on, 255)
    # a MOVE while logging reuses the same bitmap (kvm_prepare_memory_region)
    mv = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x200000, 0x100000, HVA)
    assert mv.dirty_bitmap is bm
    assert ms.get_dirty_log(0, 0).tolist() == [0x203, 0x2FF]
    assert ms.get_dirty_log(0, 0).tolist() == []
    off = ms.set_memory_region(0, 0, 0x200000, 0x100000, HVA)
    assert off.dirty_bitmap is None
    ms.mark_page_dirty(off, 0x200)  # no bitmap: ignored
    again = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x200000, 0x100000, HVA)
    assert again.dirty_bitmap is not bm and not again.dirty_bitmap.any()


def test_dirty_log_initially_set_and_manual_protect():
    ms = Memslots(manual_dirty_log_protect=True, dirty_log_initially_set=True)
    s = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 70 << 12, HVA)
    assert ms.get_dirty_log(0, 0).size == 70
    assert ms.get_dirty_log(0, 0).size == 70  # manual protect: GET only copies
    assert ms.clear_dirty_log(0, 0, 0, 70).size == 70
    assert ms.dirty_gfns(s).size == 0


def test_clear_dirty_log_errors_in_order(ms):
    assert errno_of(ms.clear_dirty_log, 2, 0, 0, 64) == errno.EINVAL
    assert errno_of(ms.clear_dirty_log, 0, KVM_USER_MEM_SLOTS, 0, 64) == errno.EINVAL
    assert errno_of(ms.clear_dirty_log, 0, 0, 3, 64) == errno.EINVAL  # before ENOENT
    assert errno_of(ms.clear_dirty_log, 0, 0, 0, 64) == errno.ENOENT
    ms.set_memory_region(0, 0, 0, 200 << 12, HVA)
    assert errno_of(ms.clear_dirty_log, 0, 0, 0, 64) == errno.ENOENT  # no bitmap
    s = ms.set_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 200 << 12, HVA)
    assert errno_of(ms.clear_dirty_log, 0, 0, 256, 0) == errno.EINVAL  # first_page > npages
    assert errno_of(ms.clear_dirty_log, 0, 0, 128, 73) == errno.EINVAL  # past the end
    assert errno_of(ms.clear_dirty_log, 0, 0, 0, 65) == errno.EINVAL  # not x64, not to end
    ms.mark_pages_dirty(s, np.array([0, 64, 130, 199]))
    assert ms.clear_dirty_log(0, 0, 128, 72).tolist() == [130, 199]  # ends at slot end
    mask = np.zeros(64, dtype=bool)
    mask[0] = True
    assert ms.clear_dirty_log(0, 0, 64, 64, mask).tolist() == [64]
    assert ms.dirty_gfns(s).tolist() == [0]
    assert errno_of(ms.get_dirty_log, 0, KVM_USER_MEM_SLOTS) == errno.EINVAL


def test_check15_guest_memfd_toggle_refused():
    """§1.3 check 15: dropping GUEST_MEMFD from a gmem slot is EINVAL, not FLAGS_ONLY."""
    gm = Memslots(supports_gmem=True)
    gm.set_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, 0x4000, HVA, region2=True, guest_memfd=5)
    g, slot = gm.generation, gm.id_to_memslot(0, 0)
    e = kerr(gm.prepare, 0, 0, 0, 0x4000, HVA, region2=True)
    assert e.errno == errno.EINVAL and "check 15" in e.message and "GUEST_MEMFD" in e.message
    e = kerr(gm.set_memory_region, 0, 0, 0x4000, 0x4000, HVA, region2=True)  # MOVE too
    assert "check 15" in e.message
    assert gm.generation == g and gm.id_to_memslot(0, 0) is slot and slot.base_gfn == 0


def test_lpage_info_gmem_pgoff_not_congruent_disallows_every_frame():
    """§5.1: a gmem slot with (base_gfn ^ gmem.pgoff) % P != 0 gets 1 in every entry."""
    gm = Memslots(supports_gmem=True)
    kw = dict(region2=True, guest_memfd=5)
    ok = gm.set_memory_region(0, KVM_MEM_GUEST_MEMFD, 0, 4 * MB2, 0x40000000, **kw)
    assert ok.lpage_info[2].tolist() == [0, 0, 0, 0]
    bad = gm.set_memory_region(
        1, KVM_MEM_GUEST_MEMFD, GB, 4 * MB2, 0x40000000, guest_memfd_offset=0x1000, **kw
    )
    assert bad.lpage_info[2].tolist() == [1, 1, 1, 1] and bad.lpage_info[3].tolist() == [1]
    # congruent at 2M (offset 2 MiB) but not at 1G
    mid = gm.set_memory_region(
        2, KVM_MEM_GUEST_MEMFD, 2 * GB, 4 * MB2, 0x40000000, guest_memfd_offset=MB2, **kw
    )
    assert mid.lpage_info[2].tolist() == [0, 0, 0, 0]
