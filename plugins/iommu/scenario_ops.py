"""Scenario steps on IOMMU-attached DMA devices (``op = "device"``).

Devices are those named in ``[plugins.iommu] devices``. The one action,
``dma``, reads or writes at an IOVA (= GPA, spec/consumers.md T10) through
the device's HWPT: the IOTLB, a walk of the I/O page table (pinned) or of
KVM's own SPTE tables (shared), and IO page faults where the device has them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.scenario_args import bytes_arg, int_arg, take, unknown_action

if TYPE_CHECKING:
    from kvmmu.plugins.iommu.plugin import IommuPlugin

__all__ = ["ACTIONS", "run_action"]

ACTIONS = ["dma"]


def run_action(p: IommuPlugin, device: str, action: str, args: dict[str, Any]) -> dict[str, Any]:
    from kvmmu.plugins.iommu.device import DmaFault

    if action not in ACTIONS:
        raise unknown_action(device, action, ACTIONS)
    a = take(action, args, ("iova",), {"kind": "read", "size": 8, "data": None})
    dev = p.devices[device]
    iova = int_arg(a["iova"])
    try:
        if a["kind"] == "write":
            data = bytes_arg(a["data"] if a["data"] is not None else 0)
            dev.dma_write(iova, data[: a["size"]].ljust(a["size"], b"\0"))
            return {"ok": True}
        if a["kind"] != "read":
            raise unknown_action(device, f"dma kind {a['kind']!r}", ["read", "write"])
        return {"ok": True, "data": dev.dma_read(iova, a["size"]).hex()}
    except DmaFault as e:
        return {"ok": False, "fault": str(e)}
