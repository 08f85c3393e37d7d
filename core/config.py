"""VM configuration: pydantic models and TOML loading.

The config names the vendor, the kernel era, the quirks userspace disabled,
and the consumer plugins with their sections::

    vendor = "vmx"
    era = "6.8"
    tdp = true

    [quirks]
    cd_nw_cleared = false        # KVM_CAP_DISABLE_QUIRKS2 with that bit

    [plugins]
    enabled = ["kvmgt", "iommu"] # consumers; the vendor is `vendor`

    [plugins.kvmgt]              # a section per enabled plugin (or the vendor)
    ...

Every model forbids unknown fields. Plugin sections are validated against
each plugin's own model by :mod:`kvmmu.plugin_host` right after loading,
and every problem is reported at once (:class:`kvmmu.errors.ConfigError`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from kvmmu.era import NEWEST, KernelVersion
from kvmmu.errors import ConfigError
from kvmmu.quirks import QUIRKS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["PluginsConfig", "VMConfig", "load_config", "parse_config", "validation_problems"]


class PluginsConfig(BaseModel):
    """``[plugins]``: the enabled consumers and one section per plugin.

    Sections are extra keys (``[plugins.kvmgt]``); the plugin host checks
    that each names an installed, enabled plugin and validates it against
    that plugin's model.
    """

    model_config = ConfigDict(extra="allow")

    enabled: list[str] = Field(default_factory=list, description="consumer plugins, in order")

    def sections(self) -> dict[str, dict[str, Any]]:
        """Return the per-plugin sections, by plugin name."""
        extra = self.model_extra or {}
        return {str(k): (v if isinstance(v, dict) else {"<value>": v}) for k, v in extra.items()}


class VMConfig(BaseModel):
    """The configuration of one VM (``kvmmu.VM(config)``)."""

    model_config = ConfigDict(extra="forbid")

    vendor: str = Field("vmx", description="the vendor plugin: 'vmx', 'svm' or a third-party one")
    tdp: bool = Field(True, description="EPT/NPT on (TDP MMU) or off (shadow paging)")
    era: str = Field(str(NEWEST), description="kernel version whose behaviour to model, e.g. '6.8'")
    quirks: dict[str, bool] = Field(
        default_factory=dict,
        description="KVM_X86_QUIRK_* by lower-case name; false disables (KVM_CAP_DISABLE_QUIRKS2)",
    )
    vcpus: int = Field(1, ge=0, le=1024, description="number of vCPUs")
    nx_huge_pages: bool = Field(False, description="the nx_huge_pages (iTLB multihit) mitigation")
    eager_page_split: bool = Field(True, description="eager_page_split module parameter")
    host_maxphyaddr: int = Field(46, ge=36, le=52, description="host physical address width")
    host_self_snoop: bool = Field(True, description="host CPU has X86_FEATURE_SELFSNOOP")
    mmu_notifier_retry_check: bool = Field(
        True,
        description="mmu_invalidate_retry_gfn in the fault path; false models the bug it prevents",
    )
    gpte_recheck: str = Field(
        "fixed",
        description="shadow FNAME(fetch) re-check: 'fixed' (every level, 2010 fix) or 'level1'",
    )
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)

    @field_validator("era")
    @classmethod
    def _era_is_a_version(cls, v: str) -> str:
        KernelVersion(v)  # raises ValueError with the allowed form
        return v

    @field_validator("quirks")
    @classmethod
    def _known_quirks(cls, v: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(v) - set(QUIRKS))
        if unknown:
            raise ValueError(f"unknown quirk(s) {unknown}; allowed: {sorted(QUIRKS)}")
        return v

    @field_validator("gpte_recheck")
    @classmethod
    def _recheck(cls, v: str) -> str:
        if v not in ("fixed", "level1"):
            raise ValueError("must be 'fixed' or 'level1'")
        return v


def validation_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Turn a pydantic error into ``(dotted.path, message)`` pairs."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            # our validators' own words, without pydantic's "Value error, " prefix
            msg = str(e.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        out.append((loc, msg))
    return out


def parse_config(data: dict[str, Any], source: str | None = None) -> VMConfig:
    """Validate a config mapping, plugin sections included; raise ConfigError.

    All problems (the VM's fields and every plugin section) are collected
    and reported together.
    """
    from kvmmu.plugin_host import validate_plugin_sections

    problems: list[tuple[str, str]] = []
    cfg: VMConfig | None = None
    try:
        cfg = VMConfig.model_validate(data)
    except ValidationError as e:
        problems.extend(validation_problems(e))
    vendor = cfg.vendor if cfg else data.get("vendor", "vmx")
    raw_plugins = cfg.plugins if cfg else data.get("plugins", {})
    try:
        plugins = (
            raw_plugins
            if isinstance(raw_plugins, PluginsConfig)
            else PluginsConfig.model_validate(raw_plugins)
        )
    except ValidationError:
        plugins = None  # already reported above
    if plugins is not None and isinstance(vendor, str):
        problems.extend(validate_plugin_sections(vendor, plugins))
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


def load_config(path: str | Path) -> VMConfig:
    """Load and validate a TOML config file (``kvmmu.load_config``)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError([("", "file not found")], str(p)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"not valid TOML: {e}")], str(p)) from None
    return parse_config(data, str(p))
