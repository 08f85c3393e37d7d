"""Run mypy on the kvmmu package as it is laid out in this repository.

setuptools maps ``core/`` to ``kvmmu`` and ``plugins/`` to ``kvmmu.plugins``;
mypy cannot follow the editable-install finder, so this builds a tree of
symlinks (``.typecheck/kvmmu``) with the import layout and runs mypy there,
with the settings in pyproject.toml. Usage: ``python tools/typecheck.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree() -> Path:
    tree = ROOT / ".typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    pkg = tree / "kvmmu"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "core").iterdir():
        if entry.name in ("__pycache__", "plugins"):
            continue
        os.symlink(entry, pkg / entry.name)
    os.symlink(ROOT / "plugins", pkg / "plugins")
    return tree


def main() -> int:
    tree = build_tree()
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "-p",
        "kvmmu",
        *sys.argv[1:],
    ]
    env = {**os.environ, "MYPYPATH": str(tree)}
    return subprocess.call(cmd, cwd=tree, env=env)


if __name__ == "__main__":
    sys.exit(main())
