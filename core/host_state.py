"""The host's page geometry, address map and the state :class:`HostMemory` shares.

Page sizes are x86's (``arch/x86/include/asm/kvm_host.h``); the address map
(host RAM pfns from a bump allocator at :data:`RAM_BASE`, everything else
MMIO) is described in :mod:`kvmmu.hostmem`.  :class:`HostState` owns the
state every part of the host model (VMAs, GUP, physical bytes, pins, MMU
notifiers) reads and writes; the parts are mixins over it and
:class:`kvmmu.hostmem.HostMemory` combines them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmu.memtype import MemType

if TYPE_CHECKING:
    from kvmmu.host_invalidate import MmuNotifier
    from kvmmu.host_vma import Vma

__all__ = [
    "KVM_HPAGE_SIZE",
    "KVM_PAGES_PER_HPAGE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "RAM_BASE",
    "TASK_SIZE_MAX",
    "HostState",
    "HostStats",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3

#: Highest user address + 1 on x86-64 with 4-level paging
#: (``arch/x86/include/asm/page_64_types.h: TASK_SIZE_MAX``).
TASK_SIZE_MAX = 0x00007FFFFFFFF000

#: First host physical address handed out for RAM (the address map: :mod:`kvmmu.hostmem`).
RAM_BASE = 1 << 32


def KVM_PAGES_PER_HPAGE(level: int) -> int:
    """4K pages per page of ``level`` (``arch/x86/include/asm/kvm_host.h``): 1, 512, 262144."""
    if level not in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
        raise ValueError(f"page level must be 1 (4K), 2 (2M) or 3 (1G), got {level!r}")
    return 1 << (9 * (level - 1))


def KVM_HPAGE_SIZE(level: int) -> int:
    """Bytes per page of ``level``: 4 KiB, 2 MiB or 1 GiB."""
    return KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT


@dataclass
class HostStats:
    """Counters: 4K hva pages given a pfn, pages given byte storage, pfns allocated."""

    pages_populated: int = 0
    pages_materialised: int = 0
    pfn_allocations: int = 0
    pages_reclaimed: int = 0
    stale_writes: int = 0


class HostState:
    """State shared by the host's parts; ``maxphyaddr`` bounds host physical
    addresses (36..52) and RAM pfns come from ``[RAM_BASE, 2**(maxphyaddr-1))``."""

    def __init__(self, maxphyaddr: int = 46) -> None:
        if not 36 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be between 36 and 52, got {maxphyaddr}")
        self.maxphyaddr = maxphyaddr
        self._ram_base_pfn = RAM_BASE >> PAGE_SHIFT
        self._ram_limit_pfn = 1 << (maxphyaddr - 1 - PAGE_SHIFT)
        self._next_pfn = self._ram_base_pfn
        self._vma_starts: list[int] = []
        self._vmas: list[Vma] = []
        # populated mappings: 4K pages here, huge blocks in their VMA's ``blocks``
        self._small: dict[int, int] = {}  # hva page -> pfn
        self._live: dict[int, int] = {}  # live 4K RAM pfn -> hva page
        # Block pfn runs ever handed out, by first pfn: (hva page, blocks, level).
        # pfns are never reused, so a run maps a block pfn back to its hva.
        self._run_pfns: list[int] = []
        self._runs: list[tuple[int, int, int]] = []
        self._pages: dict[int, bytearray] = {}  # pfn -> bytes (RAM and MMIO)
        self._swapped: dict[int, bytearray] = {}  # hva page -> contents while unbacked
        self._pin_count: dict[int, int] = {}  # pfn -> pins
        self._pins_by_hva: dict[int, list[int]] = {}  # hva page -> pinned pfns (stack)
        self._mmio_ranges: list[tuple[int, int, MemType]] = []  # (first pfn, end pfn, memtype)
        self._notifiers: list[MmuNotifier] = []
        self._open_invalidations: list[tuple[int, int]] = []
        self.stats = HostStats()

    if TYPE_CHECKING:  # provided by the mixins HostMemory combines

        def find_vma(self, hva: int) -> Vma | None: ...

        def hva_to_pfn(self, hva: int, *, write: bool) -> int: ...

        def pfn_is_live(self, pfn: int) -> bool: ...

        def invalidate_range_start(self, hva_start: int, hva_end: int) -> None: ...

        def invalidate_range_end(self, hva_start: int, hva_end: int) -> None: ...

        def _small_in(self, first: int, end: int) -> list[int]: ...

        def _block_is_live(self, pfn: int) -> bool: ...

        def _drop_range(self, first: int, end: int, *, unmap: bool) -> int: ...


def _keys_in(d: Mapping[int, object], first: int, end: int) -> list[int]:
    """Keys of ``d`` in ``[first, end)``, scanning whichever side is smaller."""
    if end - first <= len(d):
        return [k for k in range(first, end) if k in d]
    return [k for k in d if first <= k < end]
