"""Config validation: every error reported together, naming plugin and field."""

from __future__ import annotations

from pathlib import Path

import kvmmu
import pytest
from kvmmu.config import parse_config
from kvmmu.errors import ConfigError, KvmError


def _problems(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return ei.value.problems


def test_defaults_are_vmx_tdp_newest() -> None:
    cfg = kvmmu.VMConfig()
    assert (cfg.vendor, cfg.tdp, cfg.era) == ("vmx", True, "6.16")


def test_unknown_field_is_named() -> None:
    probs = _problems({"vendr": "vmx"})
    assert ("vendr", "unknown field") in probs


def test_unknown_plugin_lists_installed() -> None:
    probs = _problems({"plugins": {"enabled": ["kvmgtt"]}})
    loc, msg = probs[0]
    assert loc == "plugins.enabled.0" and "kvmgtt" in msg and "kvmgt" in msg


def test_two_vendors_refused() -> None:
    probs = _problems({"vendor": "vmx", "plugins": {"enabled": ["svm"]}})
    assert any("exactly one vendor" in m for _, m in probs)


def test_no_vendor_refused() -> None:
    probs = _problems({"vendor": ""})
    assert any(loc == "vendor" and "exactly one" in m for loc, m in probs)


def test_vendor_that_is_a_consumer_refused() -> None:
    probs = _problems({"vendor": "kvmgt"})
    assert any(loc == "vendor" and "consumer" in m for loc, m in probs)


def test_section_for_plugin_not_enabled_is_an_error() -> None:
    probs = _problems({"plugins": {"iommu": {}}})
    assert any(loc == "plugins.iommu" and "not enabled" in m for loc, m in probs)


def test_section_for_uninstalled_plugin_lists_installed() -> None:
    probs = _problems({"plugins": {"nosuch": {}}})
    assert any(loc == "plugins.nosuch" and "vmx" in m for loc, m in probs)


def test_all_errors_reported_together() -> None:
    probs = _problems({"era": "six", "plugins": {"enabled": ["nosuch"], "iommu": {}}})
    locs = {loc for loc, _ in probs}
    assert {"era", "plugins.enabled.0", "plugins.iommu"} <= locs


def test_plugin_section_fields_validated_with_plugin_name() -> None:
    probs = _problems({"vendor": "vmx", "plugins": {"vmx": {"no_such_option": 1}}})
    assert ("plugins.vmx.no_such_option", "unknown field") in probs


def test_unknown_quirk_lists_allowed() -> None:
    probs = _problems({"quirks": {"cd_nw_clear": False}})
    assert any("cd_nw_cleared" in m for _, m in probs)


def test_disabling_ignore_guest_pat_without_self_snoop_refused() -> None:
    cfg = kvmmu.VMConfig(era="6.16", host_self_snoop=False, quirks={"ignore_guest_pat": False})
    with pytest.raises(KvmError) as ei:
        kvmmu.VM(cfg)
    assert ei.value.errno == 22 and "self-snoop" in str(ei.value)


def test_load_config_toml(tmp_path: Path) -> None:
    p = tmp_path / "vm.toml"
    p.write_text('vendor = "svm"\nera = "6.8"\n[quirks]\ncd_nw_cleared = false\n')
    cfg = kvmmu.load_config(p)
    assert cfg.vendor == "svm" and cfg.quirks == {"cd_nw_cleared": False}


def test_load_config_bad_toml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("vendor = \n")
    with pytest.raises(ConfigError) as ei:
        kvmmu.load_config(p)
    assert str(p) in str(ei.value)


def test_unknown_vendor_lists_vendors_and_unknown_consumer_lists_consumers() -> None:
    """A misspelt vendor is answered with the vendors one may name, a misspelt
    consumer with the consumers: not every installed plugin of either kind."""
    probs = dict(_problems({"vendor": "vmz", "plugins": {"enabled": ["kvmgtt"]}}))
    vendor_msg = probs["vendor"]
    assert "unknown vendor 'vmz'" in vendor_msg
    assert "svm" in vendor_msg and "vmx" in vendor_msg and "kvmgt" not in vendor_msg
    consumer_msg = probs["plugins.enabled.0"]
    assert "unknown plugin 'kvmgtt'" in consumer_msg
    assert "kvmgt" in consumer_msg and "iommu" in consumer_msg and "vmx" not in consumer_msg


def test_validator_messages_have_no_pydantic_prefix() -> None:
    """A validator's own message reaches the user as written."""
    probs = dict(_problems({"vendor": "vmx", "era": "zz"}))
    assert probs["era"].startswith("not a kernel version: 'zz'")
