"""virtio-gpu through real VMs: every type below comes from a guest access
(guest walk -> SPTE -> the vendor's effective type), never from a table.

Rule ids: spec/consumers.md §3.3 (M1–M7) and §3.4 (H1–H6).
"""

from __future__ import annotations

import errno
from typing import Any

import kvmmu
import pytest
from kvmmu.memtype import MemType
from kvmmu.plugins.virtio_gpu import (
    GUEST_TYPES,
    ROW_KEYS,
    MigrationBlocked,
    VirtioGpuError,
    build_scenario,
    hazard_table,
)
from kvmmu.plugins.virtio_gpu.guest import LinuxGuest
from kvmmu.plugins.virtio_gpu.table import _BLOB_GVA, _PROBE_GVA

WC, UCM, UC, WT, WP, WB = GUEST_TYPES


def _effective(plugin: Any, vm: Any) -> dict[MemType, MemType]:
    checks = plugin.check_coherency(vm.vcpus[0], ram_probe_gva=_PROBE_GVA)
    return {c.guest_pat: c.effective for c in checks}


def _hazards(plugin: Any, vm: Any) -> dict[MemType, list[str]]:
    checks = plugin.check_coherency(vm.vcpus[0], ram_probe_gva=_PROBE_GVA)
    return {c.guest_pat: [h.id for h in c.hazards] for c in checks}


def _identity() -> dict[MemType, MemType]:
    """Guest PAT honoured over a WB host side: Table 11-7 row WB (UC- -> UC)."""
    return {t: (MemType.UC if t is UCM else t) for t in GUEST_TYPES}


# ------------------------------------------------------------------ device


def test_device_blob_map_creates_memslot_and_unmap_deletes_it() -> None:
    vm, plugin, _guest = build_scenario("vmx", "6.16", "kvm_mem_wc", guest_types=[WC])
    dev = plugin.device
    (slot,) = dev.slots
    ms = vm.memslots.id_to_memslot(0, slot)
    assert ms.base_gfn == plugin.config.bar_gpa >> 12 and ms.npages == 1
    res = plugin.guest_access(vm.vcpus[0], _BLOB_GVA, "write", 8, b"\x11" * 8)
    assert res.fault is None and res.memtype is MemType.WC
    assert vm.read_guest(dev.blob_gpa(1), 8) == b"\x11" * 8
    with pytest.raises(VirtioGpuError, match="already mapped"):
        dev.map_blob(1, 0x10000)
    dev.unmap_blob(1)
    assert vm.memslots.id_to_memslot(0, slot) is None and not dev.slots
    gone = vm.vcpus[0].access(_BLOB_GVA, "read", 8)
    assert gone.emulated and gone.memtype is None  # no memslot: MMIO emulation
    assert dev.map_blob(1, 0x2000) == 0x03  # VIRTIO_GPU_MAP_CACHE_WC
    assert vm.check_invariants() == []


def test_device_errors_and_bar_layout() -> None:
    vm, plugin, _ = build_scenario(
        "vmx", "6.16", "today", guest_types=[WC], extra={"slot_layout": "bar"}
    )
    dev = plugin.device
    assert list(dev.slots) == [plugin.config.first_slot]
    assert vm.memslots.id_to_memslot(0, plugin.config.first_slot).npages == dev.bar_npages
    dev.create_blob(2, 0x2000)
    with pytest.raises(VirtioGpuError, match="overlaps"):
        dev.map_blob(2, 0)
    with pytest.raises(VirtioGpuError, match="INVALID_RESOURCE_ID"):
        dev.map_blob(9, 0x4000)
    with pytest.raises(VirtioGpuError, match="not mapped"):
        dev.unmap_blob(2)
    dev.map_blob(2, 0x4000)
    dev.unmap_blob(1)  # the host mapping goes: MMU notifier zaps the range
    assert vm.check_invariants() == []


# ----------------------------------------------------------------- M rules


def test_m1_host_mmio_is_ept_uc_and_only_guest_wc_survives() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "today", backing="vram")
    checks = plugin.check_coherency(vm.vcpus[0])
    assert all(c.mmio and c.spte & 0x78 == 0 and not c.spte & 0x40 for c in checks)
    got = {c.guest_pat: c.effective for c in checks}
    assert got == {t: (MemType.WC if t is WC else MemType.UC) for t in GUEST_TYPES}


def test_m2_quirk_on_no_noncoherent_dma_forces_wb() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "today")
    assert _effective(plugin, vm) == {t: MemType.WB for t in GUEST_TYPES}


def test_m3_guest_pat_honoured_when_quirk_disabled_or_noncoherent() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "today", quirks={"ignore_guest_pat": False})
    assert _effective(plugin, vm) == _identity()
    vm, plugin, _ = build_scenario("vmx", "6.16", "virtio_noncoherent")
    # 6.11+: guest MTRRs are ignored, even a UC default type
    vm.vcpus[0].set_msr(0x2FF, (1 << 11) | int(MemType.UC))
    vm.zap_gfn_range(0, 1 << 40)
    assert _effective(plugin, vm) == _identity()


def test_m4_first_noncoherent_registration_zaps_all_sptes() -> None:
    """kvm_mem_dma scope 'vm' (2020 RFC v1) registers when the flagged slot appears."""
    vm, plugin, _guest = build_scenario(
        "vmx",
        "6.16",
        "kvm_mem_dma",
        guest_types=[WC],
        extra={"kvm_mem_dma_scope": "vm", "blobs": []},
    )
    probe = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert probe.memtype is MemType.WB and probe.spte & 0x40  # WB|IPAT before
    assert vm.noncoherent_dma_count == 0
    plugin.device.create_blob(1, 0x1000)
    plugin.device.map_blob(1, 0)
    assert vm.noncoherent_dma_count == 1
    again = vm.vcpus[0].access(_PROBE_GVA, "read", 8)
    assert again.exits >= 1  # the old SPTE was zapped: a fresh fault
    assert again.memtype is MemType.UC and not again.spte & 0x40
    plugin.device.unmap_blob(1)
    assert vm.noncoherent_dma_count == 0
    assert vm.vcpus[0].access(_PROBE_GVA, "read", 8).memtype is MemType.WB
    assert vm.check_invariants() == []


def test_m5_quirk_cannot_be_disabled_without_self_snoop() -> None:
    with pytest.raises(kvmmu.KvmError) as e:
        build_scenario("vmx", "6.16", "today", quirks={"ignore_guest_pat": False}, self_snoop=False)
    assert e.value.errno == errno.EINVAL


def test_m6_wbinvd_emulated_only_with_noncoherent_dma() -> None:
    for design, want in [
        ("today", False),
        ("kvm_mem_dma", False),
        ("kvm_mem_wc", False),
        ("virtio_noncoherent", True),
    ]:
        vm, plugin, _ = build_scenario("vmx", "6.16", design, guest_types=[WC])
        assert plugin.guest_wbinvd(vm.vcpus[0]) is want, design


def test_m7_shared_tdp_refused_once_virtio_device_registers() -> None:
    from kvmmu.plugins.iommu.tdp_fd import KvmTdpFd

    vm, _, _ = build_scenario("vmx", "6.16", "virtio_noncoherent", guest_types=[WC])
    with pytest.raises(kvmmu.KvmError) as e:
        KvmTdpFd(vm)
    assert e.value.errno == errno.EINVAL
    vm, _, _ = build_scenario("vmx", "6.16", "kvm_mem_wc", guest_types=[WC])
    assert vm.noncoherent_dma_count == 0  # the per-slot designs leave T1 alone


# ------------------------------------------------------- designs × vendors × eras


@pytest.mark.parametrize(
    ("era", "want_wc"),
    [
        ("6.6", MemType.WB),
        ("6.8", MemType.WB),
        ("6.11", MemType.WC),
        ("6.12", MemType.WB),
        ("6.16", MemType.WB),
    ],
)
def test_design_today_vmx_by_era(era: str, want_wc: MemType) -> None:
    """spec/memtype.md §7: WB|IPAT except 6.11 with self-snoop (reverted in 6.12)."""
    vm, plugin, _ = build_scenario("vmx", era, "today")
    assert _effective(plugin, vm)[WC] is want_wc


@pytest.mark.parametrize("era", ["6.8", "6.16"])
def test_design_kvm_mem_dma_vmx_honours_guest_pat_in_slot_only(era: str) -> None:
    vm, plugin, _ = build_scenario("vmx", era, "kvm_mem_dma")
    assert _effective(plugin, vm) == _identity()
    assert vm.vcpus[0].access(_PROBE_GVA, "read", 8).memtype is MemType.WB  # RAM: WB|IPAT


@pytest.mark.parametrize("era", ["6.8", "6.16"])
def test_design_kvm_mem_wc_vmx_forces_wc(era: str) -> None:
    vm, plugin, _ = build_scenario("vmx", era, "kvm_mem_wc")
    assert _effective(plugin, vm) == {t: MemType.WC for t in GUEST_TYPES}


def test_design_virtio_noncoherent_vmx_6_8_uses_guest_mtrrs() -> None:
    """6.7–6.10 with noncoherent DMA: guest MTRR type without IPAT, Table 11-7."""
    vm, plugin, _ = build_scenario("vmx", "6.8", "virtio_noncoherent")
    assert _effective(plugin, vm) == _identity()  # guest MTRR default WB
    vm.vcpus[0].set_msr(0x2FF, (1 << 11) | int(MemType.UC))  # zaps (6.7-6.10, NC DMA)
    got = _effective(plugin, vm)
    assert got[WC] is MemType.WC and got[WB] is MemType.UC and got[UCM] is MemType.UC


@pytest.mark.parametrize("design", ["today", "kvm_mem_dma", "kvm_mem_wc", "virtio_noncoherent"])
@pytest.mark.parametrize("era", ["6.8", "6.16"])
def test_designs_svm_guest_pat_honoured(design: str, era: str) -> None:
    """No memtype in NPT SPTEs: every design leaves the guest PAT in charge on AMD."""
    vm, plugin, _ = build_scenario("svm", era, design)
    assert _effective(plugin, vm) == _identity()


# ----------------------------------------------------------------- hazards


def test_h1_forced_wb_aliases_the_host_wc_buffer() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "today")
    checks = plugin.check_coherency(vm.vcpus[0], ram_probe_gva=_PROBE_GVA)
    wc = next(c for c in checks if c.guest_pat is WC)
    assert wc.primary is not None and wc.primary.id == "H1"
    assert "guest WC but EPT WB|IPAT gives WB" in wc.primary.cause
    assert all(c.primary and c.primary.id == "H1" for c in checks)


def test_h2_cacheable_mmio_access_without_the_mmio_guard() -> None:
    vm, plugin, _ = build_scenario(
        "vmx", "6.16", "kvm_mem_dma", backing="vram", host_memtype="WB", extra={"mmio_guard": False}
    )
    hz = _hazards(plugin, vm)
    assert hz[WB][0] == "H2" and "H2" not in hz[WC]
    vm, plugin, _ = build_scenario("vmx", "6.16", "kvm_mem_dma", backing="vram", host_memtype="WB")
    assert not any("H2" in ids for ids in _hazards(plugin, vm).values())


def test_h3_migration_read_flushes_when_types_differ() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "kvm_mem_wc", guest_types=[WC, WB])
    plugin.check_coherency(vm.vcpus[0])
    plugin.start_migration()
    assert all(vm.memslots.id_to_memslot(0, s).logs_dirty for s in plugin.device.slots)
    data = plugin.migration_read(plugin.device.blob_gpa(1), 0x2000)
    assert len(data) == 0x2000 and plugin.stats["flushes"] == 2
    vm, plugin, _ = build_scenario(
        "vmx", "6.16", "kvm_mem_wc", guest_types=[WC], extra={"migration_mitigation": "none"}
    )
    plugin.check_coherency(vm.vcpus[0])
    plugin.migration_read(plugin.device.blob_gpa(1), 0x1000)
    assert plugin.stats["stale_reads"] == 1 and plugin.stats["flushes"] == 0
    assert plugin.hazards[-1].id == "H3"
    # guest and reader agree (today: WB) -> nothing to flush
    vm, plugin, _ = build_scenario("vmx", "6.16", "today", guest_types=[WC])
    plugin.check_coherency(vm.vcpus[0])
    plugin.migration_read(plugin.device.blob_gpa(1), 0x1000)
    assert plugin.stats["flushes"] == 0


def test_h4_force_wb_mitigation_trades_h3_for_aliasing() -> None:
    vm, plugin, _ = build_scenario(
        "vmx", "6.16", "kvm_mem_wc", guest_types=[WC], extra={"migration_mitigation": "force_wb"}
    )
    assert _hazards(plugin, vm)[WC] == ["H3"]
    plugin.start_migration()
    assert plugin.stats["force_wb_zaps"] == 1
    checks = plugin.check_coherency(vm.vcpus[0])
    assert checks[0].effective is MemType.WB and [h.id for h in checks[0].hazards] == ["H4", "H1"]
    plugin.stop_migration()
    assert plugin.check_coherency(vm.vcpus[0])[0].effective is MemType.WC
    vm, plugin, _ = build_scenario(
        "vmx", "6.16", "kvm_mem_wc", guest_types=[WC], extra={"migration_mitigation": "block"}
    )
    with pytest.raises(MigrationBlocked):
        plugin.start_migration()


def test_h5_guest_wc_honoured_on_ram_only_without_ipat() -> None:
    vm, plugin, _ = build_scenario("vmx", "6.16", "kvm_mem_dma")
    assert "H5" in _hazards(plugin, vm)[WC]
    vm, plugin, _ = build_scenario("vmx", "6.16", "kvm_mem_wc")
    assert "H5" not in _hazards(plugin, vm)[WC]


def test_h6_whole_vm_designs_expose_all_ram() -> None:
    for vendor, design, want in [
        ("vmx", "virtio_noncoherent", True),
        ("vmx", "kvm_mem_dma", False),
        ("vmx", "kvm_mem_wc", False),
        ("svm", "today", True),
    ]:
        vm, plugin, _ = build_scenario(vendor, "6.16", design, guest_types=[WC])
        assert ("H6" in _hazards(plugin, vm)[WC]) is want, (vendor, design)


# ------------------------------------------------------------ hazard table


def test_hazard_table_rows_and_report_section() -> None:
    rows = hazard_table(["vmx", "svm"], ["today", "kvm_mem_wc"], ["6.8", "6.16"])
    assert len(rows) == 2 * 2 * 2 * len(GUEST_TYPES)
    assert all(tuple(r) == ROW_KEYS for r in rows)
    vmx_today = [r for r in rows if r["vendor"] == "vmx" and r["design"] == "today"]
    assert {r["effective"] for r in vmx_today} == {"WB"}
    assert {r["hazard"] for r in vmx_today} == {"H1"}
    wc = next(
        r
        for r in rows
        if r["vendor"] == "vmx"
        and r["design"] == "kvm_mem_wc"
        and r["era"] == "6.8"
        and r["guest_pat"] == "WB"
    )
    assert wc["effective"] == "WC" and wc["spte_memtype"] == "WC|IPAT" and wc["era_row"] == "6.7"
    vm, plugin, guest = build_scenario("vmx", "6.16", "kvm_mem_wc", guest_types=[WC])
    assert isinstance(guest, LinuxGuest)
    section = plugin.kvmmu_report_section(vm)
    assert section["design"] == "kvm_mem_wc" and len(section["hazard_table"]) == len(GUEST_TYPES)
    assert section["hazard_table"] == hazard_table(["vmx"], ["kvm_mem_wc"], ["6.16"])


def test_proposed_flag_bit_is_refused_so_design_is_a_plugin_attribute() -> None:
    """spec/kvm-mmu.md §1.3 checks 2/4: an unknown flag bit (crosvm's 1<<3) is EINVAL."""
    vm, plugin, _ = build_scenario("vmx", "6.16", "kvm_mem_wc", guest_types=[WC])
    vm.host.mmap_anon(0x7D00_0000_0000, 0x1000)
    with pytest.raises(kvmmu.KvmError) as e:
        vm.set_user_memory_region(40, 1 << 3, 0x2_0000_0000, 0x1000, 0x7D00_0000_0000)
    assert e.value.errno == errno.EINVAL
    assert plugin.design.value == "kvm_mem_wc"


def test_hazard_table_labels_every_guest_pat_type_uc_included() -> None:
    """UC is MemType 0: its row must still say "UC" (it once said null)."""
    from kvmmu.plugins.virtio_gpu.designs import Design
    from kvmmu.plugins.virtio_gpu.table import hazard_table

    rows = hazard_table(["vmx"], [Design.TODAY], ["6.16"])
    assert {r["guest_pat"] for r in rows} == {"WC", "UC-", "UC", "WT", "WP", "WB"}
