"""The ``iommu`` consumer plugin: IOMMUFD, pinned or shared-TDP mode.

Hooks (spec/consumers.md §2): every TDP flush invalidates the IOTLB of the
KVM HWPTs for exactly that range (T5); after a fast zap it checks that the
MMU kept the exported root valid and zapped its leaves (T4; the MMU does the
work, ``TdpMmu.zap_all_fast``); non-coherent DMA is refused at export and
flagged after it (T7); invariants: the IOTLB never outlives a zap, and a
pinned page is never reclaimed while mapped.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.hookspecs import hookimpl
from kvmmu.plugins.iommu.device import DmaDevice
from kvmmu.plugins.iommu.domain import Iommu
from kvmmu.plugins.iommu.iommufd import (
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    HwptKvm,
    Iommufd,
)
from kvmmu.plugins.iommu.pgtable import io_format_for_spte
from kvmmu.plugins.iommu.tdp_fd import KvmTdpFd
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot, MemslotChange
    from kvmmu.vm import VM

__all__ = ["IommuConfig", "IommuPlugin"]

PAGE_SHIFT = 12
_RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE


class IommuConfig(BaseModel):
    """``[plugins.iommu]``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["pinned", "shared"] = Field(
        "pinned",
        description="'pinned': IOAS maps of all guest RAM (VFIO baseline); "
        "'shared': a KVM HWPT on the exported TDP (the RFC)",
    )
    iotlb_entries: int = Field(512, ge=1, le=1 << 20, description="IOTLB capacity (4K entries)")
    iopf: bool = Field(True, description="devices made by add_device support PRI/IOPF")
    iopf_max_retries: int = Field(
        64, ge=0, le=1 << 16, description="RET_PF_RETRY loops before an IOPF fails (model bound)"
    )
    devices: list[str] = Field(
        default_factory=list,
        description="DMA devices to create at VM init (add_device), e.g. for scenarios",
    )
    vtd_bit11_reserved: bool = Field(
        True,
        description="VT-d reserves bit 11 in second-level entries (T6): sharing then needs "
        "the MMU-present bit high ([plugins.vmx] mmu_present_high); false is a what-if "
        "IOMMU that ignores bit 11",
    )


class IommuPlugin:
    """IOMMUFD with an IOTLB: pinned IOAS maps, or the KVM TDP shared with the IOMMU."""

    name = "iommu"
    kind = "consumer"

    def __init__(self, vm: VM, config: IommuConfig | None) -> None:
        self.vm = vm
        self.config = config if config is not None else IommuConfig()
        self.iommu = Iommu(vm.host, self.config.iotlb_entries)
        self.iommufd = Iommufd(vm.host, self.iommu)
        self.devices: dict[str, DmaDevice] = {}
        self.tdp_fds: list[KvmTdpFd] = []
        self.default_ioas: int | None = None
        self.default_hwpt: int | None = None
        self.violations: list[str] = []
        self.stats = {
            "flush_range_calls": 0,
            "flush_gfns_calls": 0,
            "t4_fast_zaps": 0,
            "memslot_maps": 0,
            "memslot_unmaps": 0,
        }

    @staticmethod
    @hookimpl
    def kvmmu_config_model() -> type[BaseModel]:
        return IommuConfig

    # ------------------------------------------------------------ KVM TDP FD
    def create_tdp_fd(self, as_id: int = 0, mode: int = 0) -> KvmTdpFd:
        """``KVM_CREATE_TDP_FD`` (T1 preconditions, T2 exported root)."""
        fd = KvmTdpFd(
            self.vm,
            as_id,
            mode,
            require_mmu_present_high=self.config.vtd_bit11_reserved,
            max_retries=self.config.iopf_max_retries,
        )
        self.tdp_fds.append(fd)
        return fd

    def hwpt_alloc_kvm(self, dev_id: int, fd: KvmTdpFd) -> int:
        """``IOMMU_HWPT_ALLOC(IOMMU_HWPT_DATA_KVM, fd)``: a KVM HWPT on ``fd``'s root.

        The VT-d ``domain_alloc_kvm`` accepts only the EPT format
        (-EOPNOTSUPP otherwise; a model decision, the RFC is VT-d/EPT only).
        """
        try:
            fmt = io_format_for_spte(
                self.vm.spte_format, bit11_reserved=self.config.vtd_bit11_reserved
            )
        except ValueError as e:
            raise KvmError(errno.EOPNOTSUPP, f"HWPT_ALLOC(KVM): {e}") from None
        mmu = self.vm.tdp_mmu()
        return self.iommufd.hwpt_alloc_kvm(
            dev_id, fd, fmt, int(mmu.root_level), lambda hpa: mmu.pool.table(hpa)
        )

    # ------------------------------------------------------------ devices
    def add_device(self, name: str, *, iopf: bool | None = None) -> DmaDevice:
        """Bind a new device and attach it the way ``mode`` says.

        pinned: to the default IOAS, which maps every memslot at IOVA = GPA
        (the VMM's memory listener; every page pinned). shared: to the
        default KVM HWPT on an exported TDP (IOVA = GPA, T10).
        """
        if name in self.devices:
            raise KvmError(errno.EEXIST, f"device {name!r} already exists")
        dev = DmaDevice(self.iommu, name, iopf=self.config.iopf if iopf is None else iopf)
        dev_id = self.iommufd.bind(dev)
        try:
            if self.config.mode == "pinned":
                if self.default_ioas is None:
                    self.default_ioas = self.iommufd.ioas_alloc()
                    for slot in self.vm.memslots.slots(0):
                        self._map_slot(slot)
                self.iommufd.attach(dev_id, self.default_ioas)
            else:
                if self.default_hwpt is None:
                    fd = self.tdp_fds[0] if self.tdp_fds else self.create_tdp_fd()
                    self.default_hwpt = self.hwpt_alloc_kvm(dev_id, fd)
                self.iommufd.attach(dev_id, self.default_hwpt)
        except KvmError:
            self.iommufd.unbind(dev_id)
            raise
        self.devices[name] = dev
        return dev

    def _map_slot(self, slot: Memslot) -> None:
        assert self.default_ioas is not None
        flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE
        if not slot.is_readonly:
            flags |= IOMMU_IOAS_MAP_WRITEABLE
        self.iommufd.ioas_map(
            self.default_ioas,
            slot.userspace_addr,
            slot.npages << PAGE_SHIFT,
            flags,
            slot.base_gfn << PAGE_SHIFT,
        )
        self.stats["memslot_maps"] += 1

    def _unmap_slot(self, slot: Memslot) -> None:
        assert self.default_ioas is not None
        self.iommufd.ioas_unmap(
            self.default_ioas, slot.base_gfn << PAGE_SHIFT, slot.npages << PAGE_SHIFT
        )
        self.stats["memslot_unmaps"] += 1

    def kvm_hwpts(self) -> list[HwptKvm]:
        return [h for h in self.iommufd.hwpts() if isinstance(h, HwptKvm)]

    # ------------------------------------------------------------ hooks
    @hookimpl
    def kvmmu_memslot_commit(
        self, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> None:
        """Pinned mode: the VMM's memory listener keeps the IOAS = guest RAM.

        Only address space 0 (DMA never targets SMRAM); a slot's IOVA is its GPA.
        """
        if self.config.mode != "pinned" or self.default_ioas is None:
            return
        name = change.name
        if old is not None and old.as_id == 0 and name in ("DELETE", "MOVE"):
            self._unmap_slot(old)
        if new is not None and new.as_id == 0 and name in ("CREATE", "MOVE"):
            self._map_slot(new)

    def _invalidate(self, gfn: int, nr_pages: int) -> None:
        for fd in self.tdp_fds:
            if not fd.released:
                fd.flush_notify(gfn, nr_pages)

    @hookimpl
    def kvmmu_flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        """``vmx_flush_remote_tlbs_range`` -> ``kvm_tdp_fd_flush_notify`` (T5 [TDP-42])."""
        self.stats["flush_range_calls"] += 1
        self._invalidate(gfn, nr_pages)

    @hookimpl
    def kvmmu_flush_remote_tlbs_gfns(self, gfns: np.ndarray) -> None:
        """Batch flush: one IOTLB invalidation per run of contiguous gfns (T5)."""
        self.stats["flush_gfns_calls"] += 1
        g = np.asarray(gfns, dtype=np.int64)
        if not g.size:
            return
        cuts = np.flatnonzero(np.diff(g) != 1) + 1
        for run in np.split(g, cuts):
            self._invalidate(int(run[0]), int(run.size))

    @hookimpl
    def kvmmu_zap_all_fast(self, new_valid_gen: int) -> None:
        """T4 [TDP-36], the IOMMU's side: the installed root must still be valid.

        The MMU skipped the exported root when it invalidated the others and
        has already zapped its leaves (flushing the IOTLB through T5); here
        the plugin only counts the event and records a violation if the root
        it installed was invalidated or still has a present leaf.
        """
        live = [fd for fd in self.tdp_fds if not fd.released]
        if not live:
            return
        self.stats["t4_fast_zaps"] += 1
        mmu = self.vm.tdp_mmu()  # a live KVM HWPT exists only with TDP (T1)
        for fd in live:
            root = self._root_of(fd)
            if root is None:
                self.violations.append(
                    f"iommu: T4 exported root {fd.root_hpa:#x} was invalidated by fast zap"
                )
            elif mmu.has_present_leaf(root.idx):
                self.violations.append(
                    f"iommu: T4 exported root {fd.root_hpa:#x} kept a leaf across fast zap"
                )

    def _root_of(self, fd: KvmTdpFd) -> Any:
        """The MMU's valid root whose hpa is ``fd.root_hpa``, or None."""
        mmu = self.vm.tdp_mmu()
        for r in mmu.roots:
            if not r.invalid and int(mmu.pool.hpa(r.idx)) == fd.root_hpa:
                return r
        return None

    def _root_valid(self, fd: KvmTdpFd) -> bool:
        return self._root_of(fd) is not None

    @hookimpl
    def kvmmu_noncoherent_dma_changed(self, old_count: int, new_count: int) -> None:
        """T7: non-coherent DMA while a TDP is exported is unsupported; record it."""
        if new_count > old_count and any(not fd.released for fd in self.tdp_fds):
            self.violations.append(
                "iommu: T7 non-coherent DMA registered while the TDP is exported "
                "(an IOPF has no vCPU to compute the guest memtype)"
            )

    @hookimpl
    def kvmmu_vm_init(self) -> None:
        """Create the devices the config names (``devices``)."""
        for name in self.config.devices:
            self.add_device(name)

    @hookimpl
    def kvmmu_scenario_devices(self) -> list[str]:
        """Scenario device names: the devices added so far."""
        return list(self.devices)

    @hookimpl
    def kvmmu_scenario_op(self, device: str, action: str, args: dict[str, Any]) -> Any:
        """Run a scenario step on one of the DMA devices (scenario_ops.py)."""
        from kvmmu.plugins.iommu.scenario_ops import run_action

        if device not in self.devices:
            return None
        return run_action(self, device, action, args)

    @hookimpl
    def kvmmu_vm_destroy(self) -> None:
        """Release everything: devices, HWPTs, IOAS (unpinning), TDP FDs."""
        fd_ = self.iommufd
        for bd in fd_.devices():
            fd_.unbind(bd.id)
        for h in fd_.hwpts():
            fd_.destroy(h.id)
        for obj_id in list(fd_.objects):
            fd_.destroy(obj_id)
        for fd in self.tdp_fds:
            if not fd.released:
                fd.close()

    @hookimpl
    def kvmmu_check_invariants(self) -> list[str]:
        """The IOTLB never outlives a zap; pinned pages stay pinned and live; T4; T7."""
        from kvmmu.plugins.iommu.invariants import check

        return check(self)

    @hookimpl
    def kvmmu_report_section(self) -> dict[str, Any]:
        """Counters for ``kvmmu run``: pins, IOTLB, IOPFs, invalidations."""
        from kvmmu.plugins.iommu.invariants import report

        return report(self)
