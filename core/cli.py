"""The ``kvmmu`` command line (click + rich).

Every report command takes ``--json``. Exit codes are fixed (see
``kvmmu --help``): 0 ok, 1 a check failed, 2 usage, 3 config error, 4 plugin
error, 5 internal error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from kvmmu.errors import ConfigError, ExitCode, KvmmuError, PluginError
from kvmmu.report import print_report, run_with_progress
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["cli", "main"]

EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  check failed (a comparison diverged or an invariant broke)
  2  usage error
  3  config or scenario error
  4  plugin error
  5  internal error
"""

console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (no rich markup)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class KvmmuGroup(click.Group):
    """The top-level group; plugin commands are added on first lookup.

    Plugins contribute commands through ``kvmmu_cli_commands``; they are
    imported only when the command list is needed (``--help`` or an unknown
    command name), never for the built-in commands.
    """

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from kvmmu.plugin_host import installed_plugins, load_plugin_class

        for info in installed_plugins():
            try:
                cls = load_plugin_class(info.name)
            except KvmmuError:
                continue  # `kvmmu plugins` reports import failures
            fn = getattr(cls, "kvmmu_cli_commands", None)
            if fn is not None:
                before = dict(self.commands)
                fn(self)
                clash = sorted(n for n, c in before.items() if self.commands.get(n) is not c)
                if clash:
                    # Keep the commands the plugin tried to replace (hookspecs:
                    # "a command name that already exists is a plugin error").
                    self.commands.update({n: before[n] for n in clash})
                    raise PluginError(
                        info.name,
                        "kvmmu_cli_commands",
                        f"adds command(s) {', '.join(clash)}, which already exist",
                    )

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, cmd_name)
        return cmd


@click.group(cls=KvmmuGroup, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="kvmmu")
def cli() -> None:
    """kvmmu: an executable model of the Linux KVM x86 MMU.

    Run scenarios under each vendor and kernel era, compare them, print the
    memory-type matrix, and explore races in the fault path.
    """


def load_vm_config(path: Path) -> Any:
    """``load_config``, with every unknown field told the allowed names."""
    from kvmmu.config import VMConfig, load_config
    from kvmmu.scenario_hints import explain

    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(explain(e.problems, VMConfig), e.source) from None


# --------------------------------------------------------------------------
# kvmmu plugins
# --------------------------------------------------------------------------


@cli.command("plugins", epilog=EXIT_CODES_HELP, short_help="List installed plugins.")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="mark plugins enabled by this config (default: the default config)",
)
def plugins_cmd(as_json: bool, config_path: Path | None) -> None:
    """List installed plugins: name, kind, distribution, version, enabled."""
    from kvmmu.config import VMConfig
    from kvmmu.plugin_host import installed_plugins, load_plugin_class

    cfg = load_vm_config(config_path) if config_path else VMConfig()
    enabled = {cfg.vendor, *cfg.plugins.enabled}
    rows: list[dict[str, Any]] = []
    for p in installed_plugins():
        try:
            cls = load_plugin_class(p.name)
            doc = (cls.__doc__ or "").strip().splitlines()
            description = doc[0] if doc else ""
        except KvmmuError as e:
            description = f"(cannot be imported: {e})"
        rows.append(
            {
                "name": p.name,
                "kind": p.kind,
                "distribution": p.distribution,
                "version": p.version,
                "enabled": p.name in enabled,
                "description": description,
            }
        )
    if as_json:
        emit_json(rows)
        return
    table = Table(title="kvmmu plugins")
    for col in ("name", "kind", "distribution", "version", "enabled", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            r["distribution"],
            r["version"],
            "yes" if r["enabled"] else "no",
            escape(r["description"]),
        )
    console.print(table)


# --------------------------------------------------------------------------
# kvmmu config validate | schema
# --------------------------------------------------------------------------


@cli.group("config", epilog=EXIT_CODES_HELP)
def config_group() -> None:
    """Validate config files and print the config schema."""


@config_group.command("validate", epilog=EXIT_CODES_HELP)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_validate(file: Path) -> None:
    """Validate FILE (a VM config or a scenario); list every problem."""
    try:
        from kvmmu.scenario import is_scenario_file, load_scenario
    except ImportError:  # scenarios are optional for plain VM configs
        is_scenario_file = None  # type: ignore[assignment]
    if is_scenario_file is not None and is_scenario_file(file):
        load_scenario(file)
    else:
        load_vm_config(file)
    click.echo(f"{file}: ok")


@config_group.command("schema", epilog=EXIT_CODES_HELP)
@click.option("--scenario", is_flag=True, help="the schema of a scenario file instead")
def config_schema(scenario: bool) -> None:
    """Print the JSON schema of the config, every plugin section included."""
    if scenario:
        from kvmmu.scenario import scenario_json_schema

        emit_json(scenario_json_schema())
        return
    from kvmmu.schema import config_json_schema

    emit_json(config_json_schema())


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def run_cli(fn: Callable[[], Any]) -> int:
    """Run ``fn`` mapping kvmmu errors to exit codes and messages."""
    try:
        fn()
    except KvmmuError as e:
        # escape: messages quote TOML tables ("[vm]") that are not rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return int(e.exit_code)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 1
    except click.ClickException as e:
        e.show()
        return int(ExitCode.USAGE if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Abort:
        return int(ExitCode.USAGE)
    except Exception as e:  # a bug in the model: say so, with the type
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False
        )
        return int(ExitCode.INTERNAL)
    return int(ExitCode.OK)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    code = run_cli(lambda: cli.main(args=argv, prog_name="kvmmu", standalone_mode=False))
    sys.exit(code)


# --------------------------------------------------------------------------
# kvmmu run | compare
# --------------------------------------------------------------------------


@cli.command(
    "run", epilog=EXIT_CODES_HELP, short_help="Run a scenario (default: the embedded one)."
)
@click.argument("scenario", required=False)
@click.option("--vendor", help="run under this vendor instead of the scenario's")
@click.option("--era", help="kernel version whose behaviour to model, e.g. 6.8")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a [vm] key, e.g. plugins.vmx.pml=true (repeatable; VALUE is TOML)",
)
@click.option("--json", "as_json", is_flag=True, help="print the JSON report")
def run_cmd(
    scenario: str | None,
    vendor: str | None,
    era: str | None,
    settings: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run SCENARIO (a TOML file; default: the embedded default scenario)."""
    from kvmmu.scenario import load_scenario
    from kvmmu.scenario_overrides import apply_settings, parse_setting

    try:
        parsed = dict(parse_setting(t) for t in settings)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    sc = apply_settings(load_scenario(scenario), parsed)
    rep = run_with_progress(sc, vendor, era, quiet=as_json)
    if as_json:
        emit_json(rep)
    else:
        print_report(console, rep)
    if rep["invariants"]["violations"]:
        raise SystemExit(int(ExitCode.CHECK_FAILED))


@cli.command("compare", epilog=EXIT_CODES_HELP)
@click.argument("scenario", required=False)
@click.option("--vendors", default="vmx,svm", show_default=True, help="comma-separated vendors")
@click.option("--eras", default=None, help="comma-separated kernel versions, e.g. 6.10,6.16")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME:KEY=VALUE,...",
    help="also vary the [vm] config: each variant is a run per vendor and era, e.g. "
    "--variant wp: --variant pml:plugins.vmx.pml=true (repeatable; 'NAME:' alone = as written)",
)
@click.option("--expect-equal", is_flag=True, help="exit 1 when the runs differ")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="draw a PNG")
def compare_cmd(
    scenario: str | None,
    vendors: str,
    eras: str | None,
    variants: tuple[str, ...],
    expect_equal: bool,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Run SCENARIO per vendor, era and variant and show what differs.

    SCENARIO is a TOML file; without one, the embedded default scenario.
    """
    from kvmmu.compare import compare_runs, plot_comparison
    from kvmmu.scenario import load_scenario
    from kvmmu.scenario_overrides import apply_settings, parse_variant

    sc = load_scenario(scenario)
    vendor_list = [v.strip() for v in vendors.split(",") if v.strip()]
    era_list = [e.strip() for e in eras.split(",")] if eras else [None]
    if not vendor_list:
        raise click.UsageError("--vendors needs at least one vendor")
    try:
        parsed = [parse_variant(t) for t in variants]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--variant") from None
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"variant names must differ, got {names}", param_hint="--variant")
    # every variant is validated before anything runs
    scs: list[tuple[str | None, Any]] = [
        (p.name, apply_settings(sc, p.settings, f"--variant {p.name}")) for p in parsed
    ] or [(None, sc)]
    runs = []
    for vendor in vendor_list:
        for era in era_list:
            for name, vsc in scs:
                rep = run_with_progress(vsc, vendor, era, quiet=as_json)
                if name is not None:
                    rep["variant"] = name
                runs.append(rep)
    result = compare_runs(runs)
    if plot:
        plot_comparison(result, plot)
    if as_json:
        emit_json(result)
    else:
        t = Table(title=f"{escape(sc.name)}: differences between runs")
        t.add_column("metric", overflow="fold")  # dotted names are one word: fold, never cut
        for label in result["runs"]:
            t.add_column(label)
        for row in result["differences"]:
            cells = [
                "—" if lb in row["absent"] else escape(str(row["values"][lb]))
                for lb in result["runs"]
            ]
            t.add_row(escape(row["metric"]), *cells)
        console.print(t)
        console.print(
            f"{len(result['differences'])} metrics differ, {result['equal_metrics']} equal"
        )
    if expect_equal and result["differences"]:
        raise SystemExit(int(ExitCode.CHECK_FAILED))


# --------------------------------------------------------------------------
# kvmmu memtype
# --------------------------------------------------------------------------


@cli.command("memtype", epilog=EXIT_CODES_HELP)
@click.option(
    "--vendor", "vendors", multiple=True, help="vmx or svm (repeat for both; default both)"
)
@click.option(
    "--era", "eras", multiple=True, help="kernel version(s), e.g. 6.8 (default: every era)"
)
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="draw heatmaps per vendor and era to this PNG",
)
def memtype_cmd(
    vendors: tuple[str, ...], eras: tuple[str, ...], as_json: bool, plot: Path | None
) -> None:
    """The memory-type matrix: SPTE memtype, IPAT and effective type.

    Rows cover (vendor, era, quirks, noncoherent DMA, guest CR0.CD, slot kind,
    guest PAT type, guest MTRR type); each row is one guest read through a
    real VM of that vendor and era (spec/memtype.md §5, §7, §9).
    """
    from kvmmu.era import NEWEST, era_of
    from kvmmu.memtype_matrix import MATRIX_KEYS, memtype_matrix, plot_matrix
    from kvmmu.plugin_host import load_plugin_class

    vendors = vendors or ("vmx", "svm")
    problems = []
    for vendor in vendors:
        firsts = getattr(load_plugin_class(vendor, "vendor"), "ERAS", (str(NEWEST),))
        for era in eras:
            try:
                era_of(era, firsts)
            except ValueError as e:
                problems.append((f"--era {era}", str(e)))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    rows = memtype_matrix(vendors, list(eras) or None)
    if plot:
        plot_matrix(rows, plot)
    if as_json:
        emit_json(rows)
        return
    t = Table(title=f"memory types ({len(rows)} rows)")
    keys = MATRIX_KEYS
    for k in keys:
        t.add_column(k)
    for r in rows:
        t.add_row(*["-" if r[k] is None else str(r[k]) for k in keys])
    console.print(t)


# --------------------------------------------------------------------------
# kvmmu explore
# --------------------------------------------------------------------------


@cli.command("explore", epilog=EXIT_CODES_HELP)
@click.argument("scenario", required=False)
@click.option("--variant", help="the scenario's variant, e.g. buggy or fixed (default: fixed)")
@click.option("--list", "list_", is_flag=True, help="list the built-in race scenarios")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def explore_cmd(scenario: str | None, variant: str | None, list_: bool, as_json: bool) -> None:
    """Run every interleaving of a race scenario (NAME or a TOML FILE).

    Operations (vCPU faults, guest page-table writes, host invalidations,
    zaps) yield where the kernel takes or drops a lock or re-checks; every
    schedule is run from a fresh VM, states already seen are pruned, and the
    shortest failing schedule is printed. Exit 1 when a schedule violates an
    invariant.
    """
    from kvmmu.explore import explore
    from kvmmu.explore_scenarios import BUILTIN_SCENARIOS

    if list_ or scenario is None:
        if as_json:
            emit_json(BUILTIN_SCENARIOS)
            return
        t = Table(title="built-in race scenarios")
        for col in ("name", "variants", "description"):
            t.add_column(col)
        for name, info in BUILTIN_SCENARIOS.items():
            t.add_row(name, ", ".join(info["variants"]), escape(str(info["description"])))
        console.print(t)
        if scenario is None and not list_:
            raise click.UsageError("give a scenario NAME or FILE (see the list above)")
        return
    try:
        res = explore(scenario, variant)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        emit_json(res)
    else:
        console.print(
            f"[bold]{res['scenario']}[/] ({res['variant']}): {res['schedules']} "
            f"schedules, {res['nodes']} nodes, {res['pruned']} pruned, "
            f"{res['seconds']:.2f} s"
        )
        if not res["violations"]:
            console.print("[green]no schedule violates an invariant[/]")
        for i, v in enumerate(res["violations"][:1]):
            console.print(
                f"[red]violation[/] (shortest of {len(res['violations'])}, "
                f"{len(v['schedule'])} steps):"
            )
            for n, step in enumerate(v["schedule"], 1):
                console.print(f"  {n:2}. {escape(str(step))}")
            for m in v["messages"]:
                console.print(f"  [red]- {escape(str(m))}[/]")
            del i
    if res["violations"]:
        raise SystemExit(int(ExitCode.CHECK_FAILED))
