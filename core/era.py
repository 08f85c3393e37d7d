"""Kernel versions and eras.

``--era`` takes any kernel version ("6.8") and the model uses the behaviour of
the era the version falls in; reports name the era by its first version
("6.7"). Each subsystem that changed over time (a vendor's ``get_mt_mask``,
the page-track API, ...) declares its own era boundaries as a sorted list of
first versions, and :func:`era_of` picks the one a version falls in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import total_ordering

__all__ = ["CORE_ERAS", "NEWEST", "KernelVersion", "era_of", "report_eras"]

_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:-rc\d+)?\s*$")


@total_ordering
class KernelVersion:
    """A Linux kernel version such as ``6.16`` or ``2.6.32``.

    Compares with other versions and with tuples: ``KernelVersion("6.8") >=
    (6, 7)``. A release candidate ``6.11-rc1`` counts as ``6.11`` (its
    behaviour is the release's, as the spec's tables are by release).
    """

    __slots__ = ("parts", "text")

    def __init__(self, text: str | KernelVersion) -> None:
        if isinstance(text, KernelVersion):
            self.parts: tuple[int, ...] = text.parts
            self.text: str = text.text
            return
        m = _VERSION_RE.match(str(text))
        if not m:
            raise ValueError(
                f"not a kernel version: {text!r} (expected MAJOR.MINOR, e.g. '6.8' or '2.6.32')"
            )
        parts = tuple(int(p) for p in m.groups() if p is not None)
        self.parts = parts
        self.text = ".".join(str(p) for p in parts)

    def _key(self, other: object) -> tuple[int, ...] | None:
        if isinstance(other, KernelVersion):
            return other.parts
        if isinstance(other, tuple):
            return tuple(int(x) for x in other)
        if isinstance(other, str):
            return KernelVersion(other).parts
        return None

    def __eq__(self, other: object) -> bool:
        key = self._key(other)
        return key is not None and _pad(self.parts) == _pad(key)

    def __lt__(self, other: object) -> bool:
        key = self._key(other)
        if key is None:
            return NotImplemented
        return _pad(self.parts) < _pad(key)

    def __hash__(self) -> int:
        return hash(_pad(self.parts))

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"KernelVersion({self.text!r})"


def _pad(parts: tuple[int, ...]) -> tuple[int, ...]:
    return (*parts, *(0,) * (3 - len(parts)))


#: The newest behaviour the model knows; the default ``era`` of a VM.
NEWEST = KernelVersion("6.16")

#: First versions where the core's (not a vendor's) modelled behaviour
#: changes (spec/kvm-mmu-2.md §8): 3.2 ``retry_instruction``; 4.0 PML; 4.2
#: ``KVM_CAP_DISABLE_QUIRKS``; 5.15 TDP MMU on by default; 5.19
#: ``KVM_CAP_DISABLE_QUIRKS2``; 6.6 page-track rework and MOVE refused with
#: external trackers; 6.8 ``KVM_SET_USER_MEMORY_REGION2``; 6.10
#: ``KVM_PRE_FAULT_MEMORY``; 6.12 ``SLOT_ZAP_ALL`` quirk and unprotect-and-retry
#: only after a real zap; 6.13 in-place huge-page recovery; 6.16 one-way quirks.
CORE_ERAS = ("3.2", "4.0", "4.2", "5.15", "5.19", "6.6", "6.8", "6.10", "6.12", "6.13", "6.16")


def report_eras(vendor_eras: Sequence[str]) -> list[str]:
    """The era boundaries a report names: the vendor's and the core's, sorted.

    Two kernels get the same era name only if nothing the model knows changes
    between them. The oldest era stays the vendor's oldest.
    """
    oldest = KernelVersion(vendor_eras[0])
    both = {KernelVersion(e) for e in vendor_eras} | {
        KernelVersion(e) for e in CORE_ERAS if KernelVersion(e) > oldest
    }
    return [str(v) for v in sorted(both)]


def era_of(version: str | KernelVersion, firsts: Sequence[str]) -> str:
    """Return the first version of the era ``version`` falls in.

    ``firsts`` are the eras' first versions in ascending order. A version
    older than the first era is an error naming the oldest version modelled.
    """
    v = KernelVersion(version)
    chosen: str | None = None
    for first in firsts:
        if v >= KernelVersion(first):
            chosen = first
    if chosen is None:
        raise ValueError(f"kernel {v} is older than the oldest era modelled ({firsts[0]})")
    return chosen
