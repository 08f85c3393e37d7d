"""Dirty logging at the VM level: spec/kvm-mmu-2.md §7.1 (enable/disable),
§7.3 (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG harvesting and re-protection)."""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import numpy as np
import pytest
from conftest import FlushRecorder
from kvmmu import spte as S
from kvmmu.mmu import PFERR_USER_MASK, PFERR_WRITE_MASK

HVA = 0x7F00_0000_0000
W = PFERR_WRITE_MASK | PFERR_USER_MASK
LOG = kvmmu.KVM_MEM_LOG_DIRTY_PAGES
SIZE = 8 << 20  # 2048 pages


def _vm(
    flags: int = 0, page_level: int = 1, manual: bool = False, init_set: bool = False, **cfg: Any
) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", **cfg))
    # KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2[, INITIALLY_SET])
    vm.memslots.manual_dirty_log_protect = manual
    vm.memslots.dirty_log_initially_set = init_set
    vm.host.mmap_anon(HVA, SIZE, page_level=page_level)
    vm.set_user_memory_region(0, flags, 0, SIZE, HVA)
    return vm


def _write(vm: Any, *gfns: int) -> None:
    for g in gfns:
        vm.mmu.page_fault(vm.vcpus[0], g << 12, W)


def _writable(vm: Any, gfn: int) -> bool:
    t = vm.mmu.translate(gfn << 12)
    return t is not None and bool(t[0] & S.PT_WRITABLE_MASK)


def test_enable_dirty_log_always_flushes_the_whole_slot() -> None:
    """§7.1: enabling logging ends with kvm_flush_remote_tlbs_memslot, even with no SPTEs."""
    vm = _vm()
    rec = FlushRecorder()
    vm.register_plugin(rec, "flushes")
    vm.set_user_memory_region(0, LOG, 0, SIZE, HVA)
    assert rec.ranges == [(0, SIZE >> 12)]


def test_get_dirty_log_without_manual_protect_clears_and_reprotects() -> None:
    vm = _vm(LOG)
    _write(vm, 5, 700)
    assert _writable(vm, 5)
    assert vm.get_dirty_log(0).tolist() == [5, 700]
    assert not _writable(vm, 5) and not _writable(vm, 700)
    assert vm.get_dirty_log(0).tolist() == []


def test_get_dirty_log_with_manual_protect_only_copies() -> None:
    """§7.3: with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, GET copies; nothing is re-protected."""
    vm = _vm(LOG, manual=True)
    _write(vm, 5)
    assert vm.get_dirty_log(0).tolist() == [5]
    assert _writable(vm, 5)  # not write-protected by GET
    assert vm.get_dirty_log(0).tolist() == [5]  # nor cleared


def test_clear_dirty_log_reprotects_exactly_the_cleared_pages() -> None:
    """§7.3: KVM_CLEAR_DIRTY_LOG clears the requested bits and re-protects exactly those pages."""
    vm = _vm(LOG, manual=True)
    _write(vm, 1, 2, 3, 70)
    mask = np.zeros(64, dtype=bool)
    mask[[1, 3, 9]] = True  # 9 is not dirty: not "really cleared"
    assert vm.clear_dirty_log(0, 0, 64, mask).tolist() == [1, 3]
    assert not _writable(vm, 1) and not _writable(vm, 3)
    assert _writable(vm, 2) and _writable(vm, 70)
    assert vm.get_dirty_log(0).tolist() == [2, 70]


def test_clear_dirty_log_rejected_changes_nothing() -> None:
    vm = _vm(LOG, manual=True)
    _write(vm, 1, 65)
    for args, err in (
        ((0, 3, 64), errno.EINVAL),  # first_page not a multiple of 64
        ((0, 64, 65), errno.EINVAL),  # num_pages not x64 and not to the end
        ((0, 2048, 64), errno.EINVAL),  # past the end of the slot
        ((1, 0, 64), errno.ENOENT),  # no such slot
    ):
        with pytest.raises(kvmmu.KvmError) as ei:
            vm.clear_dirty_log(*args)
        assert ei.value.errno == err
    assert vm.get_dirty_log(0).tolist() == [1, 65]
    assert _writable(vm, 1) and _writable(vm, 65)


def test_clear_dirty_log_initially_set_write_protects_huge_page() -> None:
    """§7.1/§7.3: with INITIALLY_SET enabling protects nothing; CLEAR write-protects
    the huge page covering the cleared pages (no eager split: it stays huge)."""
    vm = _vm(page_level=2, manual=True, init_set=True, eager_page_split=False)
    _write(vm, 0x200)
    assert vm.mmu.translate(0x200 << 12)[1] == 2
    vm.set_user_memory_region(0, LOG, 0, SIZE, HVA)
    assert _writable(vm, 0x234)  # INITIALLY_SET: nothing protected on enable
    assert vm.get_dirty_log(0).size == SIZE >> 12
    assert vm.clear_dirty_log(0, 0x200, 64).size == 64
    spte, level = vm.mmu.translate(0x234 << 12)
    assert level == 2 and not spte & S.PT_WRITABLE_MASK
    assert not spte & vm.spte_format.mmu_writable_mask  # kvm_mmu_slot_gfn_write_protect


def test_clear_dirty_log_initially_set_eager_splits_first() -> None:
    """§7.3: "splitting huge pages lazily first" - with eager split the huge page is
    split to 4K and only the cleared pages lose W."""
    vm = _vm(page_level=2, manual=True, init_set=True)
    _write(vm, 0x200)
    vm.set_user_memory_region(0, LOG, 0, SIZE, HVA)
    assert vm.mmu.translate(0x200 << 12)[1] == 2
    vm.clear_dirty_log(0, 0x200, 64)
    assert vm.mmu.translate(0x234 << 12)[1] == 1
    assert not _writable(vm, 0x200) and not _writable(vm, 0x23F)
    assert _writable(vm, 0x240)  # its bit was not cleared
    assert vm.mmu.check_invariants() == []
