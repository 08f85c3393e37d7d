"""VM-config overrides from the command line: ``run --set`` and ``compare --variant``.

A setting is ``KEY=VALUE``: ``KEY`` a dotted path into the scenario's ``[vm]``
table (``nx_huge_pages``, ``quirks.slot_zap_all``, ``plugins.vmx.pml``),
``VALUE`` a TOML value (``true``, ``6``, ``"6.8"``, ``["kvmgt"]``; a bare word
that is not valid TOML is taken as a string). A variant is ``NAME:`` followed
by comma-separated settings (``pml:plugins.vmx.pml=true``); ``NAME:`` alone is
the scenario as written. The overridden scenario is validated whole, so a bad
key or value is reported like a mistake in the file, under ``vm.<key>``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

from kvmmu.errors import ConfigError
from kvmmu.scenario import Scenario, deep_merge, parse_scenario, source_of

__all__ = ["Variant", "apply_settings", "parse_setting", "parse_variant"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# split "a=1,b=[1,2],c=x" before each "<key>=" only, so TOML arrays keep their commas
_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_.]*\s*=)")


@dataclass
class Variant:
    """A named set of VM-config settings (one ``--variant``)."""

    name: str
    settings: dict[str, Any]


def parse_setting(text: str) -> tuple[str, Any]:
    """``"plugins.vmx.pml=true"`` -> ``("plugins.vmx.pml", True)``; ValueError if malformed."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not _KEY.match(key):
        raise ValueError(
            f"{text!r} is not KEY=VALUE with a dotted key into [vm] "
            '(e.g. nx_huge_pages=true, plugins.vmx.pml=true, era="6.8")'
        )
    if not raw:
        raise ValueError(f"{text!r} has no value after '='")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key, value


def parse_variant(text: str) -> Variant:
    """``"pml:plugins.vmx.pml=true,eager_page_split=false"`` -> a :class:`Variant`."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise ValueError(
            f"{text!r} is not NAME:KEY=VALUE[,KEY=VALUE...] (NAME: letters, digits, "
            "'_', '-', '.'; 'NAME:' alone is the scenario as written)"
        )
    settings: dict[str, Any] = {}
    for part in _SPLIT.split(rest) if rest.strip() else []:
        key, value = parse_setting(part)
        settings[key] = value
    return Variant(name, settings)


def _nest(settings: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r} goes through a value that is not a table")
        node[last] = value
    return out


def apply_settings(sc: Scenario, settings: dict[str, Any], what: str = "--set") -> Scenario:
    """``sc`` with ``settings`` merged over its ``[vm]`` table, validated whole.

    ``vendor`` and ``era`` may be set too; a bad key or value raises
    :class:`ConfigError` naming ``what`` and the ``vm.<key>`` path.
    """
    if not settings:
        return sc
    source = source_of(sc)
    try:
        over = _nest(settings)
    except ValueError as e:
        raise ConfigError([(what, str(e))], source) from None
    data = sc.model_dump(exclude_unset=True)
    data["vm"] = deep_merge(dict(sc.vm), over)
    try:
        out = parse_scenario(data, source)
    except ConfigError as e:
        raise ConfigError([(f"{what}: {loc}", m) for loc, m in e.problems], source) from None
    out.__dict__["_source"] = source
    return out
