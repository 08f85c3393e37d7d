"""Errors the model raises, and the CLI exit codes they map to.

KVM reports failures as negative errno values; the model raises
:class:`KvmError` carrying the positive errno (``errno.EINVAL`` ...), so a
test can compare ``err.errno`` with what the kernel returns
(``virt/kvm/kvm_main.c: kvm_set_memory_region``).
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum

__all__ = [
    "ConfigError",
    "ExitCode",
    "GuestFault",
    "InvariantViolation",
    "KvmError",
    "KvmmuError",
    "PluginError",
]


class ExitCode(IntEnum):
    """Exit codes of the ``kvmmu`` command line (DESIGN.md, CLI)."""

    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    CONFIG = 3
    PLUGIN = 4
    INTERNAL = 5


class KvmmuError(Exception):
    """Base of every error the model raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class KvmError(KvmmuError):
    """An error KVM itself would return, with the kernel's errno.

    ``KvmError(errno.EEXIST, "slot 1 overlaps slot 0")``; ``str(err)`` names
    the errno symbol so logs read like the kernel's.
    """

    exit_code = ExitCode.CHECK_FAILED

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.message = message
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{name}: {message}")


class ConfigError(KvmmuError):
    """Configuration or scenario errors, all reported together.

    ``problems`` is a list of ``(location, message)``; the location is the
    dotted path of the field (``plugins.kvmgt.scratch_pages``) and, for a file,
    starts with the file name.
    """

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        lines = [f"{head}{loc}: {msg}" if loc else f"{head}{msg}" for loc, msg in self.problems]
        super().__init__("\n".join(lines))


class PluginError(KvmmuError):
    """A plugin failed: it could not be imported, or it raised inside a hook.

    ``plugin`` and ``hook`` name the culprit; ``__cause__`` is the original
    exception.
    """

    exit_code = ExitCode.PLUGIN

    def __init__(self, plugin: str, hook: str | None, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        where = f"plugin {plugin!r}" + (f" in hook {hook}" if hook else "")
        super().__init__(f"{where}: {message}")


class InvariantViolation(KvmmuError):
    """Raised when invariant checking is switched to strict and a check fails."""

    exit_code = ExitCode.CHECK_FAILED

    def __init__(self, violations: list[str]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(self.violations))


class GuestFault(KvmmuError):
    """Not raised to users: an exception to inject into the guest.

    ``vector`` is 14 (#PF) or 13 (#GP); ``error_code`` as the CPU pushes it.
    ``vcpu.access`` returns it in ``AccessResult.fault`` instead of raising.
    """

    def __init__(self, vector: int, error_code: int, address: int = 0) -> None:
        self.vector = vector
        self.error_code = error_code
        self.address = address
        super().__init__(f"guest exception vector {vector} error_code {error_code:#x}")
