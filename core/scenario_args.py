"""Argument checking for device steps that consumer plugins run.

A device step carries free-form fields (``[[workload]] op = "device"``); the
plugin names what its action takes, and :func:`take` checks them: unknown
or missing fields are a scenario error naming the allowed ones.
"""

from __future__ import annotations

from typing import Any

from kvmmu.errors import ConfigError

__all__ = ["bytes_arg", "int_arg", "take", "unknown_action"]


def take(
    action: str,
    args: dict[str, Any],
    required: tuple[str, ...],
    optional: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return ``args`` with defaults, refusing unknown or missing fields."""
    optional = optional or {}
    allowed = set(required) | set(optional)
    unknown = sorted(set(args) - allowed - {"repeat"})
    missing = [r for r in required if r not in args]
    problems = [
        (k, f"unknown field for action {action!r}; allowed: {sorted(allowed)}") for k in unknown
    ]
    problems += [(k, f"required by action {action!r}") for k in missing]
    if problems:
        raise ConfigError(problems)
    return {**optional, **{k: v for k, v in args.items() if k != "repeat"}}


def int_arg(v: Any) -> int:
    """An int or a size/hex string (``"2M"``, ``"0x1000"``)."""
    from kvmmu.scenario import parse_int

    return parse_int(v)


def bytes_arg(v: Any) -> bytes:
    """Bytes from a hex string (``"deadbeef"``) or an int (little-endian, 8 bytes)."""
    if isinstance(v, int):
        return v.to_bytes(8, "little")
    if isinstance(v, str):
        return bytes.fromhex(v.removeprefix("0x"))
    raise ConfigError([("data", f"expected a hex string or an integer, got {v!r}")])


def unknown_action(device: str, action: str, allowed: list[str]) -> ConfigError:
    return ConfigError(
        [("action", f"device {device!r} has no action {action!r}; allowed: {sorted(allowed)}")]
    )
