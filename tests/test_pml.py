"""PML dirty logging (spec/kvm-mmu-2.md §7.1-§7.3; kvmmu.pml).

With ``[plugins.vmx] pml = true`` dirty logging keeps 4K SPTEs writable with D
clear, write-protects only huge ones, logs each write that sets D in the
vCPU's 512-entry buffer without an exit, and moves the buffer to the bitmap on
every exit, on the PML-full exit and before a harvest.
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import numpy as np
import pytest
from kvmmu import spte as S
from kvmmu.config import parse_config
from kvmmu.errors import ConfigError, KvmError
from kvmmu.pml import PML_LOG_NR_ENTRIES

HVA = 0x7F00_0000_0000
LOG = kvmmu.KVM_MEM_LOG_DIRTY_PAGES
SIZE = 8 << 20  # 2048 pages
EPT_D = 1 << 9


def _vm(pml: bool = True, page_level: int = 1, era: str = "6.16") -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", era=era, plugins={"vmx": {"pml": pml}}))
    vm.host.mmap_anon(HVA, SIZE, page_level=page_level)
    vm.set_user_memory_region(0, 0, 0, SIZE, HVA)
    return vm


def _write(vm: Any, gfn: int, vcpu: int = 0) -> Any:
    """A guest store with paging off (gva = gpa)."""
    r = vm.vcpus[vcpu].access(gfn << 12, "write", 1, b"\x5a")
    assert r.fault is None
    return r


def _leaf(vm: Any, gfn: int) -> tuple[int, int]:
    hit = vm.mmu.translate(gfn << 12)
    assert hit is not None
    return hit


def _log(vm: Any, on: bool = True) -> None:
    vm.set_user_memory_region(0, LOG if on else 0, 0, SIZE, HVA)


def _bitmap(vm: Any) -> list[int]:
    slot = vm.memslots.id_to_memslot(0, 0)
    return [int(g) for g in vm.memslots.dirty_gfns(slot)]


def test_pml_is_off_by_default_and_512_entries_when_asked() -> None:
    assert _vm(pml=False).mmu.cpu_dirty_log_size == 0
    vm = _vm()
    assert vm.mmu.cpu_dirty_log_size == PML_LOG_NR_ENTRIES == 512
    assert vm.vcpus[0].pml.size == 512


@pytest.mark.parametrize(
    ("cfg", "got"),
    [
        ({"tdp": False}, "got tdp = false"),  # enable_pml needs EPT
        ({"era": "3.19"}, "got era 3.19"),  # PML support came with 4.0
    ],
)
def test_pml_refused_without_ept_or_before_4_0(cfg: dict[str, Any], got: str) -> None:
    """The error names the option, what it needs, and which requirement failed."""
    with pytest.raises(ConfigError) as ei:
        kvmmu.VM(kvmmu.VMConfig(vendor="vmx", plugins={"vmx": {"pml": True}}, **cfg))
    assert "plugins.vmx.pml" in str(ei.value) and got in str(ei.value)


def test_pml_refused_without_ept_ad_bits() -> None:
    with pytest.raises(ConfigError, match="ept_ad"):
        parse_config({"vendor": "vmx", "plugins": {"vmx": {"pml": True, "ept_ad": False}}})


def test_svm_has_no_pml_option() -> None:
    with pytest.raises(ConfigError, match=r"plugins\.svm\.pml"):
        parse_config({"vendor": "svm", "plugins": {"svm": {"pml": True}}})


def test_enable_logging_clears_d_on_4k_and_write_protects_only_huge() -> None:
    """§7.1: with PML, kvm_mmu_slot_leaf_clear_dirty on every leaf and
    kvm_mmu_slot_remove_write_access(PG_LEVEL_2M); without PML, W goes at 4K."""
    for pml in (True, False):
        vm = _vm(pml=pml, page_level=2)
        vm.config.eager_page_split = False
        _write(vm, 0x3)  # a 2M leaf over gfns 0..511
        assert _leaf(vm, 0x3)[1] == 2
        _log(vm)
        spte, level = _leaf(vm, 0x3)
        assert level == 2 and not spte & S.PT_WRITABLE_MASK
        assert spte & vm.mmu.fmt.mmu_writable_mask
    # 4K leaves: W kept and D cleared with PML, W cleared without
    for pml, writable in ((True, True), (False, False)):
        vm = _vm(pml=pml)
        _write(vm, 0x7)
        assert _leaf(vm, 0x7)[0] & EPT_D
        _log(vm)
        spte, level = _leaf(vm, 0x7)
        assert level == 1 and bool(spte & S.PT_WRITABLE_MASK) is writable
        assert not spte & EPT_D if pml else spte & vm.mmu.fmt.mmu_writable_mask


def test_write_after_enable_is_logged_without_an_exit_and_harvested() -> None:
    vm = _vm()
    _write(vm, 0x7)
    _log(vm)
    r = _write(vm, 0x7)
    assert r.exits == 0  # the SPTE stayed writable: no EPT violation
    assert _leaf(vm, 0x7)[0] & EPT_D  # the CPU set D ...
    assert vm.vcpus[0].pml.gpas == [0x7000]  # ... and logged the gpa
    assert _bitmap(vm) == []  # not in the bitmap until something flushes
    # a second write finds D set: nothing more is logged
    _write(vm, 0x7)
    assert len(vm.vcpus[0].pml) == 1
    # KVM_GET_DIRTY_LOG: kvm_arch_sync_dirty_log, harvest, re-arm by clearing D
    assert vm.get_dirty_log(0).tolist() == [0x7]
    assert len(vm.vcpus[0].pml) == 0
    spte, _ = _leaf(vm, 0x7)
    assert spte & S.PT_WRITABLE_MASK and not spte & EPT_D
    _write(vm, 0x7)
    assert vm.vcpus[0].pml.gpas == [0x7000]
    assert vm.get_dirty_log(0).tolist() == [0x7]


def test_without_pml_the_same_write_exits_and_is_logged_by_the_fault() -> None:
    vm = _vm(pml=False)
    _write(vm, 0x7)
    _log(vm)
    r = _write(vm, 0x7)
    assert r.exits == 1 and len(vm.vcpus[0].pml) == 0
    assert _bitmap(vm) == [0x7]


def test_pml_full_exit_after_512_entries() -> None:
    vm = _vm()
    n = PML_LOG_NR_ENTRIES + 1
    for g in range(n):
        _write(vm, g)  # map every page writable (the fault marks nothing: no logging yet)
    _log(vm)
    for g in range(n):
        _write(vm, g)
    v = vm.vcpus[0]
    assert vm.stats["pml_full_exits"] == 1
    # the full log went to the bitmap at the exit; the 513th write is logged after it
    assert _bitmap(vm) == list(range(PML_LOG_NR_ENTRIES))
    assert v.pml.gpas == [PML_LOG_NR_ENTRIES << 12]
    assert vm.get_dirty_log(0).tolist() == list(range(n))


def test_every_exit_flushes_the_log_first() -> None:
    """vmx_handle_exit moves the PML log to the bitmap before handling the exit."""
    vm = _vm()
    _write(vm, 0x7)
    _log(vm)
    _write(vm, 0x7)
    assert _bitmap(vm) == []
    # no memslot there: an EPT violation, then an MMIO exit to userspace
    r = vm.vcpus[0].access(SIZE + 0x1000, "read", 1)
    assert r.exits >= 1
    assert _bitmap(vm) == [0x7] and len(vm.vcpus[0].pml) == 0


def test_logs_are_per_vcpu_and_harvest_kicks_them_all() -> None:
    vm = kvmmu.VM(kvmmu.VMConfig(vendor="vmx", vcpus=2, plugins={"vmx": {"pml": True}}))
    vm.host.mmap_anon(HVA, SIZE)
    vm.set_user_memory_region(0, 0, 0, SIZE, HVA)
    _write(vm, 1, 0)
    _write(vm, 2, 1)
    _log(vm)
    _write(vm, 1, 0)
    _write(vm, 2, 1)
    assert vm.vcpus[0].pml.gpas == [0x1000] and vm.vcpus[1].pml.gpas == [0x2000]
    assert vm.get_dirty_log(0).tolist() == [1, 2]


def test_no_logging_while_no_slot_logs() -> None:
    """PML is on in the VMCS only while nr_memslots_dirty_logging > 0."""
    vm = _vm()
    _write(vm, 0x7)
    _log(vm)
    _log(vm, on=False)
    # logging off: D was cleared at enable, so this write sets D, but the CPU
    # does not log it
    _write(vm, 0x7)
    assert len(vm.vcpus[0].pml) == 0


def test_entries_for_a_slot_that_stopped_logging_are_dropped() -> None:
    """mark_page_dirty_in_slot ignores a slot without dirty tracking."""
    vm = _vm()
    vm.host.mmap_anon(HVA + SIZE, SIZE)
    vm.set_user_memory_region(1, LOG, 1 << 32, SIZE, HVA + SIZE)  # keeps PML on
    _write(vm, 0x7)
    _log(vm)
    _write(vm, 0x7)
    _log(vm, on=False)
    assert vm.sync_dirty_log() == 1
    slot = vm.memslots.id_to_memslot(0, 0)
    assert slot.dirty_bitmap is None


def test_rejected_harvest_leaves_the_logs_alone() -> None:
    """kvm_arch_sync_dirty_log runs only after the ioctl's checks pass."""
    vm = _vm()
    _write(vm, 0x7)
    _log(vm)
    _write(vm, 0x7)
    with pytest.raises(KvmError) as ei:
        vm.get_dirty_log(5)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(KvmError):
        vm.clear_dirty_log(0, 1, 64)  # first_page not a multiple of 64
    assert vm.vcpus[0].pml.gpas == [0x7000]


def test_clear_dirty_log_syncs_then_rearms_by_clearing_d() -> None:
    vm = _vm()
    vm.memslots.manual_dirty_log_protect = True
    _write(vm, 0x7)
    _log(vm)
    _write(vm, 0x7)
    assert vm.get_dirty_log(0).tolist() == [0x7]  # manual protect: copy only
    assert _leaf(vm, 0x7)[0] & EPT_D
    cleared = vm.clear_dirty_log(0, 0, SIZE >> 12)
    assert np.asarray(cleared).tolist() == [0x7]
    spte, _ = _leaf(vm, 0x7)
    assert spte & S.PT_WRITABLE_MASK and not spte & EPT_D


def test_invariants_hold_with_pml() -> None:
    vm = _vm()
    for g in range(16):
        _write(vm, g)
    _log(vm)
    for g in range(0, 16, 3):
        _write(vm, g)
    vm.get_dirty_log(0)
    vm.check_invariants()
