"""Scenario steps on the virtio-gpu device (``op = "device"``, device ``virtio-gpu0``).

Actions: ``guest_init`` (a Linux-like guest on one vCPU, with its own page
tables and the Linux PAT), ``create_blob``, ``map_blob`` / ``unmap_blob``
(host-visible region, one memslot per blob), ``guest_map_blob`` (the guest
driver maps it with the type ``map_info`` implies), ``access`` (a guest
access through the model), ``check_coherency`` (every mapped page, hazards),
``start_migration`` / ``migration_read`` (the live-migration read path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.scenario_args import bytes_arg, int_arg, take, unknown_action

if TYPE_CHECKING:
    from kvmmu.plugins.virtio_gpu.plugin import VirtioGpuPlugin

__all__ = ["ACTIONS", "DEVICE", "run_action"]

DEVICE = "virtio-gpu0"
ACTIONS = [
    "access",
    "check_coherency",
    "create_blob",
    "guest_init",
    "guest_map_blob",
    "map_blob",
    "migration_read",
    "start_migration",
    "unmap_blob",
]


def run_action(p: VirtioGpuPlugin, action: str, args: dict[str, Any]) -> dict[str, Any]:
    from kvmmu.memtype import MemType
    from kvmmu.plugins.virtio_gpu.guest import LinuxGuest

    if action not in ACTIONS:
        raise unknown_action(DEVICE, action, ACTIONS)
    vm = p.vm
    if action == "guest_init":
        a = take(action, args, ("vcpu", "pt_gpa", "pt_size"))
        p.scenario_guest = LinuxGuest(
            vm, vm.vcpus[a["vcpu"]], pt_gpa=int_arg(a["pt_gpa"]), pt_size=int_arg(a["pt_size"])
        )
        return {"vcpu": a["vcpu"]}
    if action == "create_blob":
        a = take(action, args, ("resource_id", "size"), {"map_info": "WC"})
        p.device.create_blob(a["resource_id"], int_arg(a["size"]), map_info=a["map_info"])
        return {"resource_id": a["resource_id"]}
    if action == "map_blob":
        a = take(action, args, ("resource_id",), {"offset": 0})
        return {"gpa": p.device.map_blob(a["resource_id"], int_arg(a["offset"]))}
    if action == "unmap_blob":
        a = take(action, args, ("resource_id",))
        p.device.unmap_blob(a["resource_id"])
        return {"resource_id": a["resource_id"]}
    if action == "start_migration":
        take(action, args, ())
        p.start_migration()
        return {}
    if action == "migration_read":
        a = take(action, args, ("gpa", "size"))
        p.migration_read(int_arg(a["gpa"]), int_arg(a["size"]))
        return {"flushes": int(p.stats["flushes"]), "stale_reads": int(p.stats["stale_reads"])}
    guest = getattr(p, "scenario_guest", None)
    if guest is None:
        raise unknown_action(DEVICE, f"{action} before guest_init", ["guest_init"])
    if action == "guest_map_blob":
        a = take(action, args, ("resource_id", "gva"), {"memtype": None})
        mt = None if a["memtype"] is None else MemType.from_label(a["memtype"])
        maps = p.guest_map_blob(guest, a["resource_id"], int_arg(a["gva"]), mt)
        return {"pages": len(maps)}
    if action == "access":
        a = take(action, args, ("gva",), {"kind": "read", "size": 8, "data": None})
        data = bytes_arg(a["data"])[: a["size"]] if a["kind"] == "write" else None
        if data is not None and len(data) < a["size"]:
            data = data.ljust(a["size"], b"\0")
        r = p.guest_access(guest.vcpu, int_arg(a["gva"]), a["kind"], a["size"], data)
        return {"memtype": None if r.memtype is None else MemType(r.memtype).label}
    a = take(action, args, (), {"ram_probe_gva": None})
    probe = None if a["ram_probe_gva"] is None else int_arg(a["ram_probe_gva"])
    checks = p.check_coherency(guest.vcpu, ram_probe_gva=probe)
    return {"pages": len(checks), "hazards": sorted({h.id for h in p.hazards})}
