"""virtio-gpu plugin pieces without a VM: designs, hazard rules, config, guest PTEs."""

from __future__ import annotations

import pytest
from kvmmu.memtype import MemType, pat_index, pat_type
from kvmmu.plugins.virtio_gpu import (
    LINUX_PAT,
    Design,
    VirtioGpuConfig,
    VirtioGpuPlugin,
    classify,
    design_mt_mask,
)
from kvmmu.plugins.virtio_gpu.coherency import explain
from kvmmu.plugins.virtio_gpu.designs import describe_ept, registers_noncoherent_dma
from kvmmu.plugins.virtio_gpu.guest import MAP_CACHE_TO_MEMTYPE, pte_cache_bits
from pydantic import ValidationError

WB_IPAT, WB, UC, WC_IPAT = 0x70, 0x30, 0x00, 0x48


def test_plugin_contract() -> None:
    assert VirtioGpuPlugin.name == "virtio_gpu"
    assert VirtioGpuPlugin.kind == "consumer"
    assert VirtioGpuPlugin.kvmmu_config_model() is VirtioGpuConfig
    assert VirtioGpuConfig.model_config["extra"] == "forbid"


@pytest.mark.parametrize(
    ("design", "want"),
    [
        (Design.TODAY, None),
        (Design.KVM_MEM_DMA, WB),  # [YAN-2024]: WB without IPAT, guest PAT decides
        (Design.KVM_MEM_WC, WC_IPAT),  # seed 002: MTRR_TYPE_WRCOMB << 3 | VMX_EPT_IPAT_BIT
        (Design.VIRTIO_NONCOHERENT, None),  # the vendor's noncoherent path
    ],
)
def test_design_masks_for_slot_ram(design: Design, want: int | None) -> None:
    assert design_mt_mask(design, ept=True, in_slot=True, is_mmio=False) == want


@pytest.mark.parametrize("design", list(Design))
def test_m1_designs_leave_mmio_to_vendor(design: Design) -> None:
    """spec/consumers.md M1: is_mmio is checked first (Yan's sketch), so UC stays."""
    assert design_mt_mask(design, ept=True, in_slot=True, is_mmio=True) is None


def test_h2_mmio_guard_off_honours_guest_on_mmio() -> None:
    got = design_mt_mask(Design.KVM_MEM_DMA, ept=True, in_slot=True, is_mmio=True, mmio_guard=False)
    assert got == WB


@pytest.mark.parametrize("design", list(Design))
def test_designs_only_touch_own_slot_and_ept(design: Design) -> None:
    assert design_mt_mask(design, ept=True, in_slot=False, is_mmio=False) is None
    assert design_mt_mask(design, ept=False, in_slot=True, is_mmio=False) is None


def test_h4_force_wb_mask() -> None:
    for d in (Design.KVM_MEM_DMA, Design.KVM_MEM_WC):
        assert design_mt_mask(d, ept=True, in_slot=True, is_mmio=False, force_wb=True) == WB_IPAT


def test_registration_designs() -> None:
    assert registers_noncoherent_dma(Design.VIRTIO_NONCOHERENT, "slot")
    assert registers_noncoherent_dma(Design.KVM_MEM_DMA, "vm")
    assert not registers_noncoherent_dma(Design.KVM_MEM_DMA, "slot")
    assert not registers_noncoherent_dma(Design.KVM_MEM_WC, "vm")
    assert not registers_noncoherent_dma(Design.TODAY, "vm")


def test_describe_ept() -> None:
    assert describe_ept(WB_IPAT) == "WB|IPAT"
    assert describe_ept(WC_IPAT) == "WC|IPAT"
    assert describe_ept(UC) == "UC"
    assert describe_ept(2 << 3) == "reserved(2)"


def _ids(**kw: object) -> list[str]:
    base: dict[str, object] = dict(
        vendor="vmx",
        spte=WB_IPAT,
        guest_pat=MemType.WC,
        effective=MemType.WB,
        host=MemType.WC,
        reader=MemType.WB,
        mmio=False,
        whole_vm_honoured=False,
        force_wb_active=False,
    )
    base.update(kw)
    return [h.id for h in classify(**base)]  # type: ignore[arg-type]


def test_h1_rule_cacheable_alias_of_wc() -> None:
    assert _ids() == ["H1"]
    # both uncached: no cacheable alias, no H1 (but the reader differs: H3)
    assert _ids(spte=UC, effective=MemType.UC, host=MemType.WC, guest_pat=MemType.UC) == ["H3"]


def test_h1_cause_names_the_ept_override() -> None:
    (h,) = classify(
        vendor="vmx",
        spte=WB_IPAT,
        guest_pat=MemType.WC,
        effective=MemType.WB,
        host=MemType.WC,
        reader=MemType.WB,
        mmio=False,
        whole_vm_honoured=False,
        force_wb_active=False,
    )
    assert "guest WC but EPT WB|IPAT gives WB" in h.cause


def test_h2_rule_only_cacheable_on_mmio() -> None:
    assert "H2" in _ids(
        mmio=True, spte=WB, effective=MemType.WB, guest_pat=MemType.WB, reader=MemType.WC
    )
    assert "H2" not in _ids(mmio=True, spte=UC, effective=MemType.WC, reader=MemType.WC)


def test_h3_rule_reader_type_differs() -> None:
    assert _ids(spte=WC_IPAT, effective=MemType.WC) == ["H3"]


def test_h4_rule_labels_force_wb_alias() -> None:
    assert _ids(force_wb_active=True) == ["H4", "H1"]


def test_h5_rule_vmx_only_ipat_clear_wc_on_ram() -> None:
    assert "H5" in _ids(spte=WB, effective=MemType.WC)
    assert "H5" not in _ids(spte=WC_IPAT, effective=MemType.WC)
    assert "H5" not in _ids(vendor="svm", spte=0, effective=MemType.WC)


def test_h6_rule_whole_vm() -> None:
    assert _ids(spte=WB, effective=MemType.WC, whole_vm_honoured=True)[-2:] == ["H6", "H5"]


def test_explain_svm() -> None:
    assert explain(
        vendor="svm", spte=0, guest_pat=MemType.WC, effective=MemType.WC, mmio=False
    ).startswith("guest WC through NPT")


def test_linux_pat_and_pte_bits_select_each_type() -> None:
    """SDM Table 11-11: index 4*PAT + 2*PCD + PWT; PAT is bit 7 of a 4K PTE."""
    for t in MemType:
        bits = pte_cache_bits(LINUX_PAT, t)
        idx = pat_index(bits & 0x80, bits & 0x10, bits & 0x08)
        assert pat_type(LINUX_PAT, idx) is t
    assert pte_cache_bits(LINUX_PAT, MemType.WB) == 0
    assert pte_cache_bits(LINUX_PAT, MemType.WC) == 0x08  # PA1
    with pytest.raises(ValueError):
        pte_cache_bits(0x0606060606060606, MemType.WC)


def test_map_cache_to_guest_type() -> None:
    """[VGPU-VRAM]: WC -> writecombine, UNCACHED -> noncached (UC-), else cached."""
    assert MAP_CACHE_TO_MEMTYPE == {
        "NONE": MemType.WB,
        "CACHED": MemType.WB,
        "UNCACHED": MemType.UC_MINUS,
        "WC": MemType.WC,
    }


def test_config_rejects_unknown_and_bad_layout() -> None:
    with pytest.raises(ValidationError):
        VirtioGpuConfig.model_validate({"desing": "today"})
    with pytest.raises(ValidationError):
        VirtioGpuConfig.model_validate({"design": "kvm_mem_magic"})
    with pytest.raises(ValidationError):
        VirtioGpuConfig.model_validate({"blobs": [{"resource_id": 1, "size": 100}]})
    with pytest.raises(ValidationError):
        VirtioGpuConfig.model_validate(
            {"bar_size": 0x2000, "blobs": [{"resource_id": 1, "size": 0x2000, "offset": 0x1000}]}
        )
    with pytest.raises(ValidationError):
        VirtioGpuConfig.model_validate(
            {"blobs": [{"resource_id": 1, "size": 0x1000}, {"resource_id": 1, "size": 0x1000}]}
        )
    ok = VirtioGpuConfig.model_validate({"design": "kvm_mem_wc"})
    assert ok.design is Design.KVM_MEM_WC
