"""Scenario steps on KVMGT vGPUs (``op = "device"``, device ``gpu<N>``).

Actions: ``ppgtt_create`` (the guest driver builds a PPGTT in guest memory
and tells GVT, L1), ``map`` / ``unmap`` (guest PPGTT edits through vCPU
writes, so they are emulated and reach the write handler), ``submit`` (a
workload: pin, post-shadow flush, GPU reads/writes through the shadow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmmu.scenario_args import bytes_arg, int_arg, take, unknown_action

if TYPE_CHECKING:
    from kvmmu.plugins.kvmgt import KvmgtPlugin

__all__ = ["ACTIONS", "device_names", "run_action"]

ACTIONS = ["map", "ppgtt_create", "submit", "unmap"]
_PAGE = {"4K": "map_4k", "64K": "map_64k", "2M": "map_2m", "1G": "map_1g"}


def device_names(plugin: KvmgtPlugin) -> list[str]:
    return [f"gpu{i}" for i in range(len(plugin.vgpus))]


def run_action(
    plugin: KvmgtPlugin, device: str, action: str, args: dict[str, Any]
) -> dict[str, Any]:
    from kvmmu.plugins.kvmgt.device import VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE
    from kvmmu.plugins.kvmgt.guest import GuestPpgtt

    vgpu = plugin.vgpus[int(device.removeprefix("gpu"))]
    ppgtts: dict[str, Any] = plugin.scenario_ppgtts.setdefault(device, {})
    if action == "ppgtt_create":
        a = take(action, args, ("name", "pool_start", "pool_end"), {"vcpu": 0})
        g = GuestPpgtt(
            plugin.vm,
            int_arg(a["pool_start"]),
            int_arg(a["pool_end"]),
            vcpu=plugin.vm.vcpus[a["vcpu"]],
        )
        mm = vgpu.g2v_notify(VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, g.pdps)
        ppgtts[a["name"]] = (g, mm)
        return {"ppgtt": a["name"], "pml4": g.pdps[0]}
    if action not in ACTIONS:
        raise unknown_action(device, action, ACTIONS)
    a_name = args.get("ppgtt")
    if a_name not in ppgtts:
        raise unknown_action(device, f"{action} on ppgtt {a_name!r}", sorted(ppgtts))
    g, mm = ppgtts[a_name]
    if action == "map":
        a = take(action, args, ("ppgtt", "gma", "gpa"), {"page": "4K", "width": "8"})
        if a["page"] not in _PAGE:
            raise unknown_action(device, f"map page {a['page']!r}", list(_PAGE))
        fn = getattr(g, _PAGE[a["page"]])
        if a["page"] == "1G":
            fn(int_arg(a["gma"]), int_arg(a["gpa"]))
        else:
            fn(int_arg(a["gma"]), int_arg(a["gpa"]), width=a["width"])
        return {"guest_writes": g.writes}
    if action == "unmap":
        a = take(action, args, ("ppgtt", "gma"), {"level": 1, "width": "8"})
        g.unmap(int_arg(a["gma"]), a["level"], width=a["width"])
        return {"guest_writes": g.writes}
    a = take(action, args, ("ppgtt",), {"reads": [], "writes": []})
    reads = [(int_arg(gma), int(n)) for gma, n in a["reads"]]
    writes = [(int_arg(gma), bytes_arg(d)) for gma, d in a["writes"]]
    out = vgpu.submit_workload(mm, reads=reads, writes=writes)
    return {"reads": [b.hex() for b in out]}
