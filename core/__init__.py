"""kvmmu: an executable model of the Linux KVM x86 MMU, as a plugin framework.

The public surface follows KVM's own names (DESIGN.md, "Public surface"):
``VM``, ``VMConfig``, ``load_config``, ``hookimpl``, ``KvmError`` and the
memslot flag constants; :mod:`kvmmu.memtype` and :mod:`kvmmu.paging` hold the
memory-type and guest-walk primitives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.config import VMConfig, load_config
from kvmmu.errors import ConfigError, ExitCode, GuestFault, KvmError, PluginError
from kvmmu.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = [
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "VM",
    "ConfigError",
    "ExitCode",
    "GuestFault",
    "KvmError",
    "PluginError",
    "VMConfig",
    "__version__",
    "hookimpl",
    "load_config",
]

__version__ = "0.1.0"

#: Memslot flags (``include/uapi/linux/kvm.h``; spec/kvm-mmu.md §1.1).
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2


def __getattr__(name: str) -> Any:
    # The VM pulls in numpy-heavy modules; import it on first use so that
    # `import kvmmu` stays cheap for config and CLI work.
    if name == "VM":
        from kvmmu.vm import VM

        return VM
    raise AttributeError(f"module 'kvmmu' has no attribute {name!r}")
