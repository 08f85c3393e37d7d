"""A test double of the narrow VM interface the memory-type code uses.

``FakeVM`` has exactly the attributes ``kvmmu.memtype.MemtypeVM`` names and
records every ``zap_gfn_range`` call, so tests can pin the exact ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmmu.era import KernelVersion
from kvmmu.memtype import PAT_DEFAULT, MemType, MtrrState
from kvmmu.quirks import QUIRKS

__all__ = ["CR0_PE_PG", "MMIO_BASE", "FakeVM", "make_fake_vm"]

#: A protected-mode, paging guest CR0 (PE | ET | PG).
CR0_PE_PG = (1 << 31) | (1 << 4) | 1
#: Host physical addresses at or above this are MMIO (host MTRR UC).
MMIO_BASE = 0xF000_0000


@dataclass
class FakeConfig:
    vendor: str = "vmx"
    tdp: bool = True
    host_self_snoop: bool = True
    host_maxphyaddr: int = 46


@dataclass
class FakeVcpu:
    index: int = 0
    cr0: int = CR0_PE_PG
    pat: int = PAT_DEFAULT
    mtrr: MtrrState = field(default_factory=MtrrState)


class FakeHost:
    """RAM below :data:`MMIO_BASE` is WB; above it, MMIO of type ``mmio_type``."""

    def __init__(self, mmio_type: MemType = MemType.UC) -> None:
        self.mmio_type = mmio_type

    def memtype_of(self, hpa: int) -> MemType:
        return self.mmio_type if hpa >= MMIO_BASE else MemType.WB

    def is_mmio_pfn(self, pfn: int) -> bool:
        return (pfn << 12) >= MMIO_BASE


class FakeVM:
    def __init__(
        self,
        *,
        era: str = "6.16",
        tdp: bool = True,
        disabled: tuple[str, ...] = (),
        noncoherent: int = 0,
        self_snoop: bool = True,
        maxphyaddr: int = 46,
        vcpus: int = 1,
    ) -> None:
        self.config = FakeConfig(tdp=tdp, host_self_snoop=self_snoop, host_maxphyaddr=maxphyaddr)
        self.era = KernelVersion(era)
        mask = 0
        for bit, _first in QUIRKS.values():
            mask |= bit
        for name in disabled:
            mask &= ~QUIRKS[name][0]
        self.quirks = mask
        self.noncoherent_dma_count = noncoherent
        self.vcpus = [FakeVcpu(index=i) for i in range(vcpus)]
        self.host = FakeHost()
        self.zaps: list[tuple[int, int]] = []

    def has_quirk(self, bit: int) -> bool:
        return bool(self.quirks & bit)

    def zap_gfn_range(self, start: int, end: int) -> None:
        self.zaps.append((start, end))


def make_fake_vm(**kw: object) -> FakeVM:
    return FakeVM(**kw)  # type: ignore[arg-type]


def test_fake_vm_records_zaps_and_quirks() -> None:
    vm = FakeVM(disabled=("cd_nw_cleared",))
    vm.zap_gfn_range(1, 2)
    assert vm.zaps == [(1, 2)]
    assert not vm.has_quirk(QUIRKS["cd_nw_cleared"][0])
    assert vm.has_quirk(QUIRKS["ignore_guest_pat"][0])
