"""The memory-type matrix behind ``kvmmu memtype``.

For every (vendor, era, disabled quirks, noncoherent DMA, guest CR0.CD, slot
kind, guest PAT type, guest MTRR type) the matrix gives the SPTE memtype and
IPAT the vendor's ``get_mt_mask`` produces and the effective type of the
access. Every cell is computed by calling the vendor plugin's own hooks
(``kvmmu_get_mt_mask``, ``kvmmu_effective_memtype``) on a VM view, one per
(vendor, era, quirks, noncoherent DMA, CR0.CD) combination; the plugin is
found through the ``kvmmu.vendors`` entry points, like any VM's vendor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from kvmmu.era import NEWEST, KernelVersion, era_of
from kvmmu.errors import KvmError
from kvmmu.memtype import (
    MSR_MTRR_DEF_TYPE,
    MTRR_DEF_TYPE_E,
    PAT_DEFAULT,
    MemType,
    MtrrState,
    make_pat,
)
from kvmmu.quirks import QUIRKS

__all__ = ["MATRIX_KEYS", "MATRIX_MTRR_TYPES", "memtype_matrix", "plot_matrix"]

#: The keys of every row, in order.
MATRIX_KEYS = (
    "vendor",
    "era",
    "quirks",
    "noncoherent_dma",
    "guest_cr0_cd",
    "slot_kind",
    "guest_pat",
    "guest_mtrr",
    "spte_memtype",
    "ipat",
    "effective",
)
#: Guest MTRR types swept (MTRR encodings only; UC- is PAT-only).
MATRIX_MTRR_TYPES = (MemType.UC, MemType.WC, MemType.WT, MemType.WP, MemType.WB)
_CR0_PE_PG = (1 << 31) | (1 << 4) | 1
_CR0_CD = 1 << 30
_RAM_HPA = 0x1_0000_0000
_MMIO_HPA = 0xFE00_0000
_GFN = 0x10


@dataclass
class _Config:
    vendor: str
    era: str
    tdp: bool = True
    host_self_snoop: bool = True
    host_maxphyaddr: int = 46


@dataclass
class _Vcpu:
    index: int = 0
    cr0: int = _CR0_PE_PG
    pat: int = PAT_DEFAULT
    mtrr: MtrrState = field(default_factory=MtrrState)


class _Host:
    """Host RAM is WB; the MMIO BAR is UC in the host MTRRs."""

    def memtype_of(self, hpa: int) -> MemType:
        return MemType.UC if hpa == _MMIO_HPA else MemType.WB


class _MatrixVM:
    """The narrow VM view (``kvmmu.memtype.MemtypeVM``) the vendor hooks read.

    Zaps are irrelevant to a single access and are dropped.
    """

    def __init__(self, config: _Config, quirks: int, noncoherent: bool) -> None:
        self.config = config
        self.era = KernelVersion(config.era)
        self.quirks = quirks
        self.noncoherent_dma_count = int(noncoherent)
        self.vcpus = [_Vcpu()]
        self.host = _Host()

    def has_quirk(self, bit: int) -> bool:
        return bool(self.quirks & bit)

    def zap_gfn_range(self, start: int, end: int) -> None:
        return None


def _vendor_class(name: str) -> Any:
    for ep in entry_points(group="kvmmu.vendors"):
        if ep.name == name:
            return ep.load()
    raise KeyError(f"no vendor plugin {name!r} in the kvmmu.vendors entry points")


def _quirk_sets(era: KernelVersion) -> list[tuple[str, ...]]:
    """Disabled-quirk sets that change memory types in ``era``."""
    names = [n for n in ("cd_nw_cleared", "ignore_guest_pat") if era >= KernelVersion(QUIRKS[n][1])]
    out: list[tuple[str, ...]] = [()]
    out += [(n,) for n in names]
    if len(names) == 2:
        out.append(tuple(names))
    return out


def _quirk_mask(disabled: Iterable[str]) -> int:
    mask = 0
    for bit, _ in QUIRKS.values():
        mask |= bit
    for name in disabled:
        mask &= ~QUIRKS[name][0]
    return mask


def memtype_matrix(
    vendors: Sequence[str] = ("vmx", "svm"),
    eras: Sequence[str] | None = None,
    *,
    host_self_snoop: bool = True,
    tdp: bool = True,
) -> list[dict[str, Any]]:
    """Compute the memory-type matrix as a list of rows.

    ``eras`` are any kernel versions (default: each vendor's era boundaries,
    its plugin's ``ERAS``); a row names the era by its first version. Quirk
    sets a kernel refuses (``IGNORE_GUEST_PAT`` without self-snoop on VMX)
    are left out. Row keys are :data:`MATRIX_KEYS`: ``quirks`` is
    ``"default"`` or the comma-joined disabled quirk names; memory types are
    written ``"UC"``, ``"WC"``, ``"WT"``, ``"WP"``, ``"WB"``, ``"UC-"``;
    ``spte_memtype`` and ``ipat`` are ``None`` for SPTE formats without a
    memtype field (NPT, shadow paging).
    """
    rows: list[dict[str, Any]] = []
    for vendor in vendors:
        cls = _vendor_class(vendor)
        firsts: Sequence[str] = getattr(cls, "ERAS", (str(NEWEST),))
        chosen = list(eras) if eras else list(firsts)
        model = cls.kvmmu_config_model()
        for version in chosen:
            era = KernelVersion(version)
            era_name = era_of(era, firsts)
            for disabled in _quirk_sets(era):
                for noncoh in (False, True):
                    for cd in (False, True):
                        config = _Config(vendor, str(era), tdp, host_self_snoop)
                        vm = _MatrixVM(config, _quirk_mask(disabled), noncoh)
                        try:
                            plugin = cls(vm, model() if model is not None else None)
                        except KvmError:
                            break
                        vcpu = vm.vcpus[0]
                        vcpu.cr0 = _CR0_PE_PG | (_CR0_CD if cd else 0)
                        ept = plugin.kvmmu_spte_format(vm).name == "ept"
                        head = {
                            "vendor": vendor,
                            "era": era_name,
                            "quirks": ",".join(disabled) or "default",
                            "noncoherent_dma": noncoh,
                            "guest_cr0_cd": cd,
                        }
                        rows += _cells(plugin, vm, vcpu, head, ept=ept)
    return rows


def _cells(
    plugin: Any, vm: _MatrixVM, vcpu: _Vcpu, head: dict[str, Any], *, ept: bool
) -> list[dict[str, Any]]:
    out = []
    for slot, hpa in (("RAM", _RAM_HPA), ("MMIO", _MMIO_HPA)):
        for mtrr in MATRIX_MTRR_TYPES:
            vcpu.mtrr.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | int(mtrr))
            bits = plugin.kvmmu_get_mt_mask(vm, vcpu, _GFN, slot == "MMIO")
            spte = bits or 0
            spte_mt = MemType((spte >> 3) & 7).label if ept else None
            ipat = bool(spte & (1 << 6)) if ept else None
            for pat in MemType:
                vcpu.pat = make_pat(pat)
                eff = plugin.kvmmu_effective_memtype(vm, vcpu, spte, pat, hpa)
                out.append(
                    {
                        **head,
                        "slot_kind": slot,
                        "guest_pat": pat.label,
                        "guest_mtrr": mtrr.label,
                        "spte_memtype": spte_mt,
                        "ipat": ipat,
                        "effective": MemType(eff).label,
                    }
                )
    return out


def plot_matrix(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw one heatmap of effective types per (vendor, era) into ``path`` (PNG, SVG, PDF).

    Rows of each heatmap are (quirks, noncoherent DMA, CR0.CD, slot kind),
    columns are (guest PAT, guest MTRR); the colour is the effective type.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    labels = [t.label for t in MemType]
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault((r["vendor"], r["era"]), []).append(r)
    if not panels:
        raise ValueError("no rows to plot")
    vendors = list(dict.fromkeys(v for v, _ in panels))
    ncols = max(sum(1 for v, _ in panels if v == vendor) for vendor in vendors)
    fig, axes = plt.subplots(
        len(vendors), ncols, figsize=(4.5 * ncols, 5 * len(vendors)), squeeze=False
    )
    cmap = ListedColormap(["#d62728", "#ff7f0e", "#bcbd22", "#9467bd", "#2ca02c", "#8c564b"])
    for i, vendor in enumerate(vendors):
        keys = [k for k in panels if k[0] == vendor]
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(keys):
                ax.axis("off")
                continue
            cells = panels[keys[j]]
            ys = list(
                dict.fromkeys(
                    (r["quirks"], r["noncoherent_dma"], r["guest_cr0_cd"], r["slot_kind"])
                    for r in cells
                )
            )
            xs = list(dict.fromkeys((r["guest_pat"], r["guest_mtrr"]) for r in cells))
            grid = [[0] * len(xs) for _ in ys]
            for r in cells:
                y = ys.index((r["quirks"], r["noncoherent_dma"], r["guest_cr0_cd"], r["slot_kind"]))
                x = xs.index((r["guest_pat"], r["guest_mtrr"]))
                grid[y][x] = labels.index(r["effective"])
            ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(labels) - 1, aspect="auto")
            ax.set_title(f"{vendor} {keys[j][1]}")
            ax.set_yticks(range(len(ys)))
            ax.set_yticklabels(
                [f"{q} nc={int(n)} cd={int(c)} {s}" for q, n, c, s in ys], fontsize=5
            )
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([f"{p}/{m}" for p, m in xs], fontsize=4, rotation=90)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k)) for k in range(len(labels))]
    fig.legend(handles, labels, loc="upper right", title="effective")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
