"""iommu plugin: IOMMUFD basics and the shared-TDP rules T1-T12 (spec/consumers.md §2)."""

from __future__ import annotations

import errno

import kvmmu
import numpy as np
import pytest
from kvmmu.paging import PFERR_FETCH, PFERR_PRESENT, PFERR_USER, PFERR_WRITE
from kvmmu.plugins.iommu import (
    DmaFault,
    IommuConfig,
    IopfFault,
    PageResponse,
    Workload,
    compare_modes,
)
from kvmmu.plugins.iommu.compare import GUEST_HVA, make_vm
from kvmmu.plugins.iommu.iommufd import (
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    U64_MAX,
)
from kvmmu.plugins.iommu.iopf import handle_group
from kvmmu.plugins.iommu.iotlb import Iotlb, IotlbEntry
from kvmmu.plugins.iommu.pgtable import (
    VTD_SL_FORMAT,
    IoPageTable,
    io_format_for_spte,
    io_walk,
)
from kvmmu.plugins.iommu.tdp_fd import fault_type_to_error_code
from pydantic import ValidationError

RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
FIX = IOMMU_IOAS_MAP_FIXED_IOVA
PAGES = 64


def errno_of(exc: pytest.ExceptionInfo[kvmmu.KvmError]) -> int:
    return exc.value.errno


@pytest.fixture
def shared():
    vm = make_vm("shared", PAGES)
    p = vm.plugin("iommu")
    return vm, p, p.add_device("dsa", iopf=True)


@pytest.fixture
def pinned():
    vm = make_vm("pinned", PAGES)
    p = vm.plugin("iommu")
    return vm, p


# ---------------------------------------------------------------- IOMMUFD basics
def test_config_model_forbids_unknown_fields_and_bad_values():
    with pytest.raises(ValidationError):
        IommuConfig.model_validate({"mode": "shared", "bogus": 1})
    with pytest.raises(ValidationError):
        IommuConfig.model_validate({"mode": "mirrored"})
    with pytest.raises(kvmmu.ConfigError) as e:
        kvmmu.VM({"plugins": {"enabled": ["iommu"], "iommu": {"iotlb_entries": 0}}})
    assert "plugins.iommu.iotlb_entries" in str(e.value)


def test_ioas_map_errnos_and_nothing_half_applied(pinned):
    _vm, p = pinned
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(ioas, GUEST_HVA, 4096, RW | 8)
    assert errno_of(e) == errno.EOPNOTSUPP
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(ioas, GUEST_HVA, 4096, FIX)
    assert errno_of(e) == errno.EINVAL  # neither readable nor writeable
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(ioas, GUEST_HVA + 1, 4096, RW)
    assert errno_of(e) == errno.EINVAL
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(ioas, GUEST_HVA, 0, RW)
    assert errno_of(e) == errno.EINVAL
    iova = fd.ioas_map(ioas, GUEST_HVA, 2 * 4096, RW | FIX, 0x10000)
    assert iova == 0x10000
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(ioas, GUEST_HVA, 4096, RW | FIX, 0x11000)
    assert errno_of(e) == errno.EEXIST  # FIXED_IOVA never replaces
    # kernel-chosen: lowest free hole, never IOVA 0 (iopt_alloc_iova starts at PAGE_SIZE)
    assert fd.ioas_map(ioas, GUEST_HVA, 4096, RW) == 0x1000
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(99, GUEST_HVA, 4096, RW)
    assert errno_of(e) == errno.ENOENT
    assert len(fd.ioas(ioas).areas) == 2


def test_ioas_map_errno_order_matches_iommufd_ioas_map(pinned):
    """ioas.c: flags, then u64 overflow, then R/W, and only then the IOAS lookup."""
    _vm, p = pinned
    fd = p.iommufd
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(99, GUEST_HVA, 4096, RW | 8)
    assert errno_of(e) == errno.EOPNOTSUPP
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(99, GUEST_HVA, U64_MAX, RW)
    assert errno_of(e) == errno.EOVERFLOW
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_map(99, GUEST_HVA, 4096, FIX)
    assert errno_of(e) == errno.EINVAL
    ioas = fd.ioas_alloc()
    with pytest.raises(kvmmu.KvmError) as e:  # iopt_check_iova: wraps u64
        fd.ioas_map(ioas, GUEST_HVA, 0x2000, RW | FIX, U64_MAX + 1 - 0x1000)
    assert errno_of(e) == errno.EOVERFLOW
    assert fd.ioas(ioas).areas == [] and fd.map_calls == 0


def test_ioas_map_auto_iova_never_zero_and_aligned(pinned):
    """iopt_alloc_iova: no IOVA 0; aligned to min(pow2(length), lowbit(user_va))."""
    _vm, p = pinned
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    assert fd.ioas_map(ioas, GUEST_HVA, 4096, RW) == 0x1000
    # 16 KiB from a 16 KiB-aligned VA: the next 16 KiB-aligned hole, not 0x2000
    assert fd.ioas_map(ioas, GUEST_HVA, 0x4000, RW) == 0x4000
    assert fd.ioas_map(ioas, GUEST_HVA + 0x1000, 0x2000, RW) == 0x2000  # 4K-aligned VA


def test_ioas_unmap_errno_order_and_partial_progress(pinned):
    """iopt_unmap_iova_range unmaps whole maps in IOVA order until one would be cut."""
    _vm, p = pinned
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_unmap(ioas, U64_MAX, 0)  # ULONG_MAX checks come before !length
    assert errno_of(e) == errno.EOVERFLOW
    fd.ioas_map(ioas, GUEST_HVA, 0x2000, RW | FIX, 0x10000)
    fd.ioas_map(ioas, GUEST_HVA, 0x2000, RW | FIX, 0x20000)
    with pytest.raises(kvmmu.KvmError) as e:  # cuts the first map: nothing happens
        fd.ioas_unmap(ioas, 0x11000, 0x20000)
    assert errno_of(e) == errno.ENOENT and len(fd.ioas(ioas).areas) == 2
    with pytest.raises(kvmmu.KvmError) as e:  # covers the first, cuts the second
        fd.ioas_unmap(ioas, 0x10000, 0x11000)
    assert errno_of(e) == errno.ENOENT
    assert [a.iova for a in fd.ioas(ioas).areas] == [0x20000]


def test_hwpt_alloc_and_attach_errnos(pinned):
    """hw_pagetable.c / device.c: bad pt_id kinds, and auto-domain reuse only."""
    _vm, p = pinned
    fd = p.iommufd
    dev = p.add_device("nic", iopf=False)
    dev_id = dev.bound.id
    ioas = p.default_ioas
    with pytest.raises(kvmmu.KvmError) as e:
        fd.hwpt_alloc(dev_id, ioas, flags=1 << 5)
    assert errno_of(e) == errno.EOPNOTSUPP
    with pytest.raises(kvmmu.KvmError) as e:
        fd.hwpt_alloc(999, ioas)
    assert errno_of(e) == errno.ENOENT
    for bad in (999, dev_id):  # iommufd_get_object failure is mapped to -EINVAL
        with pytest.raises(kvmmu.KvmError) as e:
            fd.hwpt_alloc(dev_id, bad)
        assert errno_of(e) == errno.EINVAL
    with pytest.raises(kvmmu.KvmError) as e:
        fd.hwpt_alloc(dev_id, ioas, flags=1)  # NEST_PARENT: no domain_alloc_user here
    assert errno_of(e) == errno.EOPNOTSUPP
    nobjs = len(fd.objects)
    manual = fd.hwpt_alloc(dev_id, ioas)
    assert len(fd.objects) == nobjs + 1
    fd.detach(dev_id)
    with pytest.raises(kvmmu.KvmError) as e:
        fd.attach(dev_id, dev_id)  # a device is neither an IOAS nor a HWPT
    assert errno_of(e) == errno.EINVAL
    with pytest.raises(kvmmu.KvmError) as e:
        fd.attach(dev_id, 999)
    assert errno_of(e) == errno.ENOENT
    assert dev.bound.hwpt is None
    # attaching to the IOAS makes a new auto domain; the manual HWPT is not reused
    assert fd.attach(dev_id, ioas) != manual


def test_ioas_unmap_superset_only(pinned):
    _vm, p = pinned
    fd = p.iommufd
    ioas = fd.ioas_alloc()
    fd.ioas_map(ioas, GUEST_HVA, 4 * 4096, RW | FIX, 0x40000)
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_unmap(ioas, 0x41000, 4096)  # splitting is not allowed
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_unmap(ioas, 0x80000, 4096)
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(kvmmu.KvmError) as e:
        fd.ioas_unmap(ioas, 0x40000, 0)
    assert errno_of(e) == errno.EINVAL
    assert fd.ioas_unmap(ioas, 0x3F000, 8 * 4096) == 4 * 4096
    assert fd.ioas_unmap(ioas, 0, U64_MAX) == 0  # unmap-all of an empty IOAS succeeds


def test_pages_pinned_once_per_ioas_and_unpinned_on_unmap(pinned):
    vm, p = pinned
    dev = p.add_device("nic", iopf=False)
    assert p.iommufd.pinned_pages == PAGES
    pfn = vm.gfn_to_pfn(3)
    assert vm.host.pin_count(pfn) == 1
    p2 = p.add_device("nic2", iopf=False)  # second device: same HWPT, no new pins
    assert vm.host.pin_count(pfn) == 1 and p2.bound.hwpt is dev.bound.hwpt
    dev.dma_write(3 << 12, b"abc")
    assert vm.read_guest(3 << 12, 3) == b"abc"
    ioas = p.default_ioas
    p.iommufd.ioas_unmap(ioas, 0, U64_MAX)
    assert vm.host.pin_count(pfn) == 0 and p.iommufd.pinned_pages == 0
    with pytest.raises(DmaFault) as e:
        dev.dma_read(3 << 12, 3)
    assert e.value.reason == "not-present" and e.value.response is None
    assert vm.check_invariants() == []


def test_destroy_busy_and_auto_hwpt_lifetime(pinned):
    _vm, p = pinned
    fd = p.iommufd
    dev = p.add_device("nic", iopf=False)
    hwpt = dev.bound.hwpt
    with pytest.raises(kvmmu.KvmError) as e:
        fd.destroy(p.default_ioas)
    assert errno_of(e) == errno.EBUSY
    with pytest.raises(kvmmu.KvmError) as e:
        fd.destroy(hwpt.id)
    assert errno_of(e) == errno.EBUSY
    with pytest.raises(kvmmu.KvmError) as e:
        fd.attach(dev.bound.id, p.default_ioas)
    assert errno_of(e) == errno.EINVAL  # already attached
    fd.detach(dev.bound.id)  # auto HWPT goes with its last device, pins go with it
    assert hwpt.id not in fd.objects and fd.pinned_pages == 0
    fd.destroy(p.default_ioas)


def test_iotlb_lru_and_range_invalidation():
    t = Iotlb(2)
    t.insert(1, 10, IotlbEntry(100, True, True))
    t.insert(1, 11, IotlbEntry(101, True, False))
    assert t.lookup(1, 10) is not None  # 10 is now most recent
    t.insert(2, 10, IotlbEntry(200, True, True))  # evicts (1, 11)
    assert t.lookup(1, 11) is None and t.stats.evictions == 1
    assert t.invalidate_range(1, 0, 1 << 30) == 1  # whole-space range, other domain kept
    assert t.lookup(2, 10) is not None
    with pytest.raises(ValueError, match="capacity"):
        Iotlb(0)


def test_io_walk_own_table_and_permissions():
    pt = IoPageTable()
    pt.map_page(0x123, 0x4567, read=True, write=False)
    w = pt.walk(0x123 << 12)
    assert w.ok and w.pfn == 0x4567 and w.readable and not w.writable
    assert pt.walk(0x124 << 12).reason == "not-present"
    with pytest.raises(ValueError, match="already mapped"):
        pt.map_page(0x123, 1, read=True, write=True)
    assert pt.unmap_page(0x123) == 0x4567 and pt.leaves() == {}


# ---------------------------------------------------------------- T1 / T7 / T12
def test_t1_preconditions_each_refused_with_einval():
    vm = make_vm("shared", PAGES)
    p = vm.plugin("iommu")
    for kw in ({"as_id": 1}, {"mode": 1}):
        with pytest.raises(kvmmu.KvmError) as e:
            p.create_tdp_fd(**kw)
        assert errno_of(e) == errno.EINVAL and "T1" in str(e.value)
    novcpu = kvmmu.VM(
        {"vcpus": 0, "plugins": {"enabled": ["iommu"], "vmx": {"mmu_present_high": True}}}
    )
    with pytest.raises(kvmmu.KvmError) as e:
        novcpu.plugin("iommu").create_tdp_fd()
    assert errno_of(e) == errno.EINVAL and "vCPU" in str(e.value)
    vm.config = vm.config.model_copy(update={"tdp": False})  # as a VM with tdp=false
    with pytest.raises(kvmmu.KvmError) as e:
        p.create_tdp_fd()
    assert errno_of(e) == errno.EINVAL and "TDP MMU" in str(e.value)


def test_t1_item20_create_while_noncoherent_dma_registered():
    vm = make_vm("shared", PAGES)
    vm.register_noncoherent_dma()
    with pytest.raises(kvmmu.KvmError) as e:
        vm.plugin("iommu").create_tdp_fd()
    assert errno_of(e) == errno.EINVAL and "non-coherent" in str(e.value)
    vm.unregister_noncoherent_dma()
    assert vm.plugin("iommu").create_tdp_fd().root_hpa == vm.mmu.root_hpa(0)


def test_t7_noncoherent_dma_after_export_is_flagged(shared):
    vm, _p, _dev = shared
    assert vm.check_invariants() == []
    vm.register_noncoherent_dma()
    assert any("T7" in v for v in vm.check_invariants())


def test_t12_device_without_iopf_cannot_use_kvm_hwpt(shared):
    _vm, p, _dev = shared
    with pytest.raises(kvmmu.KvmError) as e:
        p.add_device("partial", iopf=False)
    assert errno_of(e) == errno.EOPNOTSUPP and "T12" in str(e.value)
    assert "partial" not in p.devices and len(p.iommufd.devices()) == 1  # nothing half-applied


# ---------------------------------------------------------------- T2 / T3
def test_t2_vcpu_and_iommu_walk_the_same_tables(shared):
    vm, _p, dev = shared
    hwpt = dev.bound.hwpt
    assert hwpt.domain.root_hpa == vm.mmu.root_hpa(0) == hwpt.tdp_fd.root_hpa
    vm.pre_fault_memory(5 << 12, 4096)  # the CPU side maps gfn 5 first
    vm.write_guest(5 << 12, b"cpu")
    assert dev.dma_read(5 << 12, 3) == b"cpu"
    assert dev.stats["page_requests"] == 0  # no IOPF: the CPU's fault made it present


def test_t3_error_code_mapping():
    assert fault_type_to_error_code(read=True, write=False, exec=False) == (
        PFERR_PRESENT | PFERR_USER
    )
    assert fault_type_to_error_code(read=False, write=True, exec=False) == PFERR_WRITE
    assert fault_type_to_error_code(read=False, write=False, exec=True) == PFERR_FETCH


def test_t3_sticky_errors_one_response_per_group():
    calls = []

    def handler(f: IopfFault) -> int:
        calls.append(f.addr)
        return -errno.EINVAL if f.addr == 0x2000 else 0

    out = handle_group([IopfFault(a) for a in (0x1000, 0x2000, 0x3000)], handler)
    assert out.response is PageResponse.FAILURE
    assert calls == [0x1000, 0x2000] and out.skipped == 1 and out.first_error == -errno.EINVAL
    assert handle_group([IopfFault(0x1000)], lambda f: 0).response is PageResponse.SUCCESS


def test_t3_item19_iopf_write_to_write_tracked_gfn_fails(shared):
    vm, _p, dev = shared
    hwpt = dev.bound.hwpt
    vm.write_track_add_gfn(9)
    faults = [
        IopfFault(8 << 12, read=True, write=True),
        IopfFault(9 << 12, read=True, write=True),
        IopfFault(10 << 12, read=True, write=True),
    ]
    out = hwpt.handle_iopf(faults)
    assert out.response is PageResponse.FAILURE
    assert out.results == [0, -errno.EINVAL] and out.skipped == 1
    assert vm.mmu.translate(10 << 12) is None  # the dropped fault never reached KVM
    assert vm.mmu.translate(8 << 12) is not None
    assert vm.check_invariants() == []


def test_t3_t8_dma_write_to_tracked_page_fails_read_works(shared):
    vm, _p, dev = shared
    vm.write_guest(12 << 12, b"pt")
    vm.write_track_add_gfn(12)
    assert dev.dma_read(12 << 12, 2) == b"pt"
    with pytest.raises(DmaFault) as e:
        dev.dma_write(12 << 12, b"xx")
    assert e.value.response is PageResponse.FAILURE
    assert vm.read_guest(12 << 12, 2) == b"pt"  # the DMA never happened
    # a write-only page request has no PFERR_PRESENT, so page_fault_handle_page_track
    # does not catch it; the map step then returns RET_PF_EMULATE (2) -> -EFAULT [TDP-37]
    assert vm.plugin("iommu").tdp_fds[0].fault_errors == {"ret_pf_2": 1}


def test_t3_fault_outside_every_memslot_fails(shared):
    _vm, _p, dev = shared
    with pytest.raises(DmaFault) as e:
        dev.dma_read(PAGES << 12, 8)
    assert e.value.response is PageResponse.FAILURE


# ---------------------------------------------------------------- T4 / T5
def test_t4_item18_fast_zap_keeps_exported_root(shared):
    vm, p, dev = shared
    root = vm.mmu.root_hpa(0)
    dev.dma_write(2 << 12, b"before")
    inv_before = p.iommu.iotlb.stats.entries_invalidated
    zaps_before = vm.stats["tdp_exported_root_leaf_zaps"]
    vm.set_user_memory_region(1, 0, 1 << 30, 4096, GUEST_HVA + (PAGES << 12))
    vm.host.mmap_anon(GUEST_HVA + (PAGES << 12), 4096)
    vm.set_user_memory_region(1, 0, 1 << 30, 0, GUEST_HVA + (PAGES << 12))  # DELETE: fast zap
    vm.zap_all_fast()  # again: nothing left to zap, no flush
    assert vm.mmu.root_hpa(0) == root  # the exported root stays valid and active
    assert vm.mmu.translate(2 << 12) is None  # its leaves were zapped synchronously
    assert p.iommu.iotlb.stats.entries_invalidated > inv_before  # and the IOTLB with them
    # the MMU did it (kvm_tdp_mmu_invalidate_all_roots skips exported roots), not the
    # plugin; the second fast zap found no leaf and did not count
    assert vm.stats["tdp_exported_root_leaf_zaps"] == zaps_before + 1
    assert not hasattr(vm.mmu.zap_all_fast, "__self__") or vm.mmu.zap_all_fast.__self__ is vm.mmu
    assert p.stats["t4_fast_zaps"] >= 1 and p.violations == []
    assert vm.check_invariants() == []
    assert dev.dma_read(2 << 12, 6) == b"before"  # refaults through the same root
    assert vm.mmu.root_hpa(0) == root


def test_t5_every_tdp_zap_invalidates_exactly_that_range(shared):
    vm, p, dev = shared
    seen: list[tuple[int, int]] = []
    fd = p.tdp_fds[0]
    fd.register_importer(lambda g, n: seen.append((g, n)))
    for g in range(16, 24):
        dev.dma_read(g << 12, 8)
    vm.zap_gfn_range(18, 20)
    assert seen == [(18, 2)]
    cached = {vpfn for _d, vpfn, _e in p.iommu.iotlb.entries()}
    assert cached == set(range(16, 24)) - {18, 19}
    assert vm.check_invariants() == []


def test_t5_missing_invalidation_is_caught_by_the_invariant(shared):
    vm, p, dev = shared
    dev.dma_read(30 << 12, 8)
    hwpt = dev.bound.hwpt
    p.tdp_fds[0].unregister_importer(hwpt.importer)  # break T5 on purpose
    vm.zap_gfn_range(30, 31)
    assert any("T5 IOTLB entry" in v for v in vm.check_invariants())


def test_t5_dirty_log_write_protect_invalidates_iotlb(shared):
    vm, p, dev = shared
    vm.set_user_memory_region(0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, 0, PAGES << 12, GUEST_HVA)
    dev.dma_write(40 << 12, b"d")
    vm.get_dirty_log(0)
    assert vm.check_invariants() == []
    entry = next((e for _d, v, e in p.iommu.iotlb.entries() if v == 40), None)
    assert entry is None or not entry.writable


# ---------------------------------------------------------------- T6
def test_t6_shared_tables_have_mmu_present_at_bit59_and_translate(shared):
    vm, _p, dev = shared
    assert vm.spte_format.mmu_present_mask == 1 << 59
    dev.dma_read(7 << 12, 8)
    hwpt = dev.bound.hwpt
    fmt = io_format_for_spte(vm.spte_format, bit11_reserved=True)
    assert fmt.reserved_mask == 1 << 11
    walk = io_walk(vm.mmu.pool.table, hwpt.domain.root_hpa, vm.mmu.root_level, fmt, 7 << 12)
    assert walk.ok and walk.level == 1
    leaves = [int(s) for _t, _l, _g, sptes in vm.mmu.leaves() for s in sptes]
    assert leaves and all(s & (1 << 59) and not s & (1 << 11) for s in leaves)


def test_t6_vtd_walk_of_bit11_tables_hits_the_reserved_bit():
    # Without the move (bit 11 = MMU-present) a real VT-d walk of KVM's tables faults.
    plain = kvmmu.VM({"vcpus": 1})
    plain.host.mmap_anon(GUEST_HVA, PAGES << 12)
    plain.set_user_memory_region(0, 0, 0, PAGES << 12, GUEST_HVA)
    plain.pre_fault_memory(7 << 12, 4096)
    fmt = io_format_for_spte(plain.spte_format, bit11_reserved=True)
    walk = io_walk(plain.mmu.pool.table, plain.mmu.root_hpa(0), plain.mmu.root_level, fmt, 7 << 12)
    assert not walk.ok and walk.reason == "reserved"


def test_t6_sharing_refused_without_mmu_present_high_when_bit11_is_reserved():
    vm = kvmmu.VM({"plugins": {"enabled": ["iommu"], "iommu": {"mode": "shared"}}})
    assert vm.spte_format.mmu_present_mask == 1 << 11
    with pytest.raises(kvmmu.KvmError) as e:
        vm.plugin("iommu").create_tdp_fd()
    assert errno_of(e) == errno.EINVAL and "PRESENT_HIGH" in str(e.value)
    # the what-if IOMMU that ignores bit 11 can share today's layout
    ok = kvmmu.VM(
        {
            "plugins": {
                "enabled": ["iommu"],
                "iommu": {"mode": "shared", "vtd_bit11_reserved": False},
            }
        }
    )
    assert ok.plugin("iommu").create_tdp_fd().as_id == 0
    high = kvmmu.VM(
        {
            "plugins": {
                "enabled": ["iommu"],
                "iommu": {"mode": "shared"},
                "vmx": {"mmu_present_high": True},
            }
        }
    )
    assert high.plugin("iommu").create_tdp_fd().as_id == 0


def test_t6_walker_reserved_bit_on_own_format():
    pt = IoPageTable()
    pt.map_page(1, 0x99, read=True, write=True)
    pt.pool[1, 0] |= np.uint64(1 << 11)  # a stray bit 11 in a non-leaf: reserved
    assert io_walk(pt.table, pt.root_hpa, 4, VTD_SL_FORMAT, 1 << 12).reason == "reserved"


def test_t2_put_exported_root_zaps_and_frees_unless_a_vcpu_holds_it():
    vm = make_vm("shared", PAGES)
    p = vm.plugin("iommu")
    fd = p.create_tdp_fd()
    root = next(r for r in vm.mmu.roots if vm.mmu.pool.hpa(r.idx) == fd.root_hpa)
    assert root.exported and root.exported_refs == 1
    assert fd.fault(3, read=True, write=False) == 0  # IOPF: no vCPU holds the root
    fd.close()
    assert root not in vm.mmu.roots and not vm.mmu.pool.live[root.idx]  # freed
    fd2 = p.create_tdp_fd()
    vm.mmu.page_fault(vm.vcpus[0], 4 << 12, PFERR_WRITE | PFERR_USER)  # a vCPU loads it
    root2 = vm.mmu.vcpu_root(vm.vcpus[0])
    assert vm.mmu.pool.hpa(root2.idx) == fd2.root_hpa
    fd2.close()
    assert not root2.exported and root2 in vm.mmu.roots and not root2.invalid
    assert vm.mmu.translate(4 << 12) is None  # zapped on put, root kept for the vCPU
    assert vm.check_invariants() == []


def test_shared_mode_needs_ept_format():
    vm = kvmmu.VM(
        {
            "vendor": "svm",
            "plugins": {
                "enabled": ["iommu"],
                "iommu": {"mode": "shared", "vtd_bit11_reserved": False},
            },
        }
    )
    vm.host.mmap_anon(GUEST_HVA, 4096)
    vm.set_user_memory_region(0, 0, 0, 4096, GUEST_HVA)
    with pytest.raises(kvmmu.KvmError) as e:
        vm.plugin("iommu").add_device("d", iopf=True)
    assert errno_of(e) == errno.EOPNOTSUPP


# ---------------------------------------------------------------- overcommit, compare
def test_pinned_pages_survive_host_invalidation_shared_pages_are_reclaimed():
    for mode, reclaimed in (("pinned", 0), ("shared", 4)):
        vm = make_vm(mode, PAGES)
        dev = vm.plugin("iommu").add_device("d", iopf=True)
        for g in range(4):
            dev.dma_write(g << 12, bytes([g + 1]))
        n = vm.host.invalidate_range(GUEST_HVA, GUEST_HVA + (4 << 12))
        assert n == reclaimed, mode
        assert vm.check_invariants() == [], mode
        assert [dev.dma_read(g << 12, 1)[0] for g in range(4)] == [1, 2, 3, 4]
        assert vm.check_invariants() == [], mode


def test_compare_modes_pins_vs_faults():
    w = Workload(
        32,
        [("dma", g, g % 2 == 0) for g in range(8)]
        + [
            ("reclaim", 0, 8),
            ("touch", 20),
            ("dma", 20, False),
            ("zap", 0, 32),
            ("zap_all",),
            ("dma", 3, False),
        ],
    )
    r = compare_modes(w)
    pin, sh = r["pinned"], r["shared"]
    assert pin["pages_pinned"] == 32 and sh["pages_pinned"] == 0
    assert not pin["overcommit_possible"] and sh["overcommit_possible"]
    assert pin["io_page_faults"] == 0 and sh["io_page_faults"] == 9
    assert pin["pages_reclaimed"] == 0 and sh["pages_reclaimed"] == 8
    assert sh["iotlb_invalidations"] > pin["iotlb_invalidations"]
    assert pin["dma_failed"] == sh["dma_failed"] == 0
    assert pin["invariant_violations"] == sh["invariant_violations"] == []
    with pytest.raises(ValueError, match="bad workload step"):
        Workload(4, [("frobnicate", 1)])


def test_report_section_and_destroy(shared):
    vm, p, dev = shared
    dev.dma_read(0, 8)
    rep = vm.hooks.report_sections()["iommu"]
    assert rep["mode"] == "shared" and rep["io_page_faults"] == 1
    assert rep["responses"] == {"SUCCESS": 1}
    vm.destroy()
    assert p.iommufd.objects == {} and all(fd.released for fd in p.tdp_fds)
