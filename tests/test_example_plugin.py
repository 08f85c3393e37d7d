"""A third-party plugin installed with pip joins through the same discovery path.

The example under examples/kvmmu-example-tracer is its own distribution.
This test installs it with pip into a throwaway virtual environment layered
on the current one (so kvmmu and its dependencies need not be downloaded),
then checks that ``kvmmu plugins --json`` lists it and that a VM with it
enabled calls its hooks (issue 2 item 6).
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kvmmu-example-tracer"


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    purelib = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    parent = sysconfig.get_paths()["purelib"]
    # Layer the current environment under the throwaway one; its .pth files
    # (the editable kvmmu install) are honoured through site.addsitedir.
    Path(purelib, "zz_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    out = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return py


def test_pip_installed_plugin_is_listed(throwaway: Path) -> None:
    out = subprocess.run(
        [str(throwaway), "-m", "kvmmu", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["tracer"]["kind"] == "consumer"
    assert rows["tracer"]["distribution"] == "kvmmu-example-tracer"
    assert rows["tracer"]["version"] == "0.1.0"
    assert rows["tracer"]["enabled"] is False


def test_vm_with_plugin_enabled_calls_its_hooks(throwaway: Path) -> None:
    script = textwrap.dedent("""
        import json, kvmmu
        vm = kvmmu.VM(kvmmu.VMConfig(plugins={"enabled": ["tracer"],
                                               "tracer": {"max_flushes": 1}}))
        vm.host.mmap_anon(0x7f0000000000, 1 << 21)
        vm.set_user_memory_region(0, 0, 0, 1 << 21, 0x7f0000000000)
        vcpu = vm.vcpus[0]
        vcpu.access(0x1000, "read")
        vm.write_track_add_gfn(1)
        vcpu.access(0x1008, "write", 8, b"\\x11" * 8)
        vm.zap_gfn_range(0, 512)
        print(json.dumps({"report": vm.hooks.report_sections()["tracer"],
                          "violations": vm.check_invariants()}))
    """)
    out = subprocess.run(
        [str(throwaway), "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["report"]["track_writes"] == 1
    assert res["report"]["flushes"] >= 2
    assert any("max_flushes=1" in v for v in res["violations"])
