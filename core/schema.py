"""JSON schema of the VM config, with every installed plugin's section."""

from __future__ import annotations

from typing import Any

from kvmmu.config import VMConfig
from kvmmu.errors import KvmmuError

__all__ = ["config_json_schema"]


def config_json_schema() -> dict[str, Any]:
    """Return the JSON schema of :class:`VMConfig` with plugin sections filled in.

    ``plugins.<name>`` is described by that plugin's own model; plugins that
    cannot be imported are listed under ``x-unloadable-plugins``.
    """
    from kvmmu.plugin_host import installed_plugins, load_plugin_class, plugin_config_model

    schema = VMConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    plugins_def = defs.get("PluginsConfig", {})
    props = plugins_def.setdefault("properties", {})
    broken: list[str] = []
    for info in installed_plugins():
        try:
            model = plugin_config_model(load_plugin_class(info.name))
        except KvmmuError as e:
            broken.append(f"{info.name}: {e}")
            continue
        if model is None:
            props[info.name] = {
                "type": "object",
                "maxProperties": 0,
                "description": f"{info.kind} plugin {info.name} (no options)",
            }
            continue
        sub = model.model_json_schema()
        for k, v in sub.pop("$defs", {}).items():
            defs[f"{info.name}.{k}"] = v
        sub["description"] = f"{info.kind} plugin {info.name}: " + sub.get("description", "")
        props[info.name] = _rewrite_refs(sub, info.name)
    plugins_def["additionalProperties"] = False
    if broken:
        schema["x-unloadable-plugins"] = broken
    return schema


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                out[k] = f"#/$defs/{prefix}.{v[len('#/$defs/') :]}"
            else:
                out[k] = _rewrite_refs(v, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node
