"""Shared fixtures: a small VM with RAM, for tests across the tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kvmmu
import pytest

RAM_HVA = 0x7F00_0000_0000


class FlushRecorder:
    """A consumer plugin recording ``kvm_flush_remote_tlbs_range`` calls."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    @kvmmu.hookimpl
    def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        self.ranges.append((gfn, nr_pages))


def make_vm(ram_size: int = 16 << 20, **config: Any) -> Any:
    """A VM with one RAM slot at gpa 0 backed by an anonymous VMA."""
    vm = kvmmu.VM(kvmmu.VMConfig(**config))
    vm.host.mmap_anon(RAM_HVA, ram_size)
    vm.set_user_memory_region(0, 0, 0, ram_size, RAM_HVA)
    return vm


@pytest.fixture
def vm_factory() -> Callable[..., Any]:
    return make_vm
