"""`kvmmu run --set` and `kvmmu compare --variant` (docs/scenarios.md, "Config variants")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from kvmmu.cli import cli
from kvmmu.errors import ConfigError
from kvmmu.runner import run_scenario
from kvmmu.scenario import load_scenario
from kvmmu.scenario_overrides import apply_settings, parse_setting, parse_variant

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scenarios"
DIRTY = str(EXAMPLES / "dirty-log.toml")
SMALL = str(EXAMPLES / "small.toml")


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("nx_huge_pages=true", "nx_huge_pages", True),
        ("vcpus = 2", "vcpus", 2),
        ('era="6.8"', "era", "6.8"),
        ("era=6.8", "era", 6.8),  # TOML: a float; the config then refuses it
        ("vendor=svm", "vendor", "svm"),  # a bare word is a string
        ('plugins.enabled=["kvmgt", "iommu"]', "plugins.enabled", ["kvmgt", "iommu"]),
        ("quirks.slot_zap_all=false", "quirks.slot_zap_all", False),
    ],
)
def test_parse_setting_values_are_toml(text: str, key: str, value: object) -> None:
    assert parse_setting(text) == (key, value)


@pytest.mark.parametrize("text", ["nx_huge_pages", "=1", "a..b=1", "1x=2", "vcpus="])
def test_parse_setting_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match=r"KEY=VALUE|no value"):
        parse_setting(text)


def test_parse_variant_splits_settings_but_not_arrays() -> None:
    v = parse_variant('gpu:plugins.enabled=["kvmgt","iommu"], nx_huge_pages=true,vcpus=2')
    assert v.name == "gpu"
    assert v.settings == {
        "plugins.enabled": ["kvmgt", "iommu"],
        "nx_huge_pages": True,
        "vcpus": 2,
    }
    assert parse_variant("as-written:").settings == {}


@pytest.mark.parametrize("text", ["nocolon", ":x=1", "bad name:x=1", "ok:x"])
def test_parse_variant_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_variant(text)


def test_apply_settings_validates_whole_and_leaves_the_original_alone() -> None:
    sc = load_scenario(DIRTY)
    pml = apply_settings(sc, {"plugins.vmx.pml": True})
    assert pml.vm["plugins"]["vmx"]["pml"] is True
    assert "plugins" not in sc.vm
    with pytest.raises(ConfigError) as ei:
        apply_settings(sc, {"nx_huge_page": True}, "--variant nx")
    msg = str(ei.value)
    assert "--variant nx: vm.nx_huge_page" in msg and "nx_huge_pages" in msg


def test_set_turns_pml_on_for_one_run() -> None:
    sc = load_scenario(DIRTY)
    wp = run_scenario(sc)
    pml = run_scenario(apply_settings(sc, {"plugins.vmx.pml": True}))
    assert wp["dirty_log"] == {"harvests": 2, "pages": 512, "pml_logged": 0, "pml_full_exits": 0}
    assert pml["dirty_log"]["pml_logged"] == 512 and pml["dirty_log"]["pages"] == 512
    assert (wp["faults"]["FIXED"], pml["faults"]["FIXED"]) == (768, 256)


def test_cli_run_set_and_compare_variants() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["run", DIRTY, "--set", "plugins.vmx.pml=true", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["dirty_log"]["pml_logged"] == 512
    args = ["compare", DIRTY, "--vendors", "vmx", "--variant", "wp:"]
    out = runner.invoke(cli, [*args, "--variant", "pml:plugins.vmx.pml=true", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["runs"] == ["vmx@6.16+wp", "vmx@6.16+pml"]
    diffs = {d["metric"]: d["values"] for d in res["differences"]}
    assert diffs["faults.FIXED"] == {"vmx@6.16+wp": 768, "vmx@6.16+pml": 256}
    assert "variant" not in diffs


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--variant", "oops"], 2, "NAME:KEY=VALUE"),
        (["--variant", "a:", "--variant", "a:vcpus=2"], 2, "must differ"),
        (["--variant", "x:nx_huge_page=true"], 3, "--variant x: vm.nx_huge_page"),
        (["--vendors", "svm", "--variant", "pml:plugins.vmx.pml=true"], 3, "plugins.vmx"),
    ],
)
def test_cli_compare_variant_errors(
    args: list[str], code: int, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmmu.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["compare", SMALL, *args])
    assert ei.value.code == code
    cap = capsys.readouterr()
    assert text in " ".join((cap.err + cap.out).split())


def test_cli_run_set_malformed_is_a_usage_error() -> None:
    out = CliRunner().invoke(cli, ["run", SMALL, "--set", "vcpus"])
    assert out.exit_code == 2 and "KEY=VALUE" in out.output
