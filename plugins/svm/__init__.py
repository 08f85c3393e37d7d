"""The ``svm`` vendor plugin: AMD SVM with NPT (entry point ``kvmmu.plugins.svm:SvmPlugin``)."""

from __future__ import annotations

from kvmmu.plugins.svm.combine import UNVERIFIED_AMD_GUEST_HOST_COMBINATION, npt_effective_type
from kvmmu.plugins.svm.plugin import SVM_ERAS, SvmConfig, SvmPlugin

__all__ = [
    "SVM_ERAS",
    "UNVERIFIED_AMD_GUEST_HOST_COMBINATION",
    "SvmConfig",
    "SvmPlugin",
    "npt_effective_type",
]
