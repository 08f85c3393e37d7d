"""What a new user hit on first contact with the CLI (review of README and docs).

Each test pins one message or exit code that was wrong: unknown fields that
did not say what is allowed, a VM config passed to ``kvmmu run``, rich
swallowing ``[...]`` in messages and metric names, ``kvmmu memtype --era``
with a bad version ending as an internal error, and a plugin command that
silently replaced a built-in one.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import kvmmu.cli as cli_mod
import kvmmu.plugin_host as plugin_host
import pytest
from click.testing import CliRunner
from kvmmu.cli import KvmmuGroup, cli, run_cli
from kvmmu.errors import ConfigError, PluginError
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
SMALL = REPO / "examples" / "scenarios" / "small.toml"


def _invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``kvmmu ARGS`` as the console script does; exit code and all output."""
    code = run_cli(lambda: cli.main(args=list(args), prog_name="kvmmu", standalone_mode=False))
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())  # undo rich's line wrapping


def _problems(path: Path) -> str:
    from kvmmu.scenario import load_scenario

    with pytest.raises(ConfigError) as ei:
        load_scenario(path)
    return str(ei.value)


def test_unknown_scenario_field_names_the_closest_and_the_allowed(tmp_path: Path) -> None:
    f = tmp_path / "typo.toml"
    f.write_text(SMALL.read_text().replace("check_invariants_every", "check_invariant_every"))
    msg = _problems(f)
    assert "check_invariant_every: unknown field; did you mean 'check_invariants_every'?" in msg
    assert "allowed: check_invariants_every, description, guest, host" in msg


def test_unknown_field_in_a_step_names_that_steps_fields(tmp_path: Path) -> None:
    f = tmp_path / "typo.toml"
    f.write_text(SMALL.read_text().replace('pattern = "random"', 'patern = "random"'))
    msg = _problems(f)
    assert "workload.0.generate.patern: unknown field; did you mean 'pattern'?" in msg
    assert "allowed: count, kind, op, pattern, repeat" in msg


def test_unknown_field_in_vm_and_vendor_overrides(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "x"\n[vm]\nvendr = "vmx"\n[vendor_overrides.svm]\nnx_huge_page = true\n')
    msg = _problems(f)
    assert "vm.vendr: unknown field; did you mean 'vendor'? allowed: eager_page_split" in msg
    f.write_text('name = "x"\n[vendor_overrides.svm]\nnx_huge_page = true\n')
    msg = _problems(f)
    assert "vendor_overrides.svm.nx_huge_page: unknown field; did you mean 'nx_huge_pages'?" in msg


def test_unknown_field_in_a_plugin_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('vendor = "vmx"\n[plugins]\nenabled = ["kvmgt"]\n[plugins.kvmgt]\nbogus = 1\n')
    code, out = _invoke(capsys, "config", "validate", str(f))
    assert code == 3
    assert "plugins.kvmgt.bogus: unknown field;" in out
    assert "allowed: " in out and "max_shadow_pages" in out


def test_unknown_field_without_a_close_name_still_lists_the_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('vendor = "vmx"\nzzzzzz = 1\n')
    code, out = _invoke(capsys, "config", "validate", str(f))
    assert code == 3
    assert "zzzzzz: unknown field; allowed: eager_page_split, era" in out


def test_run_on_a_vm_config_says_it_is_not_a_scenario(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('vendor = "vmx"\n[plugins]\nenabled = []\n')
    msg = _problems(f)
    assert "this is a VM config, not a scenario" in msg
    assert "[vm]" in msg and "[[workload]]" in msg
    assert "name: Field required" not in msg


def test_error_messages_keep_square_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> None:
        raise ConfigError([("x", "put it under [vm] or [[workload]]")], "f.toml")

    assert run_cli(fail) == 3
    assert "put it under [vm] or [[workload]]" in capsys.readouterr().err


def test_compare_shows_whole_metric_names(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(cli_mod, "console", Console(file=buf, width=300))
    scenario = REPO / "examples" / "scenarios" / "virtio-gpu.toml"
    res = CliRunner().invoke(cli, ["compare", str(scenario), "--vendors", "vmx,svm"])
    assert res.exit_code == 0, res.output
    out = buf.getvalue()
    assert "plugins.virtio_gpu.hazard_table[today,WB].cause" in out
    assert "hazard_table.cause" not in out


def test_compare_folds_long_metric_names(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(cli_mod, "console", Console(file=buf, width=80))
    scenario = REPO / "examples" / "scenarios" / "virtio-gpu.toml"
    res = CliRunner().invoke(cli, ["compare", str(scenario), "--vendors", "vmx,svm"])
    assert res.exit_code == 0, res.output
    metric_cells = [line.split("│")[1] for line in buf.getvalue().splitlines() if "│" in line]
    assert not any("…" in cell for cell in metric_cells)


@pytest.mark.parametrize(
    ("era", "expect"),
    [("zz", "not a kernel version: 'zz'"), ("1.0", "older than the oldest era")],
)
def test_memtype_bad_era_is_a_config_error(
    era: str, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _invoke(capsys, "memtype", "--vendor", "vmx", "--era", era)
    assert code == 3, out
    assert "--era" in out and expect in out


def test_plugin_command_may_not_replace_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    class Evil:
        @staticmethod
        def kvmmu_cli_commands(group: click.Group) -> None:
            @group.command("run")
            def run() -> None:
                """Not the real run."""

    monkeypatch.setattr(plugin_host, "installed_plugins", lambda: [SimpleNamespace(name="evil")])
    monkeypatch.setattr(plugin_host, "load_plugin_class", lambda name, kind=None: Evil)
    group = KvmmuGroup(commands=dict(cli.commands))
    builtin_run: Any = cli.commands["run"]
    with pytest.raises(PluginError, match=r"'evil' in hook kvmmu_cli_commands.*run"):
        group.list_commands(click.Context(group))
    assert group.commands["run"] is builtin_run


def test_help_lists_every_command_uncut_and_subcommands_document_exit_codes() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    commands = out.split("Commands:")[1].split("Exit codes:")[0]
    assert "run " in commands and "..." not in commands
    for sub in (["config", "validate"], ["config", "schema"], ["compare"]):
        text = CliRunner().invoke(cli, [*sub, "--help"]).output
        assert "3  config or scenario error" in text, sub
    assert "embedded default" in CliRunner().invoke(cli, ["compare", "--help"]).output
