"""The distribution builds, installs from any directory, and stays lint/type clean.

Issue 2 items 1 and 8: a wheel build works and carries both import trees
(core/ as ``kvmmu``, plugins/ as ``kvmmu.plugins``), the embedded scenario and
the entry points; ``ruff`` and ``mypy`` (through tools/typecheck.py, which
gives mypy the import layout) report nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_build_contains_core_plugins_scenarios_and_entry_points(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("kvmmu-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "kvmmu/__init__.py",
        "kvmmu/vm.py",
        "kvmmu/mmu/tdp.py",
        "kvmmu/plugins/vmx/__init__.py",
        "kvmmu/plugins/kvmgt/__init__.py",
        "kvmmu/scenarios/default.toml",
        "kvmmu/py.typed",
    ):
        assert required in names, required
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[kvmmu.vendors]" in text and "[kvmmu.consumers]" in text
    # leftovers of the in-tree build must not linger
    shutil.rmtree(ROOT / "build", ignore_errors=True)


def test_import_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import kvmmu, kvmmu.plugins.svm; "
            "print(kvmmu.VM(kvmmu.VMConfig(vendor='svm')).spte_format.name)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "npt"


CODE_DIRS = ("core", "plugins", "tests", "benchmarks", "examples", "tools")


def _tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_ruff_clean() -> None:
    out = _tool("-m", "ruff", "check", *CODE_DIRS)
    assert out.returncode == 0, out.stdout


def test_ruff_format_clean() -> None:
    out = _tool("-m", "ruff", "format", "--check", *CODE_DIRS)
    assert out.returncode == 0, out.stdout


def test_mypy_clean() -> None:
    out = _tool(str(ROOT / "tools" / "typecheck.py"), timeout=900)
    assert out.returncode == 0, out.stdout[-4000:]
