"""Zaps, obsolete roots, slot deletion, write-protection, dirty logging, notifiers.

kvm_zap_gfn_range, kvm_mmu_zap_all_fast, kvm_arch_flush_shadow_memslot,
kvm_mmu_slot_gfn_write_protect, kvm_mmu_slot_apply_flags, the MMU-notifier
handlers (spec/kvm-mmu.md §3.5, §3.14; kvm-mmu-2.md §5.3, §7).
"""

from __future__ import annotations

from typing import Any

import kvmmu
import numpy as np
from kvmmu import spte as S
from kvmmu.mmu import PFERR_USER_MASK, PFERR_WRITE_MASK

HVA = 0x7F00_0000_0000
W = PFERR_WRITE_MASK | PFERR_USER_MASK


class Recorder:
    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.ranges: list[tuple[int, int]] = []
        self.gfns: list[list[int]] = []
        self.events: list[str] = []

    @kvmmu.hookimpl
    def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        self.ranges.append((gfn, nr_pages))

    @kvmmu.hookimpl
    def kvmmu_flush_remote_tlbs_gfns(self, gfns: np.ndarray) -> None:
        self.gfns.append([int(g) for g in gfns])

    @kvmmu.hookimpl
    def kvmmu_zap_all_fast(self, new_valid_gen: int) -> None:
        mmu = self.vm.mmu
        roots_invalid = all(r.invalid for r in mmu.roots)
        still_allocated = all(mmu.pool.live[r.idx] for r in mmu.roots)
        self.events.append(f"zap_all_fast gen={new_valid_gen} {roots_invalid} {still_allocated}")


def _vm(size: int = 8 << 20, page_level: int = 1, **cfg: Any) -> tuple[Any, Recorder]:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", **cfg))
    vm.host.mmap_anon(HVA, size, page_level=page_level)
    vm.set_user_memory_region(0, 0, 0, size, HVA)
    rec = Recorder(vm)
    vm.register_plugin(rec, "recorder")
    return vm, rec


def _fault(vm: Any, *gfns: int) -> None:
    for g in gfns:
        vm.mmu.page_fault(vm.vcpus[0], g << 12, W)


def test_flush_range_exact_on_zap() -> None:
    vm, rec = _vm()
    _fault(vm, 5, 6, 9)
    vm.zap_gfn_range(0, 100)
    assert rec.ranges == [(5, 5)]
    assert vm.mmu.translate(5 << 12) is None and vm.mmu.translate(9 << 12) is None
    vm.zap_gfn_range(0, 100)
    assert rec.ranges == [(5, 5)]  # nothing changed: no flush
    assert vm.mmu.invalidate.seq == 2 and vm.mmu.invalidate.in_progress == 0


def test_zap_of_partially_covered_huge_page_flushes_whole_page() -> None:
    vm, rec = _vm(page_level=2)
    _fault(vm, 0x200)
    vm.zap_gfn_range(0x210, 0x211)
    assert rec.ranges == [(0x200, 512)]


def test_zap_all_fast_obsoletes_roots_hook_before_free() -> None:
    vm, rec = _vm()
    _fault(vm, 1)
    old_root = vm.mmu.roots[0]
    gen = vm.mmu.mmu_valid_gen
    vm.zap_all_fast()
    assert rec.events == [f"zap_all_fast gen={gen ^ 1} True True"]
    assert old_root.invalid and not vm.mmu.pool.live[old_root.idx]
    assert rec.ranges == [(0, vm.mmu.max_gfn + 1)]
    assert vm.mmu.translate(0x1000) is None
    _fault(vm, 1)
    assert vm.mmu.roots[0] is not old_root and vm.mmu.check_invariants() == []


def test_slot_delete_with_quirk_zaps_all() -> None:
    vm, rec = _vm()
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 20)
    vm.set_user_memory_region(1, 0, 1 << 32, 1 << 20, HVA + (1 << 32))
    _fault(vm, 3, (1 << 20) + 1)
    vm.set_user_memory_region(1, 0, 1 << 32, 0, HVA + (1 << 32))
    assert rec.events and vm.mmu.translate(0x3000) is None


def test_slot_delete_without_quirk_zaps_only_the_slot() -> None:
    vm, rec = _vm(quirks={"slot_zap_all": False})
    vm.host.mmap_anon(HVA + (1 << 32), 1 << 20)
    vm.set_user_memory_region(1, 0, 1 << 32, 1 << 20, HVA + (1 << 32))
    _fault(vm, 3, (1 << 20) + 1)
    vm.set_user_memory_region(1, 0, 1 << 32, 0, HVA + (1 << 32))
    assert not rec.events and vm.mmu.translate(0x3000) is not None
    assert rec.ranges == [((1 << 20) + 1, 1)]
    assert vm.mmu.check_invariants() == []


def test_write_protect_gfn_clears_w_and_mmu_writable_on_covering_huge_spte() -> None:
    vm, rec = _vm(page_level=2)
    _fault(vm, 0x200)
    vm.write_track_add_gfn(0x234)
    spte, level = vm.mmu.translate(0x234 << 12)
    assert level == 2 and not spte & (S.PT_WRITABLE_MASK | vm.spte_format.mmu_writable_mask)
    assert rec.ranges == [(0x200, 512)]
    assert vm.mmu.check_invariants() == []
    # a write elsewhere in the frame splits the huge page (disallow count now > 0)
    _fault(vm, 0x201)
    assert vm.mmu.translate(0x201 << 12)[1] == 1
    assert vm.mmu.translate(0x234 << 12)[1] == 1
    assert not vm.mmu.translate(0x234 << 12)[0] & S.PT_WRITABLE_MASK


def test_dirty_log_enable_eager_splits_and_write_protects() -> None:
    vm, rec = _vm(page_level=2)
    _fault(vm, 0x200)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    spte, level = vm.mmu.translate(0x234 << 12)
    assert level == 1 and not spte & S.PT_WRITABLE_MASK
    assert spte & vm.spte_format.mmu_writable_mask  # dirty-log wrprot keeps MMU-writable
    # kvm_mmu_slot_apply_flags ends with kvm_flush_remote_tlbs_memslot(kvm, new):
    # the whole slot, unconditionally (spec/kvm-mmu-2.md §7.1; kvm_main.c
    # kvm_flush_remote_tlbs_memslot -> kvm_flush_remote_tlbs_range(base_gfn, npages)).
    assert rec.ranges == [(0, 2048)]


def test_dirty_log_enable_without_eager_split_keeps_huge_write_protected() -> None:
    vm, _ = _vm(page_level=2, eager_page_split=False)
    _fault(vm, 0x200)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    spte, level = vm.mmu.translate(0x234 << 12)
    assert level == 2 and not spte & S.PT_WRITABLE_MASK
    # write: fast path refuses huge in a logged slot; slow path maps 4K
    _fault(vm, 0x234)
    assert vm.mmu.translate(0x234 << 12)[1] == 1
    assert list(vm.get_dirty_log(0)) == [0x234]


def test_dirty_log_disable_recovers_huge_pages() -> None:
    vm, _ = _vm(page_level=2)
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    _fault(vm, 0x200, 0x201)
    assert vm.mmu.translate(0x200 << 12)[1] == 1
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    assert vm.mmu.translate(0x201 << 12)[1] == 2
    assert vm.mmu.check_invariants() == []


def test_write_protect_gfns_single_batch_flush() -> None:
    vm, rec = _vm()
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, 8 << 20, HVA)
    _fault(vm, 1, 2, 700)
    gfns = vm.get_dirty_log(0)
    assert list(gfns) == [1, 2, 700]
    assert rec.gfns == [[1, 2, 700]]
    for g in (1, 2, 700):
        assert not vm.mmu.translate(g << 12)[0] & S.PT_WRITABLE_MASK


def test_invalidate_range_start_zaps_and_end_bumps_seq() -> None:
    vm, rec = _vm()
    _fault(vm, 4)
    inv = vm.mmu.invalidate
    vm.host.invalidate_range_start(HVA + 0x4000, HVA + 0x6000)
    assert inv.in_progress == 1 and (inv.range_start, inv.range_end) == (4, 6)
    assert vm.mmu.translate(0x4000) is None and rec.ranges == [(4, 1)]
    assert inv.retry_gfn_unsafe(inv.seq, 5) and not inv.retry_gfn_unsafe(inv.seq, 7)
    seq = inv.seq
    vm.host.invalidate_range_end(HVA + 0x4000, HVA + 0x6000)
    assert inv.seq == seq + 1 and inv.in_progress == 0


def test_invalidation_outside_slots_does_not_begin() -> None:
    vm, _ = _vm()
    vm.host.mmap_anon(0x1000_0000, 1 << 20)
    vm.host.invalidate_range(0x1000_0000, 0x1010_0000)
    assert vm.mmu.invalidate.seq == 0


def test_zap_all_fast_keeps_exported_root_zaps_its_leaves_flushes_exactly() -> None:
    """consumers.md T4 [TDP-36]: kvm_tdp_mmu_invalidate_all_roots skips exported roots."""
    vm, rec = _vm()
    v = vm.vcpus[0]
    _fault(vm, 5, 9)
    vm.mmu.page_fault(v, 0x1000, W, as_id=1)  # an SMM root (no slot: an MMIO SPTE)
    smm = vm.mmu.vcpu_root(v, 1)
    hpa = vm.mmu.get_exported_root(0)
    exported = vm.mmu.vcpu_root(v, 0)
    assert vm.mmu.pool.hpa(exported.idx) == hpa and exported.exported
    rec.ranges.clear()
    vm.zap_all_fast()
    assert not exported.invalid and exported in vm.mmu.roots  # kept valid
    assert smm.invalid and smm not in vm.mmu.roots  # the others went
    assert vm.mmu.translate(5 << 12) is None and vm.mmu.translate(9 << 12) is None
    assert not vm.mmu.has_present_leaf(exported.idx)
    # exactly the exported root's zapped hull (the freed SMM root had no present leaf)
    assert rec.ranges == [(5, 5)]
    assert rec.events[-1].endswith("False True")  # hook: not every root invalid
    assert vm.stats["tdp_exported_root_leaf_zaps"] == 1
    # vCPUs keep using the same root
    _fault(vm, 7)
    assert vm.mmu.vcpu_root(v, 0) is exported and vm.mmu.root_hpa(0) == hpa
    assert vm.mmu.translate(7 << 12) is not None
    assert vm.mmu.check_invariants() == []
    # nothing to zap: no exported-root flush
    vm.mmu.zap_gfn_range(0, vm.mmu.max_gfn + 1)
    rec.ranges.clear()
    vm.zap_all_fast()
    assert rec.ranges == []
    # put: clear exported, zap, the vCPU still holds it
    _fault(vm, 8)
    vm.mmu.put_exported_root(hpa)
    assert not exported.exported and not exported.invalid
    assert rec.ranges == [(8, 1)]
    vm.zap_all_fast()
    assert exported.invalid  # no longer exported: fast zap obsoletes it as usual


def _gen_vm() -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    vm.host.mmap_anon(HVA, 4 << 20)
    vm.set_user_memory_region(0, 0, 0, 2 << 20, HVA)
    vm.mmu.page_fault(vm.vcpus[0], 0x3000, W)
    return vm


def test_mmio_generation_wrap_zaps_all_fast() -> None:
    """§3.10: ``kvm_arch_memslots_updated`` -> ``kvm_mmu_invalidate_mmio_sptes``:
    when the 19-bit MMIO generation (address-space bit stripped) wraps to 0,
    ``kvm_mmu_zap_all_fast`` runs, so no stale-generation MMIO SPTE can match."""
    vm = _gen_vm()
    root = vm.mmu.get_root(0)
    assert vm.stats["mmu_zap_all_fast"] == 0
    # as_id 0: the next update moves the generation to 2**19, i.e. MMIO gen 0.
    vm.memslots._gen[0] = S.MMIO_SPTE_GEN_MASK + 1 - vm.memslots.nr_as_ids
    vm.set_user_memory_region(1, 0, 2 << 20, 2 << 20, HVA + (2 << 20))
    assert vm.memslots.generation & S.MMIO_SPTE_GEN_MASK == 0
    assert vm.stats["mmu_zap_all_fast"] == 1
    assert root.invalid and vm.mmu.translate(0x3000) is None


def test_mmio_generation_without_wrap_does_not_zap() -> None:
    """§3.10: an ordinary generation bump (no wrap) leaves the roots alone."""
    vm = _gen_vm()
    root = vm.mmu.get_root(0)
    vm.set_user_memory_region(1, 0, 2 << 20, 2 << 20, HVA + (2 << 20))
    assert vm.stats["mmu_zap_all_fast"] == 0
    assert not root.invalid and vm.mmu.translate(0x3000) is not None


def test_mmio_generation_wrap_detected_in_smm_address_space() -> None:
    """§3.10: the address-space low bit is stripped, so a wrap of as_id 1's
    generation (odd values) is detected too."""
    vm = _gen_vm()
    vm.memslots._gen[1] = S.MMIO_SPTE_GEN_MASK  # odd: as_id 1; next is 2**19 + 1
    vm.host.mmap_anon(HVA + (8 << 20), 2 << 20)
    vm.set_user_memory_region((1 << 16) | 2, 0, 0, 2 << 20, HVA + (8 << 20))
    assert vm.stats["mmu_zap_all_fast"] == 1


def test_retry_gfn_with_unset_range_retries_unsafe_does_not() -> None:
    """§3.5: ``mmu_invalidate_retry_gfn`` WARNs and retries when an
    invalidation is in progress with no range yet; the ``_unsafe`` variant
    compares against the unset (INVALID_GPA) range and does not."""
    from kvmmu.mmu.invalidate import INVALID_GPA, InvalidateState

    inv = InvalidateState()
    inv.begin()
    assert inv.range_start == INVALID_GPA
    assert inv.retry_gfn(inv.seq, 5)
    assert not inv.retry_gfn_unsafe(inv.seq, 5)
    assert inv.retry_gfn_unsafe(inv.seq - 1, 5)  # a changed sequence always retries


def test_invalidate_range_add_widens_and_nest_keeps_range() -> None:
    """§3.5: range_add widens with min/max; only the first begin of a nest
    resets the range; end bumps seq then drops in_progress."""
    from kvmmu.mmu.invalidate import InvalidateState

    inv = InvalidateState()
    inv.begin()
    inv.range_add(10, 20)
    inv.begin()
    assert (inv.range_start, inv.range_end) == (10, 20)
    inv.range_add(5, 12)
    inv.range_add(15, 30)
    assert (inv.range_start, inv.range_end) == (5, 30)
    inv.end()
    assert inv.seq == 1 and inv.in_progress == 1 and inv.retry_gfn(1, 29)
    inv.end()
    assert inv.seq == 2 and inv.in_progress == 0 and not inv.retry_gfn(2, 29)


def test_zap_gfn_range_runs_inside_an_invalidation() -> None:
    """§3.14 ``kvm_zap_gfn_range``: invalidate_begin + range_add before the
    zap, invalidate_end after, so a fault that read the old sequence retries."""
    vm, _ = _vm()
    _fault(vm, 4)
    inv = vm.mmu.invalidate
    seq = inv.seq
    vm.zap_gfn_range(4, 6)
    assert inv.seq == seq + 1 and inv.in_progress == 0
    assert vm.mmu.translate(0x4000) is None
    assert inv.retry_gfn(seq, 100)  # stale snapshot: is_page_fault_stale


def test_huge_leaf_replacing_a_table_frees_it_and_flushes_the_huge_range() -> None:
    """§3.12 step 2 / §3.14 target-level handler: a huge leaf installed over
    a present non-leaf SPTE frees the child table and flushes the huge range."""
    vm, rec = _vm(page_level=2)
    vm.write_track_add_gfn(0x205)  # disallow_lpage: the 2M frame maps 4K
    _fault(vm, 0x205)
    assert vm.mmu.translate(0x205 << 12)[1] == 1
    vm.write_track_remove_gfn(0x205)  # no un-protect: the 4K table stays
    live = int(vm.mmu.pool.live.sum())
    rec.ranges.clear()
    _fault(vm, 0x234)  # not present -> goal 2M over the table
    spte, level = vm.mmu.translate(0x234 << 12)
    assert level == 2 and spte & S.PT_WRITABLE_MASK
    assert vm.mmu.translate(0x205 << 12)[1] == 2
    assert rec.ranges == [(0x200, 512)]
    assert int(vm.mmu.pool.live.sum()) == live - 1
    assert vm.mmu.check_invariants() == []
