"""The ``vmx`` vendor plugin: Intel VMX with EPT (entry point ``kvmmu.plugins.vmx:VmxPlugin``)."""

from __future__ import annotations

from kvmmu.plugins.vmx.mt_mask import VMX_MT_MASK_ERAS, vmx_get_mt_mask
from kvmmu.plugins.vmx.plugin import VmxConfig, VmxPlugin, check_vmx_quirks, ept_spte_format

__all__ = [
    "VMX_MT_MASK_ERAS",
    "VmxConfig",
    "VmxPlugin",
    "check_vmx_quirks",
    "ept_spte_format",
    "vmx_get_mt_mask",
]
