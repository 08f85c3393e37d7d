"""KVM_PRE_FAULT_MEMORY (spec/kvm-mmu-2.md §6)."""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import numpy as np
import pytest
from kvmmu import spte as S
from kvmmu.mmu import PFERR_GUEST_FINAL_MASK

HVA = 0x7F00_0000_0000


def _vm(
    size: int = 16 << 20, page_level: int = 2, hva: int = HVA, flags: int = 0, **cfg: Any
) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor=cfg.pop("vendor", "vmx"), **cfg))
    vm.host.mmap_anon(HVA, size + (2 << 20), page_level=page_level)
    vm.set_user_memory_region(0, flags, 0, size, hva)
    return vm


@pytest.mark.parametrize(
    ("gpa", "size"), [(0x1001, 0x1000), (0, 0x1800), (0, 0), ((1 << 64) - 0x1000, 0x2000)]
)
def test_prefault_einval_on_bad_range(gpa: int, size: int) -> None:
    vm = _vm()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.pre_fault_memory(gpa, size)
    assert e.value.errno == errno.EINVAL


def test_prefault_enoent_without_memslot_and_partial_progress() -> None:
    vm = _vm()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.pre_fault_memory(1 << 32, 0x1000)
    assert e.value.errno == errno.ENOENT
    # progress stops at the slot end; the processed bytes are returned
    assert vm.pre_fault_memory((16 << 20) - 0x1000, 0x3000) == 0x1000


def test_prefault_returns_end_of_huge_mapping() -> None:
    vm = _vm()
    assert vm.mmu.pre_fault_memory(0x20_3000, 0x1000) == 0x1000
    assert vm.mmu.translate(0x20_3000)[1] == 2
    # the ioctl step returns min(size, end_of_mapping - gpa)
    assert vm.mmu._prefault_one(0x20_3000, 0x30_0000, None) == 0x40_0000 - 0x20_3000


def test_prefault_maps_read_fault_not_accessed_no_pf_taken() -> None:
    vm = _vm()
    assert vm.pre_fault_memory(0, 4 << 20) == 4 << 20
    spte, level = vm.mmu.translate(0x1000)
    assert level == 2 and not spte & vm.spte_format.accessed_mask
    assert spte & S.PT_WRITABLE_MASK  # host page writable: read fault maps W
    assert vm.stats["pf_taken"] == 0 and vm.mmu.check_invariants() == []


def _table_image(vm: Any, gfns: range) -> list[tuple[int, int] | None]:
    return [vm.mmu.translate(g << 12) for g in gfns]


@pytest.mark.parametrize("case", ["thp", "4k_incongruent", "dirty", "tracked", "partial"])
def test_prefault_bulk_equals_scalar_faults(case: str) -> None:
    def build() -> Any:
        hva = HVA + 0x1000 if case == "4k_incongruent" else HVA
        flags = kvmmu.KVM_MEM_LOG_DIRTY_PAGES if case == "dirty" else 0
        vm = _vm(hva=hva, flags=flags)
        if case == "tracked":
            vm.write_track_add_gfn(0x345)
        if case == "partial":
            vm.mmu.page_fault(vm.vcpus[0], 0x40_5000, 2)
        return vm

    bulk, scalar = build(), build()
    assert bulk.pre_fault_memory(0, 16 << 20) == 16 << 20
    gpa = 0
    while gpa < 16 << 20:
        gpa += scalar.mmu._prefault_one(gpa, (16 << 20) - gpa, None)
    gfns = range(0, 4096, 7)
    assert _table_image(bulk, gfns) == _table_image(scalar, gfns)
    assert bulk.mmu.check_invariants() == []
    if case == "dirty":
        assert np.array_equal(bulk.get_dirty_log(0), scalar.get_dirty_log(0))


def test_prefault_eagain_on_invalid_slot() -> None:
    vm = _vm()
    slot = vm.memslots.gfn_to_memslot(0)
    slot.flags |= 1 << 16
    with pytest.raises(kvmmu.KvmError) as e:
        vm.mmu._prefault_one(0, 0x1000, None)
    assert e.value.errno == errno.EAGAIN
    slot.flags &= ~(1 << 16)


def test_prefault_error_code_is_guest_final_read() -> None:
    assert PFERR_GUEST_FINAL_MASK == 1 << 32
