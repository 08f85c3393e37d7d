"""The command line: plugins, config validate/schema, exit codes (issue 2 item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from kvmmu.cli import cli, run_cli


def _run(*args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmmu", *args], capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_help_documents_exit_codes() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    for line in ("0  ok", "1  check failed", "2  usage", "3  config", "4  plugin", "5  internal"):
        assert line in out


def test_plugins_json_lists_builtins_with_fields() -> None:
    res = CliRunner().invoke(cli, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["vmx"]["kind"] == "vendor" and rows["vmx"]["enabled"] is True
    assert rows["kvmgt"]["kind"] == "consumer" and rows["kvmgt"]["enabled"] is False
    for r in rows.values():
        assert set(r) == {"name", "kind", "distribution", "version", "enabled", "description"}
        assert r["description"] and not r["description"].startswith("(cannot")


def test_config_validate_ok_and_error_exit_3(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('vendor = "vmx"\n')
    assert _run("config", "validate", str(good))[0] == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('vendor = "vmx"\nbogus = 1\n[plugins]\nenabled = ["nosuch"]\n')
    code, out = _run("config", "validate", str(bad))
    assert code == 3
    assert "bogus" in out and "nosuch" in out and str(bad) in out


def test_config_schema_includes_plugin_sections() -> None:
    res = CliRunner().invoke(cli, ["config", "schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    props = schema["$defs"]["PluginsConfig"]["properties"]
    assert {"vmx", "svm", "kvmgt", "virtio_gpu", "iommu"} <= set(props)
    assert "x-unloadable-plugins" not in schema


def test_usage_error_exit_2() -> None:
    assert _run("no-such-command")[0] == 2


def test_internal_error_exit_5() -> None:
    def boom() -> None:
        raise RuntimeError("bug")

    assert run_cli(boom) == 5


def test_memtype_json_rows_have_documented_keys() -> None:
    res = CliRunner().invoke(cli, ["memtype", "--vendor", "vmx", "--era", "6.8", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    keys = {
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
    }
    assert rows and all(set(r) == keys for r in rows)
    assert {r["era"] for r in rows} == {"6.7"}  # 6.8 falls in the era that starts at 6.7
    mmio = [r for r in rows if r["slot_kind"] == "MMIO"]
    # MMIO is always UC without IPAT: guest WC stays WC, anything else is UC (memtype.md §5, §7).
    assert all(r["spte_memtype"] == "UC" and r["ipat"] is False for r in mmio)
    assert {r["effective"] for r in mmio if r["guest_pat"] == "WC"} == {"WC"}


def test_memtype_plot_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    res = CliRunner().invoke(
        cli, ["memtype", "--vendor", "svm", "--era", "6.16", "--plot", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explore_race_2010_buggy_exit_1_fixed_exit_0() -> None:
    buggy = CliRunner().invoke(cli, ["explore", "race-2010", "--variant", "buggy", "--json"])
    assert buggy.exit_code == 1
    res = json.loads(buggy.output)
    assert res["schedules"] >= 1 and res["violations"]
    assert all("schedule" in v for v in res["violations"])
    fixed = CliRunner().invoke(cli, ["explore", "race-2010", "--variant", "fixed", "--json"])
    assert fixed.exit_code == 0
    assert json.loads(fixed.output)["violations"] == []


def test_explore_unknown_scenario_is_usage_error() -> None:
    assert _run("explore", "no-such-race")[0] == 2
