"""Run a scenario: build the VM, run its workload, and report.

The report (``kvmmu run --json``) has at its top level: scenario, vendor, era
(the first version of the vendor's era), tdp, seed, steps, accesses,
guest_faults, faults (``RET_PF_*`` counts by outcome), emulated_writes,
mmio_exits, memtypes (effective types seen, per memslot), invariants
{checked, violations}, plugins (a section per enabled plugin) and stats (the
VM's raw counters). docs/scenarios.md documents every key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from kvmmu.era import era_of, report_eras
from kvmmu.errors import ConfigError
from kvmmu.guest_pt import GuestPageTables
from kvmmu.hooks import scenario_devices, scenario_op
from kvmmu.scenario import (
    AccessStep,
    Cr0Step,
    DeviceStep,
    DirtyLogStep,
    GenerateStep,
    InvalidateStep,
    MemslotStep,
    MsrStep,
    PreFaultStep,
    PteWriteStep,
    Scenario,
    SimpleStep,
    TrackStep,
    ZapStep,
    count_outcomes,
    flags_value,
    guard,
    source_of,
    step_rng,
)
from kvmmu.vm import VM

__all__ = ["ScenarioRun", "run_scenario"]

_MTRR_TYPES = {"UC": 0, "WC": 1, "WT": 4, "WP": 5, "WB": 6}


class ScenarioRun:
    """A scenario being run on one VM; ``report()`` summarises it."""

    def __init__(self, sc: Scenario, *, vendor: str | None = None, era: str | None = None) -> None:
        self.sc = sc
        self.source = source_of(sc)
        cfg = guard(self.source, "vm", sc.vm_config, vendor=vendor, era=era)
        self.vm = guard(self.source, "vm", VM, cfg)
        self.pt: GuestPageTables | None = None
        self.results: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.checked = 0
        #: KVM_GET_DIRTY_LOG steps run and the dirty pages they returned.
        self.dirty_harvests = 0
        self.dirty_pages = 0
        self.steps = 0
        self._build()

    # set-up -----------------------------------------------------------------
    def _build(self) -> None:
        sc, vm, src = self.sc, self.vm, self.source
        for i, v in enumerate(sc.host.vmas):
            guard(
                src,
                f"host.vmas.{i}",
                vm.host.mmap_anon,
                v.hva,
                v.size,
                page_level=v.page_level,
                writable=v.writable,
            )
        from kvmmu.memtype import MemType

        for i, bar in enumerate(sc.host.mmio):
            mt = MemType.UC_MINUS if bar.memtype == "UC-" else MemType[bar.memtype]
            guard(
                src, f"host.mmio.{i}", vm.host.map_mmio, bar.hva, bar.size, hpa=bar.hpa, memtype=mt
            )
        for i, s in enumerate(sc.memslots):
            guard(
                src,
                f"memslots.{i}",
                vm.set_user_memory_region,
                s.slot,
                flags_value(s.flags),
                s.gpa,
                s.size,
                s.hva,
            )
        g = sc.guest
        for vcpu in vm.vcpus:
            if g.pat is not None:
                guard(src, "guest.pat", vcpu.set_msr, 0x277, g.pat)
            if g.mtrr is not None:
                self._set_mtrrs(vcpu, g)
        if g.paging != "off":
            levels = 5 if g.paging == "long5" else 4
            self.pt = guard(
                src,
                "guest.tables_gpa",
                GuestPageTables,
                vm,
                g.tables_gpa,
                g.tables_size,
                levels=levels,
            )
            # The tables are identity-mapped so the guest can rewrite them.
            guard(
                src,
                "guest.tables_gpa",
                self.pt.map,
                g.tables_gpa,
                g.tables_gpa,
                g.tables_size,
                user=False,
            )
            for i, m in enumerate(g.mappings):
                guard(
                    src,
                    f"guest.mappings.{i}",
                    self.pt.map,
                    m.gva,
                    m.gpa,
                    m.size,
                    page_size=m.page_size,
                    writable=m.writable,
                    user=m.user,
                    nx=m.nx,
                    pat_index=m.pat_index,
                )
            for i in g.vcpus if g.vcpus is not None else range(len(vm.vcpus)):
                if not 0 <= i < len(vm.vcpus):
                    raise ConfigError(
                        [("guest.vcpus", f"no vCPU {i}; the VM has {len(vm.vcpus)}")], src
                    )
                vm.vcpus[i].set_sregs(**self.pt.long_mode_sregs(), cpl=g.cpl)
        elif g.mappings:
            raise ConfigError([("guest.mappings", "mappings need paging = long4 or long5")], src)
        self._check_devices()

    def _set_mtrrs(self, vcpu: Any, g: Any) -> None:
        m = g.mtrr
        for n, var in enumerate(m.variable):
            loc = f"guest.mtrr.variable.{n}"
            if var.size & (var.size - 1) or var.base & (var.size - 1) or var.size < 4096:
                raise ConfigError(
                    [(loc, "size must be a power of two >= 4K and base aligned to it")], self.source
                )
            mask = ((1 << self.vm.config.host_maxphyaddr) - 1) & ~(var.size - 1)
            guard(self.source, loc, vcpu.set_msr, 0x200 + 2 * n, var.base | _MTRR_TYPES[var.type])
            guard(self.source, loc, vcpu.set_msr, 0x201 + 2 * n, mask | (1 << 11))
        value = _MTRR_TYPES[m.default] | ((1 << 11) if m.enabled else 0)
        guard(self.source, "guest.mtrr", vcpu.set_msr, 0x2FF, value)

    def _check_devices(self) -> None:
        devices = scenario_devices(self.vm.hooks)
        problems = []
        for i, step in enumerate(self.sc.workload):
            if isinstance(step, DeviceStep) and step.device not in devices:
                allowed = ", ".join(sorted(devices)) or "none (no consumer plugin made devices)"
                problems.append(
                    (f"workload.{i}.device", f"no device {step.device!r}; devices: {allowed}")
                )
            if hasattr(step, "vcpu") and step.vcpu >= len(self.vm.vcpus):
                problems.append(
                    (f"workload.{i}.vcpu", f"no vCPU {step.vcpu}; the VM has {len(self.vm.vcpus)}")
                )
        if problems:
            raise ConfigError(problems, self.source)

    # running ----------------------------------------------------------------
    def total_steps(self) -> int:
        n = 0
        for s in self.sc.workload:
            n += s.repeat * (s.count if isinstance(s, GenerateStep) else 1)
        return n

    def run(self, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        every = self.sc.check_invariants_every
        for i, step in enumerate(self.sc.workload):
            for _ in range(step.repeat):
                done = self._run_step(i, step)
                self.steps += 1
                if progress:
                    progress(done)
                if every and self.steps % every == 0:
                    self._check()
        self._check()
        return self.report()

    def _check(self) -> None:
        self.checked += 1
        for v in self.vm.check_invariants():
            if v not in self.violations:
                self.violations.append(v)

    def _access(self, vcpu_i: int, gva: int, kind: str, size: int, data: bytes | None) -> None:
        self.vm.vcpus[vcpu_i].access(gva, kind, size, data)

    def _run_step(self, index: int, step: Any) -> int:
        vm = self.vm
        if isinstance(step, AccessStep):
            data = None
            if step.kind == "write":
                value = step.data if step.data is not None else index
                data = (value & ((1 << (8 * step.size)) - 1)).to_bytes(step.size, "little")
            self._access(step.vcpu, step.gva, step.kind, step.size, data)
            return 1
        if isinstance(step, GenerateStep):
            rng = step_rng(self.sc, index, step.seed)
            for n in range(step.count):
                if step.pattern == "random":
                    off = rng.randrange(0, max(1, step.span - step.size + 1))
                    off -= off % step.size
                elif step.pattern == "strided":
                    off = (n * step.stride) % max(1, step.span)
                else:
                    off = (n * step.size) % max(1, step.span)
                kind = step.kind if step.kind != "mixed" else rng.choice(["read", "write"])
                data = rng.randbytes(step.size) if kind == "write" else None
                self._access(step.vcpu, step.start + off, kind, step.size, data)
            return step.count
        if isinstance(step, PteWriteStep):
            self._pte_write(index, step)
        elif isinstance(step, MemslotStep):
            vm.set_user_memory_region(
                step.slot, flags_value(step.flags), step.gpa, step.size, step.hva
            )
        elif isinstance(step, ZapStep):
            vm.zap_gfn_range(step.start, step.end)
        elif isinstance(step, InvalidateStep):
            vm.invalidate_hva_range(step.hva, step.hva + step.size)
        elif isinstance(step, PreFaultStep):
            vm.pre_fault_memory(step.gpa, step.size)
        elif isinstance(step, TrackStep):
            (vm.write_track_add_gfn if step.action == "add" else vm.write_track_remove_gfn)(
                step.gfn
            )
        elif isinstance(step, DirtyLogStep):
            self.dirty_harvests += 1
            self.dirty_pages += len(vm.get_dirty_log(step.slot))
        elif isinstance(step, MsrStep):
            vm.vcpus[step.vcpu].set_msr(step.index, step.value)
        elif isinstance(step, Cr0Step):
            vm.vcpus[step.vcpu].set_sregs(cr0=step.value)
        elif isinstance(step, DeviceStep):
            args = dict(step.model_extra or {})
            res = scenario_op(vm.hooks, step.device, step.action, args)
            if res is not None:
                self.results.append({"step": index, **res})
        elif isinstance(step, SimpleStep):
            if step.op == "zap_all_fast":
                vm.zap_all_fast()
            elif step.op == "check_invariants":
                self._check()
            elif step.op == "register_noncoherent_dma":
                vm.register_noncoherent_dma()
            else:
                vm.unregister_noncoherent_dma()
        return 1

    def _pte_write(self, index: int, step: PteWriteStep) -> None:
        if self.pt is None:
            raise ConfigError(
                [(f"workload.{index}", "guest_pte_write needs guest paging")], self.source
            )
        addr = self.pt.entry_address(step.gva, 1, create=False)
        old = int.from_bytes(self.vm.read_guest(addr, 8), "little")
        gpa = step.gpa if step.gpa is not None else old & 0x000F_FFFF_FFFF_F000
        new = self.pt.leaf_value(gpa, 1, writable=step.writable) if step.present else 0
        data = new.to_bytes(8, "little")[: step.width]
        self.vm.vcpus[step.vcpu].access(addr, "write", step.width, data)
        if step.width == 4:  # the guest completes the entry with a second half-write
            self.vm.vcpus[step.vcpu].access(addr + 4, "write", 4, new.to_bytes(8, "little")[4:])

    def memtype_tables(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """Effective types and SPTE memtype bits seen, per memslot (every access)."""
        eff: dict[str, Counter[str]] = {}
        bits: dict[str, Counter[str]] = {}
        ept = self.vm.spte_format.name == "ept"
        for (slot, memtype, mt_bits), n in self.vm.memtypes_seen.items():
            key = f"slot{slot}" if slot is not None else "no-slot"
            eff.setdefault(key, Counter())[_label(memtype)] += n
            bits.setdefault(key, Counter())[_spte_mt(mt_bits) if ept else "none"] += n
        return (
            {k: dict(sorted(v.items())) for k, v in sorted(eff.items())},
            {k: dict(sorted(v.items())) for k, v in sorted(bits.items())},
        )

    # reporting --------------------------------------------------------------
    def era_name(self) -> str:
        """The first version of the era the kernel falls in, by the vendor's
        and the core's boundaries (:func:`kvmmu.era.report_eras`)."""
        vendor = self.vm.plugin(self.vm.config.vendor)
        eras = getattr(vendor, "ERAS", None)
        return era_of(self.vm.era, report_eras(eras)) if eras else str(self.vm.era)

    def report(self) -> dict[str, Any]:
        vm = self.vm
        st = vm.stats
        memtypes, spte_memtypes = self.memtype_tables()
        return {
            "scenario": self.sc.name,
            "vendor": vm.config.vendor,
            "era": self.era_name(),
            "kernel": str(vm.era),
            "tdp": vm.config.tdp,
            "seed": self.sc.seed,
            "steps": self.steps,
            "accesses": int(st.get("accesses", 0) + st.get("emulated_accesses", 0)),
            "guest_faults": int(st.get("guest_page_faults", 0)),
            "faults": count_outcomes(st),
            "emulated_writes": int(st.get("emulated_writes", 0)),
            "mmio_exits": int(st.get("mmio_exits", 0) + st.get("mmio_reads", 0)),
            "track_writes": vm.page_track.writes,
            "remote_tlb_flushes": int(st.get("remote_tlb_flush", 0)),
            "dirty_log": {
                "harvests": self.dirty_harvests,
                "pages": self.dirty_pages,
                "pml_logged": int(st.get("pml_logged", 0)),
                "pml_full_exits": int(st.get("pml_full_exits", 0)),
            },
            "memtypes": memtypes,
            "spte_memtypes": spte_memtypes,
            "invariants": {"checked": self.checked, "violations": list(self.violations)},
            "device_results": self.results,
            "plugins": vm.hooks.report_sections(),
            "stats": {k: int(v) for k, v in sorted(st.items())},
        }


def _spte_mt(bits: int) -> str:
    """EPT memtype bits 5:3 and IPAT bit 6 as ``"WB|IPAT"`` (spec/kvm-mmu.md §4.1)."""
    names = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}
    mt = (bits >> 3) & 7
    return names.get(mt, str(mt)) + ("|IPAT" if bits & (1 << 6) else "")


def _label(mt: Any) -> str:
    return str(getattr(mt, "label", None) or getattr(mt, "name", mt))


def run_scenario(
    sc: Scenario,
    *,
    vendor: str | None = None,
    era: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build and run ``sc`` (optionally under another vendor or era)."""
    return ScenarioRun(sc, vendor=vendor, era=era).run(progress)
