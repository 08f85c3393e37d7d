"""Scenarios: a VM, its memory, guest state and a workload, in one TOML file.

The format is documented in docs/scenarios.md (with its JSON schema from
:func:`scenario_json_schema`). Loading validates everything (pydantic
models, then a dry build of the VM and a check that every device a step
names exists) before any workload step runs: a bad scenario is refused
whole with the file, the field path and what is allowed (exit code 3).
"""

from __future__ import annotations

import random
import re
import tomllib
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from kvmmu.config import VMConfig, parse_config, validation_problems
from kvmmu.errors import ConfigError, KvmError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "DEFAULT_SCENARIO",
    "Scenario",
    "deep_merge",
    "is_scenario_file",
    "load_scenario",
    "parse_scenario",
    "scenario_json_schema",
]

DEFAULT_SCENARIO = "default"
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F_]+|\d[\d_]*)\s*([KMGT]?)i?B?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_int(v: Any) -> int:
    """An integer, or a string such as ``"0x1000"``, ``"64M"`` or ``"2G"``."""
    if isinstance(v, bool):
        raise ValueError("expected an integer or a size such as '64M'")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m:
            return int(m.group(1).replace("_", ""), 0) * _UNITS[m.group(2).upper()]
    raise ValueError(f"expected an integer or a size such as '64M' or '0x1000', got {v!r}")


Int = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ints(*names: str) -> Any:
    return field_validator(*names, mode="before")(lambda cls, v: parse_int(v))


class VmaSpec(_Model):
    """An anonymous host mapping (``mmap``) with its host page size."""

    hva: int
    size: int
    page_level: Literal[1, 2, 3] = 1
    writable: bool = True
    _p = _ints("hva", "size")


class MmioSpec(_Model):
    """A device BAR in the host's address space: no RAM, a host memory type."""

    hva: int
    size: int
    hpa: int
    memtype: Literal["UC", "WC", "WT", "WP", "WB", "UC-"] = "UC"
    _p = _ints("hva", "size", "hpa")


class HostSpec(_Model):
    vmas: list[VmaSpec] = Field(default_factory=list)
    mmio: list[MmioSpec] = Field(default_factory=list)


class MemslotSpec(_Model):
    """One ``KVM_SET_USER_MEMORY_REGION`` call made before the workload."""

    slot: int = 0
    gpa: int
    size: int
    hva: int
    flags: list[Literal["LOG_DIRTY_PAGES", "READONLY"]] = Field(default_factory=list)
    _p = _ints("gpa", "size", "hva")


class MappingSpec(_Model):
    """A guest virtual range the guest page tables map."""

    gva: int
    gpa: int
    size: int
    page_size: int = 4096
    writable: bool = True
    user: bool = True
    nx: bool = False
    pat_index: int = Field(0, ge=0, le=7, description="PAT/PCD/PWT index of the leaves")
    _p = _ints("gva", "gpa", "size", "page_size")


class VarMtrrSpec(_Model):
    base: int
    size: int
    type: Literal["UC", "WC", "WT", "WP", "WB"]
    _p = _ints("base", "size")


class MtrrSpec(_Model):
    enabled: bool = True
    default: Literal["UC", "WC", "WT", "WP", "WB"] = "WB"
    variable: list[VarMtrrSpec] = Field(default_factory=list, max_length=8)


class GuestSpec(_Model):
    """The guest's paging mode, its page tables, PAT and MTRRs."""

    paging: Literal["long4", "long5", "off"] = "long4"
    vcpus: list[int] | None = Field(
        None, description="vCPUs that load these tables (default: all; the others keep paging off)"
    )
    tables_gpa: int = 0x10_0000
    tables_size: int = 0x10_0000
    cpl: Literal[0, 3] = 0
    pat: int | None = None
    mtrr: MtrrSpec | None = None
    mappings: list[MappingSpec] = Field(default_factory=list)
    _p = _ints("tables_gpa", "tables_size")


class _Step(_Model):
    repeat: int = Field(1, ge=1, le=1_000_000)


class AccessStep(_Step):
    op: Literal["access"]
    vcpu: int = 0
    gva: int
    kind: Literal["read", "write", "fetch"] = "read"
    size: int = Field(8, ge=1, le=4096)
    data: int | None = None
    _p = _ints("gva")


class GenerateStep(_Step):
    """Many accesses: ``sequential``, ``strided`` or ``random`` over a range."""

    op: Literal["generate"]
    pattern: Literal["sequential", "strided", "random"]
    vcpu: int = 0
    start: int
    span: int
    count: int = Field(ge=1, le=10_000_000)
    stride: int = 4096
    kind: Literal["read", "write", "fetch", "mixed"] = "read"
    size: int = Field(8, ge=1, le=4096)
    seed: int | None = None
    _p = _ints("start", "span", "stride")


class PteWriteStep(_Step):
    """The guest rewrites the leaf entry of ``gva`` through a vCPU write."""

    op: Literal["guest_pte_write"]
    vcpu: int = 0
    gva: int
    gpa: int | None = None
    present: bool = True
    writable: bool = True
    width: Literal[4, 8] = 8
    _p = _ints("gva")


class MemslotStep(_Step):
    op: Literal["memslot"]
    slot: int
    gpa: int
    size: int
    hva: int
    flags: list[Literal["LOG_DIRTY_PAGES", "READONLY"]] = Field(default_factory=list)
    _p = _ints("gpa", "size", "hva")


class ZapStep(_Step):
    op: Literal["zap"]
    start: int
    end: int
    _p = _ints("start", "end")


class SimpleStep(_Step):
    op: Literal[
        "zap_all_fast", "check_invariants", "register_noncoherent_dma", "unregister_noncoherent_dma"
    ]


class InvalidateStep(_Step):
    op: Literal["invalidate"]
    hva: int
    size: int
    _p = _ints("hva", "size")


class PreFaultStep(_Step):
    op: Literal["pre_fault"]
    gpa: int
    size: int
    _p = _ints("gpa", "size")


class TrackStep(_Step):
    op: Literal["write_track"]
    gfn: int
    action: Literal["add", "remove"] = "add"
    _p = _ints("gfn")


class DirtyLogStep(_Step):
    op: Literal["dirty_log"]
    slot: int


class MsrStep(_Step):
    op: Literal["set_msr"]
    vcpu: int = 0
    index: int
    value: int
    _p = _ints("index", "value")


class Cr0Step(_Step):
    op: Literal["set_cr0"]
    vcpu: int = 0
    value: int
    _p = _ints("value")


class DeviceStep(_Step):
    """A step a consumer plugin runs on one of its devices."""

    model_config = ConfigDict(extra="allow")
    op: Literal["device"]
    device: str
    action: str


Step = Annotated[
    AccessStep
    | GenerateStep
    | PteWriteStep
    | MemslotStep
    | ZapStep
    | SimpleStep
    | InvalidateStep
    | PreFaultStep
    | TrackStep
    | DirtyLogStep
    | MsrStep
    | Cr0Step
    | DeviceStep,
    Field(discriminator="op"),
]


class Scenario(_Model):
    """A whole scenario file."""

    name: str
    description: str = ""
    seed: int = 0
    check_invariants_every: int = Field(
        1, ge=0, description="check invariants after every N steps (0: only at the end)"
    )
    vm: dict[str, Any] = Field(default_factory=dict, description="a VM config (VMConfig)")
    vendor_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per vendor, VM config keys merged over `vm` when run under that vendor "
        "(e.g. an IOMMU mode only one vendor supports)",
    )
    host: HostSpec = Field(default_factory=HostSpec)
    memslots: list[MemslotSpec] = Field(default_factory=list)
    guest: GuestSpec = Field(default_factory=GuestSpec)
    workload: list[Step] = Field(default_factory=list)

    def vm_config(self, **overrides: Any) -> VMConfig:
        """The VM config, under ``vendor``/``era`` overrides when given."""
        data = {**self.vm, **{k: v for k, v in overrides.items() if v is not None}}
        vendor = data.get("vendor", "vmx")
        return parse_config(deep_merge(data, self.vendor_overrides.get(vendor, {})))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, tables key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def scenario_json_schema() -> dict[str, Any]:
    """The JSON schema of a scenario file (``vm`` is a :class:`VMConfig`)."""
    schema = Scenario.model_json_schema()
    schema["properties"]["vm"] = {"$ref": "#/$defs/VMConfig"}
    vm_schema = VMConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs.update(vm_schema.pop("$defs", {}))
    defs["VMConfig"] = vm_schema
    return schema


def parse_scenario(data: dict[str, Any], source: str) -> Scenario:
    """Validate a scenario mapping; every problem names the field path.

    An unknown field is reported with the closest allowed name and the full
    list (:mod:`kvmmu.scenario_hints`); a VM config given where a scenario is
    expected is told apart from a scenario with typos.
    """
    from kvmmu.scenario_hints import explain

    if "name" not in data and "vm" not in data and set(data) & set(VMConfig.model_fields):
        raise ConfigError(
            [
                (
                    "",
                    "this is a VM config, not a scenario: a scenario has `name`, the VM "
                    "config under [vm], [[memslots]] and [[workload]] (docs/scenarios.md); "
                    "`kvmmu config validate` checks a VM config",
                )
            ],
            source,
        )
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(validation_problems(e), Scenario), source) from None
    for vendor in [None, *sc.vendor_overrides]:
        try:
            sc.vm_config(vendor=vendor)
        except ConfigError as e:
            where = "vm" if vendor is None else f"vendor_overrides.{vendor}"
            problems = [(f"{where}.{loc}" if loc else where, m) for loc, m in e.problems]
            raise ConfigError(explain(problems, Scenario), source) from None
    return sc


def is_scenario_file(path: Path) -> bool:
    """A TOML file with a ``workload`` or ``name`` key is a scenario."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return "workload" in data or "name" in data


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load a scenario file, or the embedded default when ``path`` is None."""
    if path is None or str(path) == DEFAULT_SCENARIO:
        text = resources.files("kvmmu.scenarios").joinpath("default.toml").read_text()
        source = "<embedded default scenario>"
    else:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError([("", f"cannot read scenario: {e.strerror}")], source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"not valid TOML: {e}")], source) from None
    sc = parse_scenario(data, source)
    sc.__dict__["_source"] = source
    return sc


def source_of(sc: Scenario) -> str:
    return str(sc.__dict__.get("_source", sc.name))


def step_rng(sc: Scenario, index: int, seed: int | None) -> random.Random:
    """The generator of one step: the step's seed, else the scenario seed and index."""
    return random.Random(seed if seed is not None else (sc.seed << 20) + index)


def flags_value(names: Sequence[str]) -> int:
    from kvmmu import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

    table = {"LOG_DIRTY_PAGES": KVM_MEM_LOG_DIRTY_PAGES, "READONLY": KVM_MEM_READONLY}
    out = 0
    for n in names:
        out |= table[n]
    return out


def count_outcomes(stats: Counter[str]) -> dict[str, int]:
    """``RET_PF_*`` outcome counts from the VM's stats."""
    names = ("FIXED", "SPURIOUS", "EMULATE", "RETRY", "INVALID")
    return {n: int(stats.get(f"ret_pf.{n}", 0)) for n in names}


def guard(source: str, loc: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run a set-up action; turn a model error into a scenario error at ``loc``."""
    try:
        return fn(*args, **kw)
    except (KvmError, ValueError, KeyError) as e:
        raise ConfigError([(loc, str(e))], source) from None
