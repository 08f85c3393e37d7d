"""The memory-type matrix behind ``kvmmu memtype``.

For every (vendor, era, disabled quirks, noncoherent DMA, guest CR0.CD, slot
kind, guest PAT type, guest MTRR type) the matrix gives the SPTE memtype and
IPAT of the leaf SPTE and the effective type of the access. Every cell is a
real guest read through the model: one :class:`kvmmu.VM` per (vendor, era,
quirks, noncoherent DMA, CR0.CD) combination, with a RAM memslot and a host
MMIO BAR memslot (host mapping UC, as a BAR ``ioremap``ed UC by the host), the
guest's long-mode page tables in its own memory, its PAT MSR and its MTRRs
programmed through ``vcpu.set_msr`` before the first access, CR0 through
``vcpu.set_sregs`` and noncoherent DMA through
``vm.register_noncoherent_dma()``. ``spte_memtype``/``ipat`` are EPT leaf
bits 5:3 and 6 (``VMX_EPT_MT_EPTE_SHIFT``, ``VMX_EPT_IPAT_BIT``,
``arch/x86/include/asm/vmx.h``; SDM Vol 3B §24.2.5, "EPT and Memory Typing");
``effective`` is ``AccessResult.memtype`` (spec/memtype.md §5, §7, §9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmmu.config import VMConfig
from kvmmu.era import NEWEST, KernelVersion, era_of
from kvmmu.errors import KvmError
from kvmmu.guest_pt import GuestPageTables
from kvmmu.memtype import (
    CR0_CD,
    MSR_IA32_CR_PAT,
    MSR_MTRR_DEF_TYPE,
    MTRR_DEF_TYPE_E,
    MemType,
    make_pat,
    mtrr_physbase,
    mtrr_physmask,
    pat_entries,
)
from kvmmu.plugin_host import load_plugin_class
from kvmmu.quirks import QUIRKS

if TYPE_CHECKING:
    from kvmmu.vcpu import VCpu
    from kvmmu.vm import VM

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

# Guest-physical layout of a matrix VM. Each guest MTRR type owns a 64 KiB
# region in each slot, covered by one variable MTRR (WB is the default type
# and needs none: 4 types x 2 slots = KVM_NR_VAR_MTRR ranges); each region
# holds one 4 KiB page per guest PAT type. Guest virtual = guest physical.
_REGION = 0x1_0000
_RAM_SLOT, _RAM_HVA, _RAM_SIZE = 0, 0x7F00_0000_0000, 4 << 20
_PT_GPA, _PT_SIZE = 0x10_0000, 0x1_0000
_RAM_TEST_GPA = 0x20_0000
_MMIO_SLOT, _MMIO_HVA, _MMIO_GPA = 1, 0x7E00_0000_0000, 0xC000_0000
_MMIO_SIZE = _REGION * len(MATRIX_MTRR_TYPES)
#: The host BAR: below 4 GiB, mapped UC by the host (the host MTRR type the
#: rows have always assumed for MMIO; spec/memtype.md §7 "MMIO is always UC").
_MMIO_HPA = 0xFE00_0000
_MMIO_HOST_TYPE = MemType.UC
#: The guest PAT MSR: every PAT type in some entry (PA0..PA5; PA6/PA7 keep
#: the reset UC-/UC). SDM Vol 3A §11.12.3, Table 11-11.
_GUEST_PAT = make_pat(MemType.WB, MemType.WC, MemType.UC_MINUS, MemType.UC, MemType.WT, MemType.WP)
_PAT_INDEX = {t: pat_entries(_GUEST_PAT).index(t) for t in MemType}
_MTRR_V = 1 << 11


@dataclass(frozen=True)
class _Cell:
    """One page of a matrix VM: its slot kind, guest PAT type and guest MTRR type."""

    slot: str
    pat: MemType
    mtrr: MemType

    @property
    def gva(self) -> int:
        """Guest virtual = guest physical address of the page."""
        base = _RAM_TEST_GPA if self.slot == "RAM" else _MMIO_GPA
        return base + MATRIX_MTRR_TYPES.index(self.mtrr) * _REGION + _PAT_INDEX[self.pat] * 4096


#: Every cell of a combination, in row order: slot, then guest MTRR, then guest PAT.
_CELLS = tuple(
    _Cell(slot, pat, mtrr)
    for slot in ("RAM", "MMIO")
    for mtrr in MATRIX_MTRR_TYPES
    for pat in MemType
)


def _quirk_sets(era: KernelVersion) -> list[tuple[str, ...]]:
    """Disabled-quirk sets that change memory types in ``era``."""
    names = [n for n in ("cd_nw_cleared", "ignore_guest_pat") if era >= KernelVersion(QUIRKS[n][1])]
    out: list[tuple[str, ...]] = [()]
    out += [(n,) for n in names]
    if len(names) == 2:
        out.append(tuple(names))
    return out


def _matrix_vm(
    vendor: str,
    era: KernelVersion,
    disabled: tuple[str, ...],
    *,
    noncoherent: bool,
    cd: bool,
    host_self_snoop: bool,
    tdp: bool,
) -> tuple[VM, VCpu] | None:
    """A VM set up the way a guest and its VMM would, before its first access.

    Userspace: RAM and BAR memslots, ``KVM_CAP_DISABLE_QUIRKS2`` (the VM
    refuses a quirk set the kernel does not support, with EINVAL), noncoherent
    DMA (a KVM-VFIO device without snoop control, spec/memtype.md §11.1).
    Guest: page tables, ``WRMSR IA32_PAT``, the MTRRs (variable ranges, then
    ``MTRR_DEF_TYPE`` with E set and default type WB), then CR0 (PG, and CD
    as the combination asks). ``None`` when the kernel refuses the quirk set.
    """
    from kvmmu.vm import VM

    config = VMConfig(
        vendor=vendor,
        era=str(era),
        tdp=tdp,
        host_self_snoop=host_self_snoop,
        quirks=dict.fromkeys(disabled, False),
    )
    try:
        vm = VM(config)
    except KvmError:
        return None
    vm.host.mmap_anon(_RAM_HVA, _RAM_SIZE)
    vm.set_user_memory_region(_RAM_SLOT, 0, 0, _RAM_SIZE, _RAM_HVA)
    vm.host.map_mmio(_MMIO_HVA, _MMIO_SIZE, hpa=_MMIO_HPA, memtype=_MMIO_HOST_TYPE)
    vm.set_user_memory_region(_MMIO_SLOT, 0, _MMIO_GPA, _MMIO_SIZE, _MMIO_HVA)
    pt = GuestPageTables(vm, _PT_GPA, _PT_SIZE)
    for c in _CELLS:
        pt.map(c.gva, c.gva, 4096, pat_index=_PAT_INDEX[c.pat])
    vcpu = vm.vcpus[0]
    vcpu.set_msr(MSR_IA32_CR_PAT, _GUEST_PAT)
    addr_mask = (1 << config.host_maxphyaddr) - 1
    n = 0
    for i, mtrr in enumerate(MATRIX_MTRR_TYPES):
        if mtrr is MemType.WB:
            continue
        for base in (_RAM_TEST_GPA, _MMIO_GPA):
            vcpu.set_msr(mtrr_physbase(n), base + i * _REGION | int(mtrr))
            vcpu.set_msr(mtrr_physmask(n), (addr_mask & ~(_REGION - 1)) | _MTRR_V)
            n += 1
    vcpu.set_msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | int(MemType.WB))
    if noncoherent:
        vm.register_noncoherent_dma()
    sregs = pt.long_mode_sregs()
    vcpu.set_sregs(**{**sregs, "cr0": sregs["cr0"] | (CR0_CD if cd else 0)})
    return vm, vcpu


def memtype_matrix(
    vendors: Sequence[str] = ("vmx", "svm"),
    eras: Sequence[str] | None = None,
    *,
    host_self_snoop: bool = True,
    tdp: bool = True,
) -> list[dict[str, Any]]:
    """Compute the memory-type matrix as a list of rows, from real guest reads.

    ``eras`` are any kernel versions (default: each vendor's era boundaries,
    its plugin's ``ERAS``); a row names the era by its first version. Quirk
    sets a kernel refuses (``IGNORE_GUEST_PAT`` without self-snoop on VMX
    6.16+) are left out. Row keys are :data:`MATRIX_KEYS`: ``quirks`` is
    ``"default"`` or the comma-joined disabled quirk names; memory types are
    written ``"UC"``, ``"WC"``, ``"WT"``, ``"WP"``, ``"WB"``, ``"UC-"``;
    ``spte_memtype`` and ``ipat`` are ``None`` for SPTE formats without a
    memtype field (NPT, shadow paging).
    """
    rows: list[dict[str, Any]] = []
    for vendor in vendors:
        cls = load_plugin_class(vendor, "vendor")
        firsts: Sequence[str] = getattr(cls, "ERAS", (str(NEWEST),))
        for version in list(eras) if eras else list(firsts):
            era = KernelVersion(version)
            era_name = era_of(era, firsts)
            for disabled in _quirk_sets(era):
                for noncoh in (False, True):
                    for cd in (False, True):
                        made = _matrix_vm(
                            vendor,
                            era,
                            disabled,
                            noncoherent=noncoh,
                            cd=cd,
                            host_self_snoop=host_self_snoop,
                            tdp=tdp,
                        )
                        if made is None:
                            break
                        vm, vcpu = made
                        head = {
                            "vendor": vendor,
                            "era": era_name,
                            "quirks": ",".join(disabled) or "default",
                            "noncoherent_dma": noncoh,
                            "guest_cr0_cd": cd,
                        }
                        rows += _cells(vm, vcpu, head)
                        vm.destroy()
    return rows


def _cells(vm: VM, vcpu: VCpu, head: dict[str, Any]) -> list[dict[str, Any]]:
    """One guest read per cell; the leaf SPTE and effective type it reached."""
    ept = vm.spte_format.name == "ept"
    out = []
    for c in _CELLS:
        r = vcpu.access(c.gva, "read")
        if r.fault is not None or r.spte is None or r.memtype is None:
            raise RuntimeError(f"matrix read of {c} did not reach memory: {r}")
        spte = r.spte
        out.append(
            {
                **head,
                "slot_kind": c.slot,
                "guest_pat": c.pat.label,
                "guest_mtrr": c.mtrr.label,
                "spte_memtype": MemType((spte >> 3) & 7).label if ept else None,
                "ipat": bool(spte & (1 << 6)) if ept else None,
                "effective": MemType(r.memtype).label,
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
