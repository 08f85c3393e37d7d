"""The coherency check: guest effective type of each blob page vs the host's.

Every verdict starts from a real guest access through the model
(``vcpu.access`` -> guest walk -> SPTE -> the vendor's
``kvmmu_effective_memtype``). :func:`classify` then names the hazards of
spec/consumers.md §3.4 that the observed types imply:

- **H2** a cacheable (WB/WT/WP) guest access to host MMIO: machine-check
  risk (bugzilla 104091; why KVM keeps MMIO at EPT UC, M1).
- **H1** aliasing on RAM: the guest's effective type and the host mapping
  type differ and exactly one is cacheable. A WC page must never be aliased
  by a cacheable one (SDM, quoted by Sean [SJC-2020a]); the guest's writes
  sit in the CPU cache while the GPU reads memory without snooping, so the
  device sees stale data ([VIRTIO-DEV], [YAN-2024]). Corruption, not #MC.
- **H4** the same aliasing, caused by the mitigation that forces WB once
  migration starts ([SJC-2020b]): reported as H4, with H1 alongside.
- **H3** live migration: the VMM's migration thread reads with a different
  type than the guest's access (cached reads of WC/UC data): stale reads,
  and a WBINVD can write stale lines back [PB-2020c].
- **H6** guest PAT honoured on ordinary guest RAM outside the device's
  slots (found by a probe access to a RAM page the guest maps UC): any
  guest component can alias [YAN-2024], [YAN-2023c].
- **H5** Intel only: guest WC honoured on RAM (EPT IPAT clear). The SKX40 /
  SKX59 errata concern; KVM's position is that data corruption is the
  guest's responsibility (spec/consumers.md H5).

A row's primary hazard is the first of H2, H4, H1, H3, H6, H5 present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmmu.memtype import MemType
from kvmmu.plugins.virtio_gpu.designs import VMX_EPT_IPAT_BIT, describe_ept

__all__ = [
    "CACHEABLE",
    "HAZARD_ORDER",
    "Hazard",
    "PageCheck",
    "classify",
    "explain",
]

#: Types whose accesses allocate in the CPU cache.
CACHEABLE = frozenset({MemType.WB, MemType.WT, MemType.WP})
#: Severity order used to pick a row's primary hazard.
HAZARD_ORDER = ("H2", "H4", "H1", "H3", "H6", "H5")


@dataclass(frozen=True)
class Hazard:
    """One hazard of spec/consumers.md §3.4 with the cause the model observed."""

    id: str
    cause: str


@dataclass(frozen=True)
class PageCheck:
    """The verdict for one blob page, from one real guest access."""

    gpa: int
    guest_pat: MemType | None
    effective: MemType
    host: MemType
    spte: int
    mmio: bool
    hazards: tuple[Hazard, ...] = field(default=())

    @property
    def primary(self) -> Hazard | None:
        """The most severe hazard, or ``None``."""
        for hid in HAZARD_ORDER:
            for h in self.hazards:
                if h.id == hid:
                    return h
        return None


def _label(t: MemType | None) -> str:
    return "none (paging off)" if t is None else MemType(t).label


def explain(
    *, vendor: str, spte: int, guest_pat: MemType | None, effective: MemType, mmio: bool
) -> str:
    """How the vendor reached ``effective``: "guest WC but EPT WB|IPAT gives WB"."""
    g, e = _label(guest_pat), effective.label
    if vendor == "vmx":
        ept = describe_ept(spte)
        where = " (host MMIO)" if mmio else ""
        if spte & VMX_EPT_IPAT_BIT and guest_pat is not None and guest_pat != effective:
            return f"guest {g} but EPT {ept}{where} gives {e} (SDM 24.2.5.2: IPAT ignores PAT)"
        return f"guest {g} with EPT {ept}{where} gives {e} (SDM Table 11-7)"
    host_side = "host MMIO" if mmio else "host RAM"
    return f"guest {g} through NPT (host PAT0 WB, {host_side}) gives {e} (spec/memtype.md §9)"


def classify(
    *,
    vendor: str,
    spte: int,
    guest_pat: MemType | None,
    effective: MemType,
    host: MemType,
    reader: MemType,
    mmio: bool,
    whole_vm_honoured: bool,
    force_wb_active: bool,
) -> tuple[Hazard, ...]:
    """The hazards one observed access implies (module docstring)."""
    how = explain(vendor=vendor, spte=spte, guest_pat=guest_pat, effective=effective, mmio=mmio)
    e, h = effective.label, host.label
    out: list[Hazard] = []
    if mmio and effective in CACHEABLE:
        out.append(
            Hazard(
                "H2", f"{how}: cacheable access to host MMIO, machine-check risk (bugzilla 104091)"
            )
        )
    if not mmio and effective != host and ((effective in CACHEABLE) != (host in CACHEABLE)):
        alias = (
            f"{how}; the host maps the buffer {h}: a {h} page aliased by a {e} access, "
            "the non-snooping GPU and the guest see different data"
        )
        if force_wb_active:
            out.append(
                Hazard(
                    "H4",
                    f"mitigation force_wb (KVM_MEM_LOG_DIRTY_PAGES forces "
                    f"WB|IPAT on the flagged slot): {alias}",
                )
            )
        out.append(Hazard("H1", alias))
    if effective != reader:
        out.append(
            Hazard(
                "H3",
                f"{how}; the migration thread reads {reader.label}: stale reads "
                "and WBINVD write-back of stale lines unless it flushes first",
            )
        )
    if whole_vm_honoured:
        out.append(
            Hazard(
                "H6",
                "guest PAT is honoured on ordinary guest RAM too (a probe page "
                "the guest maps UC is UC): any guest component can alias",
            )
        )
    if vendor == "vmx" and not mmio and not spte & VMX_EPT_IPAT_BIT and effective == MemType.WC:
        out.append(
            Hazard(
                "H5",
                f"{how}: guest WC honoured on RAM; SKX40/SKX59 errata, the guest "
                "must use WC / non-temporal writes correctly",
            )
        )
    return tuple(out)
