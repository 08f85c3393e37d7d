"""Scenarios: the format, errors, determinism, goldens and the CLI (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kvmmu.cli import cli
from kvmmu.errors import ConfigError
from kvmmu.runner import ScenarioRun, run_scenario
from kvmmu.scenario import load_scenario, scenario_json_schema

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "examples" / "scenarios" / "small.toml"
GOLDEN = Path(__file__).resolve().parent / "golden"
#: KVMMU_REGEN_GOLDEN=1 python -m pytest tests/test_scenario.py rewrites the goldens.
REGEN = os.environ.get("KVMMU_REGEN_GOLDEN") == "1"


def _kvmmu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmmu", *args], capture_output=True, text=True, timeout=600
    )


def test_default_scenario_runs_every_builtin_plugin_without_violations() -> None:
    rep = run_scenario(load_scenario(None))
    assert rep["invariants"]["violations"] == []
    assert rep["invariants"]["checked"] >= 2
    assert set(rep["plugins"]) >= {"vmx", "kvmgt", "virtio_gpu", "iommu"}
    assert rep["faults"]["FIXED"] > 1000 and rep["faults"]["EMULATE"] > 0
    assert rep["emulated_writes"] > 0
    kvmgt = rep["plugins"]["kvmgt"]["vgpus"][0]
    assert kvmgt["stats"]["workloads"] == 2 and kvmgt["stats"]["post_shadow_flushed"] >= 1
    iommu = rep["plugins"]["iommu"]
    assert iommu["mode"] == "shared" and iommu["io_page_faults"] > 0
    assert iommu["iotlb"]["invalidations"] > 0
    assert {"slot0", "slot16"} <= set(rep["memtypes"])


def test_json_top_level_keys_documented() -> None:
    res = CliRunner().invoke(cli, ["run", str(SMALL), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    for key in ("vendor", "era", "tdp", "faults", "emulated_writes", "invariants", "plugins"):
        assert key in rep
    assert set(rep["invariants"]) == {"checked", "violations"}
    assert set(rep["faults"]) == {"FIXED", "SPURIOUS", "EMULATE", "RETRY", "INVALID"}


def test_same_seed_same_result() -> None:
    sc = load_scenario(SMALL)
    assert run_scenario(sc) == run_scenario(sc)


def test_different_seed_changes_random_accesses() -> None:
    a = load_scenario(SMALL)
    b = a.model_copy(update={"seed": a.seed + 1})
    b.__dict__["_source"] = "copy"
    ra, rb = run_scenario(a), run_scenario(b)
    assert ra["stats"] != rb["stats"]


@pytest.mark.parametrize("vendor", ["vmx", "svm"])
def test_golden_report_small(vendor: str) -> None:
    rep = run_scenario(load_scenario(SMALL), vendor=vendor)
    path = GOLDEN / f"small-{vendor}.json"
    if REGEN:
        path.write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    golden = json.loads(path.read_text())
    assert rep == golden, f"report differs from {path}; KVMMU_REGEN_GOLDEN=1 to accept"


def test_small_memtypes_differ_by_vendor() -> None:
    """Guest WC over a WC BAR: EPT UC (MMIO, no IPAT) keeps WC; NPT keeps it too."""
    vmx = run_scenario(load_scenario(SMALL), vendor="vmx")
    svm = run_scenario(load_scenario(SMALL), vendor="svm")
    assert vmx["spte_memtypes"]["slot1"] == {"UC": 2}
    assert svm["spte_memtypes"]["slot1"] == {"none": 2}
    assert vmx["memtypes"]["slot1"] == {"WC": 2} == svm["memtypes"]["slot1"]
    assert vmx["memtypes"]["slot0"] == {"WB": vmx["memtypes"]["slot0"]["WB"]}


def _bad(tmp_path: Path, text: str) -> tuple[int, str]:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    out = _kvmmu("run", str(p))
    return out.returncode, out.stdout + out.stderr


BASE = """name = "t"
[[host.vmas]]
hva = 0x700000000000
size = "2M"
[[memslots]]
gpa = 0
size = "2M"
hva = 0x700000000000
"""


def test_unknown_field_exit_3_names_file_and_path(tmp_path: Path) -> None:
    code, out = _bad(tmp_path, BASE + '[[workload]]\nop = "access"\ngva = 0\nbogus = 1\n')
    assert code == 3
    assert "bad.toml" in out and "workload.0.access.bogus" in out


def test_bad_address_exit_3_nothing_run(tmp_path: Path) -> None:
    code, out = _bad(tmp_path, BASE.replace("gpa = 0\n", "gpa = 0x1001\n"))
    assert code == 3 and "memslots.0" in out and "EINVAL" in out


def test_unknown_device_exit_3_lists_devices(tmp_path: Path) -> None:
    text = BASE.replace('name = "t"', 'name = "t"\n[vm.plugins]\nenabled = ["kvmgt"]')
    text += '[[workload]]\nop = "device"\ndevice = "gpu7"\naction = "submit"\n'
    code, out = _bad(tmp_path, text)
    assert code == 3 and "workload.0.device" in out and "gpu0" in out


def test_scenario_error_runs_nothing(tmp_path: Path) -> None:
    """A bad step later in the workload is refused before the first step runs."""
    p = tmp_path / "s.toml"
    p.write_text(
        BASE + '[[workload]]\nop = "access"\ngva = 0\n'
        '[[workload]]\nop = "device"\ndevice = "nope"\naction = "x"\n'
    )
    sc = load_scenario(p)
    with pytest.raises(ConfigError) as ei:
        ScenarioRun(sc)
    assert ei.value.problems[0][0] == "workload.1.device"


def test_unknown_op_lists_allowed(tmp_path: Path) -> None:
    code, out = _bad(tmp_path, BASE + '[[workload]]\nop = "teleport"\n')
    assert code == 3 and "access" in out and "generate" in out


def test_schema_covers_steps_and_vm() -> None:
    schema = scenario_json_schema()
    assert "VMConfig" in schema["$defs"]
    text = json.dumps(schema)
    for op in (
        "access",
        "generate",
        "guest_pte_write",
        "memslot",
        "zap",
        "invalidate",
        "pre_fault",
        "write_track",
        "device",
    ):
        assert f'"{op}"' in text


def test_guest_pte_write_step_removes_mapping(tmp_path: Path) -> None:
    p = tmp_path / "pte.toml"
    p.write_text(
        BASE + '[guest]\npaging = "long4"\n[[guest.mappings]]\ngva = 0x1000\n'
        "gpa = 0x1000\nsize = 0x1000\n"
        '[[workload]]\nop = "access"\ngva = 0x1000\n'
        '[[workload]]\nop = "guest_pte_write"\ngva = 0x1000\npresent = false\n'
        '[[workload]]\nop = "access"\ngva = 0x1000\n'
    )
    rep = run_scenario(load_scenario(p))
    assert rep["guest_faults"] == 1
    assert rep["invariants"]["violations"] == []


def test_compare_expect_equal_exit_1_on_difference() -> None:
    out = _kvmmu("compare", str(SMALL), "--vendors", "vmx,svm", "--expect-equal", "--json")
    assert out.returncode == 1
    res = json.loads(out.stdout)
    metrics = {d["metric"] for d in res["differences"]}
    assert "spte_memtypes.slot1" in metrics
    # a vendor's own report section is absent from the other vendor's run,
    # which is not the same as a metric whose value is None
    absent = {d["metric"]: d["absent"] for d in res["differences"]}
    assert absent["plugins.vmx.spte_format"] == ["svm@6.16"]
    assert absent["plugins.svm.spte_format"] == ["vmx@6.16"]
    assert absent["spte_memtypes.slot1"] == []


def test_compare_same_vendor_is_equal(tmp_path: Path) -> None:
    out = _kvmmu(
        "compare",
        str(SMALL),
        "--vendors",
        "vmx",
        "--eras",
        "6.16,6.17",
        "--expect-equal",
        "--plot",
        str(tmp_path / "c.png"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_eras_shows_memtype_change() -> None:
    """6.9 (the 6.8 era: VMX's 6.7 memtype row, the core's REGION2) vs 6.16."""
    out = _kvmmu("compare", str(SMALL), "--vendors", "vmx", "--eras", "6.9,6.16", "--json")
    res = json.loads(out.stdout)
    assert res["runs"] == ["vmx@6.8", "vmx@6.16"]


def test_docs_schema_files_are_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/*.schema.json are what `kvmmu config schema [--scenario]` prints.

    Only kvmmu's own plugins count: a user who installed a third-party plugin
    (docs/plugins.md, "Try it") gets its section too, and the docs need not.
    """
    import kvmmu.plugin_host as plugin_host
    from kvmmu.schema import config_json_schema

    own = [p for p in plugin_host.installed_plugins() if p.distribution == "kvmmu"]
    monkeypatch.setattr(plugin_host, "installed_plugins", lambda: own)
    docs = ROOT / "docs"
    assert json.loads((docs / "scenario.schema.json").read_text()) == scenario_json_schema()
    assert json.loads((docs / "config.schema.json").read_text()) == config_json_schema()


def test_compare_virtio_gpu_shows_hazard_table_per_vendor_and_design() -> None:
    """Issue 10 item 4: `kvmmu compare` on the virtio-gpu scenario, vmx vs svm."""
    out = _kvmmu(
        "compare",
        str(ROOT / "examples" / "scenarios" / "virtio-gpu.toml"),
        "--vendors",
        "vmx,svm",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["runs"] == ["vmx@6.16", "svm@6.16"]
    rows = {lb: r["plugins"]["virtio_gpu"]["hazard_table"] for lb, r in res["reports"].items()}
    for lb, table in rows.items():
        assert {r["design"] for r in table} == {
            "today",
            "kvm_mem_dma",
            "kvm_mem_wc",
            "virtio_noncoherent",
        }, lb
    diffs = {d["metric"]: d["values"] for d in res["differences"]}
    # Today's KVM on VMX forces WB|IPAT under a guest WC mapping (H1); SVM keeps WC.
    wc_today = diffs["plugins.virtio_gpu.hazard_table[today,WC].effective"]
    assert wc_today == {"vmx@6.16": "WB", "svm@6.16": "WC"}
    # The KVM_MEM_WC design gives WC on VMX whatever the guest asks.
    vmx_wc = [r for r in rows["vmx@6.16"] if r["design"] == "kvm_mem_wc"]
    assert {r["effective"] for r in vmx_wc} == {"WC"}
