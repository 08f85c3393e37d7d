"""The code a new user copies out of the docs runs as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / doc).read_text(), re.S)


def test_architecture_python_api_example_runs() -> None:
    (code,) = [b for b in _blocks("architecture.md", "python") if "GuestPageTables" in b]
    exec(compile(code, "docs/architecture.md", "exec"), {})


def test_plugins_scenario_config_puts_the_vm_under_vm() -> None:
    (toml,) = [b for b in _blocks("plugins.md", "toml") if "enabled" in b]
    data = tomllib.loads(toml)
    assert data["vm"]["plugins"] == {"enabled": ["tracer"], "tracer": {"max_flushes": 100}}
    assert "name" in data
