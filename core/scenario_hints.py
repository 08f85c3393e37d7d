"""Say what is allowed where a scenario or VM config has an unknown field.

pydantic reports a misspelt key only as ``extra_forbidden`` ("unknown
field"), which leaves the user to guess the right name. :func:`explain`
walks the problem's dotted location through the models (scenario, VM
config, a plugin's config section) and adds the closest allowed name and
the full list: ``check_invariant_every: unknown field; did you mean
'check_invariants_every'? allowed: ...``.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

__all__ = ["allowed_fields", "explain"]

UNKNOWN = "unknown field"


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _model_field(model: type[BaseModel], key: str) -> Any:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f.annotation
    return None


def _step(ann: Any, key: str) -> Any:
    """The annotation one location part below ``ann``, or None when unknown."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _step(typing.get_args(ann)[0], key)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(members) == 1:
            return _step(members[0], key)
        # A discriminated union: pydantic puts the tag in the location.
        for m in members:
            if isinstance(m, type) and issubclass(m, BaseModel):
                tag = _model_field(m, "op")
                if tag is not None and key in typing.get_args(tag):
                    return m
        return None
    if origin in (list, tuple, set, frozenset) and key.isdigit():
        return typing.get_args(ann)[0]
    if origin is dict:
        return typing.get_args(ann)[1]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return _model_field(ann, key)
    return None


def _plugin_model(name: str) -> type[BaseModel] | None:
    from kvmmu.errors import KvmmuError
    from kvmmu.plugin_host import load_plugin_class, plugin_config_model

    try:
        return plugin_config_model(load_plugin_class(name))
    except KvmmuError:
        return None


def allowed_fields(root: type[BaseModel], parts: list[str]) -> list[str] | None:
    """The field names allowed in the table at ``parts`` below ``root``."""
    from kvmmu.config import VMConfig

    ann: Any = root
    i = 0
    while i < len(parts):
        if ann is VMConfig and parts[i] == "plugins" and i + 1 < len(parts):
            if parts[i + 1] == "enabled":
                return None
            ann = _plugin_model(parts[i + 1])
            i += 2
            continue
        ann = _step(ann, parts[i])
        if ann is None:
            return None
        if ann == dict[str, Any] and root is not VMConfig:
            # The scenario's ``vm`` and ``vendor_overrides.<vendor>`` tables.
            ann = VMConfig
        i += 1
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return _field_names(ann)
    return None


def explain(problems: list[tuple[str, str]], root: type[BaseModel]) -> list[tuple[str, str]]:
    """``problems`` with every "unknown field" told the allowed names."""
    out = []
    for loc, msg in problems:
        if msg == UNKNOWN and loc:
            parts = loc.split(".")
            allowed = allowed_fields(root, parts[:-1])
            if allowed:
                near = difflib.get_close_matches(parts[-1], allowed, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                msg = f"{UNKNOWN}; {hint}allowed: {', '.join(allowed)}"
        out.append((loc, msg))
    return out
