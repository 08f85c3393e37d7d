"""``hazard_table``: the virtio-gpu scenario across vendors, eras and designs.

For each (vendor, era, design) a fresh VM is built with the plugin enabled, a
Linux-like guest maps one blob page per guest PAT type, and every row comes
from a real guest access through that VM (``vcpu.access`` -> SPTE -> the
vendor's effective type), classified by :mod:`.coherency`. ``kvmmu compare``
prints these rows; the plugin's report section carries the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvmmu.era import KernelVersion, era_of
from kvmmu.memtype import MemType
from kvmmu.plugins.virtio_gpu.designs import DESIGNS, Design, describe_ept
from kvmmu.plugins.virtio_gpu.guest import LinuxGuest
from kvmmu.quirks import QUIRKS

__all__ = ["GUEST_TYPES", "ROW_KEYS", "build_scenario", "hazard_table"]

#: Guest PAT types a row is made for, in report order.
GUEST_TYPES: tuple[MemType, ...] = (
    MemType.WC,
    MemType.UC_MINUS,
    MemType.UC,
    MemType.WT,
    MemType.WP,
    MemType.WB,
)
#: The keys of every row.
ROW_KEYS = (
    "vendor",
    "era",
    "era_row",
    "design",
    "backing",
    "guest_pat",
    "effective",
    "host",
    "spte_memtype",
    "hazard",
    "hazards",
    "cause",
)

_RAM_HVA = 0x7F00_0000_0000
_RAM_SIZE = 0x40_0000
_PT_GPA, _PT_SIZE = 0x10_0000, 0x10_0000
_PROBE_GPA, _PROBE_GVA = 0x20_0000, 0x2000_0000
_BLOB_GVA = 0x4000_0000


def _quirks_for(era: str, quirks: Mapping[str, bool] | None) -> dict[str, bool]:
    v = KernelVersion(era)
    return {k: b for k, b in (quirks or {}).items() if v >= KernelVersion(QUIRKS[k][1])}


def build_scenario(
    vendor: str,
    era: str,
    design: Design | str,
    *,
    guest_types: Sequence[MemType] = GUEST_TYPES,
    backing: str = "sysmem",
    host_memtype: str = "WC",
    quirks: Mapping[str, bool] | None = None,
    self_snoop: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Any, Any, LinuxGuest]:
    """A VM with RAM, the device (one blob mapped at offset 0) and a guest that
    maps blob page ``i`` with ``guest_types[i]`` and a RAM probe page UC (H6).

    Returns ``(vm, plugin, guest)``.
    """
    import kvmmu

    section: dict[str, Any] = {
        "design": str(Design(design)),
        "backing": backing,
        "host_memtype": host_memtype,
        "blobs": [{"resource_id": 1, "size": 0x1000 * len(guest_types), "offset": 0}],
    }
    section.update(extra or {})
    vm = kvmmu.VM(
        {
            "vendor": vendor,
            "era": era,
            "tdp": True,
            "host_self_snoop": self_snoop,
            "quirks": _quirks_for(era, quirks),
            "plugins": {"enabled": ["virtio_gpu"], "virtio_gpu": section},
        }
    )
    vm.host.mmap_anon(_RAM_HVA, _RAM_SIZE)
    vm.set_user_memory_region(0, 0, 0, _RAM_SIZE, _RAM_HVA)
    plugin = vm.plugin("virtio_gpu")
    guest = LinuxGuest(vm, vm.vcpus[0], pt_gpa=_PT_GPA, pt_size=_PT_SIZE)
    guest.map(_PROBE_GVA, _PROBE_GPA, MemType.UC)
    blob = plugin.device.blobs.get(1)
    if blob is not None and blob.mapped:
        gpa = plugin.device.blob_gpa(1)
        for i, t in enumerate(guest_types):
            plugin.guest_map_page(guest, _BLOB_GVA + 0x1000 * i, gpa + 0x1000 * i, t)
    return vm, plugin, guest


def _era_row(vm: Any, vendor: str, era: str) -> str:
    eras = getattr(type(vm.plugin(vendor)), "ERAS", None)
    if not eras:
        return str(KernelVersion(era))
    try:
        return era_of(era, eras)
    except ValueError:
        return str(KernelVersion(era))


def hazard_table(
    vendors: Iterable[str],
    designs: Iterable[Design | str] = DESIGNS,
    eras: Iterable[str] = ("6.8", "6.16"),
    *,
    guest_types: Sequence[MemType] = GUEST_TYPES,
    backing: str = "sysmem",
    host_memtype: str = "WC",
    quirks: Mapping[str, bool] | None = None,
    self_snoop: bool = True,
) -> list[dict[str, Any]]:
    """One row per (vendor, era, design, guest PAT type); keys :data:`ROW_KEYS`.

    ``effective`` is the effective type of a real guest read of the blob
    page; ``host`` the host mapping type of the buffer; ``hazard`` the
    primary hazard id (H1–H6, spec/consumers.md §3.4) or ``None``;
    ``hazards`` every id found; ``cause`` the primary hazard's cause, or how
    the type came about when there is none. ``quirks`` (e.g.
    ``{"ignore_guest_pat": False}``) apply in eras that have them.
    """
    rows: list[dict[str, Any]] = []
    design_list = [Design(d) for d in designs]
    era_list = list(eras)
    for vendor in vendors:
        for era in era_list:
            for design in design_list:
                vm, plugin, _guest = build_scenario(
                    vendor,
                    era,
                    design,
                    guest_types=guest_types,
                    backing=backing,
                    host_memtype=host_memtype,
                    quirks=quirks,
                    self_snoop=self_snoop,
                )
                checks = plugin.check_coherency(vm.vcpus[0], ram_probe_gva=_PROBE_GVA)
                row_era = _era_row(vm, vendor, era)
                for chk in checks:
                    primary = chk.primary
                    from kvmmu.plugins.virtio_gpu.coherency import explain

                    how = explain(
                        vendor=vendor,
                        spte=chk.spte,
                        guest_pat=chk.guest_pat,
                        effective=chk.effective,
                        mmio=chk.mmio,
                    )
                    rows.append(
                        {
                            "vendor": vendor,
                            "era": str(era),
                            "era_row": row_era,
                            "design": design.value,
                            "backing": backing,
                            "guest_pat": MemType(chk.guest_pat).label
                            if chk.guest_pat is not None
                            else None,
                            "effective": chk.effective.label,
                            "host": chk.host.label,
                            "spte_memtype": describe_ept(chk.spte) if vendor == "vmx" else None,
                            "hazard": primary.id if primary else None,
                            "hazards": [h.id for h in chk.hazards],
                            "cause": primary.cause if primary else how,
                        }
                    )
                vm.destroy()
    return rows
