"""Plugin discovery (stevedore), registration (pluggy) and config validation.

- Discovery: one entry-point group per kind, ``kvmmu.vendors`` and
  ``kvmmu.consumers``. The built-in plugins are entry points of the kvmmu
  distribution itself, so built-in and third-party plugins are found the same
  way. Listing reads entry-point metadata only; a plugin's module is imported
  only when the plugin is enabled (or when ``kvmmu plugins`` asks for its
  description).
- One :class:`pluggy.PluginManager` per VM. The vendor is registered first
  and consumers after it in config order, so the last consumer is the newest
  and is called first, like KVM's page-track notifier list
  (``hlist_add_head_rcu``; spec/kvm-mmu.md §2.1).
- A plugin class is constructed as ``cls(vm, config)`` with its validated
  config model instance (``None`` when it takes no options).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
from kvmmu import hookspecs
from kvmmu.errors import ConfigError, KvmError, PluginError
from pydantic import BaseModel, ValidationError
from stevedore import NamedExtensionManager

if TYPE_CHECKING:
    from kvmmu.config import PluginsConfig, VMConfig

__all__ = [
    "GROUPS",
    "PluginHost",
    "PluginInfo",
    "installed_plugins",
    "load_plugin_class",
    "plugin_config_model",
    "resolve_plugins",
    "validate_plugin_sections",
]

#: kind -> stevedore namespace (entry-point group).
GROUPS: dict[str, str] = {"vendor": "kvmmu.vendors", "consumer": "kvmmu.consumers"}


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin as its entry point describes it (nothing imported)."""

    name: str
    kind: str
    distribution: str
    version: str
    target: str


def _distribution_of(group: str, name: str, value: str) -> tuple[str, str]:
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group == group and ep.name == name and ep.value == value:
                return dist.metadata["Name"], dist.version
    return "?", "?"


def installed_plugins() -> list[PluginInfo]:
    """Return every installed plugin of every kind, sorted by kind and name."""
    out: list[PluginInfo] = []
    for kind, group in GROUPS.items():
        mgr: NamedExtensionManager = NamedExtensionManager(group, names=[], invoke_on_load=False)
        for ep in mgr.list_entry_points():
            dist, version = _distribution_of(group, ep.name, ep.value)
            out.append(PluginInfo(ep.name, kind, dist, version, ep.value))
    return sorted(out, key=lambda p: (p.kind != "vendor", p.name))


def _installed_by_name() -> dict[str, PluginInfo]:
    return {p.name: p for p in installed_plugins()}


def load_plugin_class(name: str, kind: str | None = None) -> type:
    """Import and return the plugin class of entry point ``name``.

    An unknown name raises :class:`ConfigError` listing the installed names;
    an import failure raises :class:`PluginError` naming the plugin and the
    exception.
    """
    installed = _installed_by_name()
    info = installed.get(name)
    if info is None or (kind is not None and info.kind != kind):
        names = ", ".join(sorted(installed))
        what = f"{kind} plugin" if kind else "plugin"
        raise ConfigError([("", f"unknown {what} {name!r}; installed plugins: {names}")])
    failures: list[BaseException] = []

    def on_failure(_mgr: Any, _ep: Any, exc: BaseException) -> None:
        failures.append(exc)

    mgr = NamedExtensionManager(
        GROUPS[info.kind],
        names=[name],
        invoke_on_load=False,
        on_load_failure_callback=on_failure,
        on_missing_entrypoints_callback=lambda _names: None,
    )
    if failures:
        exc = failures[0]
        raise PluginError(name, None, f"import failed: {type(exc).__name__}: {exc}") from exc
    for ext in mgr:
        return ext.plugin
    raise PluginError(name, None, "entry point did not load")


def plugin_config_model(cls: type) -> type[BaseModel] | None:
    """Return the plugin's config model (its ``kvmmu_config_model`` hookimpl)."""
    fn = getattr(cls, "kvmmu_config_model", None)
    if fn is None:
        return None
    model = fn()
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        name = getattr(cls, "name", cls.__name__)
        raise PluginError(name, "kvmmu_config_model", "must return a pydantic model class")
    return model


def validate_plugin_sections(vendor: str, plugins: PluginsConfig) -> list[tuple[str, str]]:
    """Check the vendor, the enabled consumers and every plugin section.

    Returns every problem found as ``(location, message)``. Import failures
    raise :class:`PluginError` at once (exit code 4, not a config error).
    """
    from kvmmu.config import validation_problems

    installed = _installed_by_name()
    names = ", ".join(sorted(installed))
    problems: list[tuple[str, str]] = []
    vinfo = installed.get(vendor)
    if not vendor:
        problems.append(("vendor", f"no vendor given; exactly one is required: {_kind(installed)}"))
    elif vinfo is None:
        problems.append(("vendor", f"unknown vendor {vendor!r}; vendors: {_kind(installed)}"))
    elif vinfo.kind != "vendor":
        problems.append(("vendor", f"{vendor!r} is a consumer; vendors: {_kind(installed)}"))
    seen: set[str] = set()
    for i, name in enumerate(plugins.enabled):
        loc = f"plugins.enabled.{i}"
        info = installed.get(name)
        if name in seen:
            problems.append((loc, f"{name!r} is listed twice"))
        elif info is None:
            problems.append(
                (loc, f"unknown plugin {name!r}; consumers: {_kind(installed, 'consumer')}")
            )
        elif info.kind == "vendor":
            problems.append(
                (loc, f"{name!r} is a vendor: a VM has exactly one vendor, chosen by `vendor`")
            )
        seen.add(name)
    active = {vendor, *plugins.enabled}
    for name, section in plugins.sections().items():
        loc = f"plugins.{name}"
        if name not in installed:
            problems.append((loc, f"section for unknown plugin {name!r}; installed: {names}"))
            continue
        if name not in active:
            problems.append((loc, f"section for plugin {name!r}, which is not enabled"))
            continue
        cls = load_plugin_class(name)
        model = plugin_config_model(cls)
        if model is None:
            if section:
                problems.append((loc, f"plugin {name!r} takes no options"))
            continue
        try:
            model.model_validate(section)
        except ValidationError as e:
            problems.extend(validation_problems(e, loc))
    return problems


def _kind(installed: dict[str, PluginInfo], kind: str = "vendor") -> str:
    """The installed plugins of ``kind``, comma separated (what a config may name)."""
    return ", ".join(sorted(n for n, p in installed.items() if p.kind == kind))


@dataclass
class ResolvedPlugin:
    """An enabled plugin: its class and validated config."""

    name: str
    kind: str
    cls: type
    config: BaseModel | None


def resolve_plugins(cfg: VMConfig) -> list[ResolvedPlugin]:
    """Import the vendor and the enabled consumers; validate their sections."""
    problems = validate_plugin_sections(cfg.vendor, cfg.plugins)
    if problems:
        raise ConfigError(problems)
    sections = cfg.plugins.sections()
    out: list[ResolvedPlugin] = []
    for kind, name in [("vendor", cfg.vendor), *(("consumer", n) for n in cfg.plugins.enabled)]:
        cls = load_plugin_class(name, kind)
        model = plugin_config_model(cls)
        conf = model.model_validate(sections.get(name, {})) if model else None
        out.append(ResolvedPlugin(name, kind, cls, conf))
    return out


class PluginHost:
    """The per-VM plugin manager and the typed facade the core calls through.

    Calls go through :meth:`call` / :meth:`call_first`, which walk the hook's
    implementations newest-first (pluggy's LIFO order) and name the plugin
    and hook in any error. A plugin unregistered while a hook is being
    walked is not called after :meth:`unregister` returns (the SRCU rule of
    ``kvm_page_track_unregister_notifier``, spec/kvm-mmu.md §2.1).
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._by_name: dict[str, object] = {}
        self._impls: dict[str, list[tuple[str, Callable[..., Any], tuple[str, ...]]]] = {}
        self._plans: dict[str, list[tuple[str, Callable[..., Any], tuple[int, ...] | None]]] = {}
        self._specs: dict[str, tuple[str, ...]] = {}

    # registration ------------------------------------------------------
    def register(self, obj: object, name: str) -> None:
        """Register ``obj`` under ``name``; its hooks must all exist."""
        if name in self._by_name:
            raise PluginError(name, None, "a plugin with this name is already registered")
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            raise PluginError(name, None, f"invalid hook implementation: {e}") from e
        self._by_name[name] = obj
        self._impls.clear()
        self._plans.clear()

    def unregister(self, name: str) -> object:
        """Remove the plugin registered as ``name`` and return it."""
        obj = self._by_name.pop(name, None)
        if obj is None:
            raise PluginError(name, None, f"not registered; registered: {sorted(self._by_name)}")
        self.pm.unregister(obj)
        self._impls.clear()
        self._plans.clear()
        return obj

    def get(self, name: str) -> object | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """Registered plugin names, oldest first."""
        return list(self._by_name)

    def is_registered(self, obj: object) -> bool:
        return any(o is obj for o in self._by_name.values())

    # calling -------------------------------------------------------------
    def impls(self, hook: str) -> list[tuple[str, Callable[..., Any], tuple[str, ...]]]:
        """``(plugin name, function, argnames)`` in call order (newest first)."""
        cached = self._impls.get(hook)
        if cached is None:
            caller = getattr(self.pm.hook, hook)
            cached = [
                (impl.plugin_name, impl.function, tuple(impl.argnames))
                for impl in reversed(caller.get_hookimpls())
            ]
            self._impls[hook] = cached
        return cached

    @staticmethod
    def _invoke(
        hook: str,
        name: str,
        fn: Callable[..., Any],
        argnames: tuple[str, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call one implementation; wrap anything but KvmError/PluginError."""
        try:
            return fn(*[kwargs[a] for a in argnames])
        except (KvmError, PluginError):
            raise
        except Exception as e:
            raise PluginError(name, hook, f"{type(e).__name__}: {e}") from e

    def call(self, hook: str, *, veto: bool = False, **kwargs: Any) -> list[Any]:
        """Call every implementation; return their non-None results.

        With ``veto`` a :class:`KvmError` stops the walk and propagates
        unchanged. Otherwise every implementation runs even if an earlier one
        raised, and the first error is raised afterwards as a
        :class:`PluginError` naming the plugin and the hook.
        """
        results: list[Any] = []
        first_err: BaseException | None = None
        for name, fn, argnames in self.impls(hook):
            if not self._live(name, fn):
                continue  # unregistered during this walk
            try:
                r = self._invoke(hook, name, fn, argnames, kwargs)
            except KvmError as e:
                if veto:
                    raise
                first_err = first_err or PluginError(name, hook, f"KvmError: {e}")
                continue
            except PluginError as e:
                first_err = first_err or e
                continue
            if r is not None:
                results.append(r)
        if first_err is not None:
            raise first_err
        return results

    def spec_argnames(self, hook: str) -> tuple[str, ...]:
        """The hookspec's argument names, in order."""
        spec = self._specs.get(hook)
        if spec is None:
            hc = getattr(self.pm.hook, hook)
            spec = tuple(hc.spec.argnames) if hc.spec is not None else ()
            self._specs[hook] = spec
        return spec

    def _plan(self, hook: str) -> list[tuple[str, Callable[..., Any], tuple[int, ...] | None]]:
        """:meth:`impls` with each implementation's arguments as positions in
        the hookspec's order (None: the implementation takes them all, in order)."""
        spec = self.spec_argnames(hook)
        plan = [
            (name, fn, None if argnames == spec else tuple(spec.index(a) for a in argnames))
            for name, fn, argnames in self.impls(hook)
        ]
        self._plans[hook] = plan
        return plan

    def call_first(self, hook: str, **kwargs: Any) -> Any:
        """Call implementations until one returns non-None (``firstresult``)."""
        return self.call_first_args(hook, tuple(kwargs[a] for a in self.spec_argnames(hook)))

    def call_first_args(self, hook: str, args: tuple[Any, ...]) -> Any:
        """:meth:`call_first` with the arguments positional, in hookspec order.

        The per-fault hooks (``get_mt_mask``, ``max_mapping_level``) come
        through here: no keyword dict per call, each implementation called
        inline; errors are attributed as in :meth:`call`.
        """
        plan = self._plans.get(hook)
        if plan is None:
            plan = self._plan(hook)
        for name, fn, order in plan:
            if not self._live(name, fn):
                continue  # unregistered during this walk
            try:
                r = fn(*args) if order is None else fn(*[args[i] for i in order])
            except (KvmError, PluginError):
                raise
            except Exception as e:
                raise PluginError(name, hook, f"{type(e).__name__}: {e}") from e
            if r is not None:
                return r
        return None

    def iter_results(self, hook: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Yield ``(plugin name, result)`` for reports and invariant checks."""
        for name, fn, argnames in self.impls(hook):
            if self._live(name, fn):
                yield name, self._invoke(hook, name, fn, argnames, kwargs)

    def _live(self, name: str, fn: Callable[..., Any]) -> bool:
        """Whether ``fn``'s plugin is still the one registered as ``name``.

        A walk uses the implementation list it started with; a plugin
        unregistered meanwhile is skipped even if another object took its
        name (SRCU: nothing is called after ``unregister`` returns,
        spec/kvm-mmu.md §2.1).
        """
        obj = self._by_name.get(name)
        if obj is None:
            return False
        owner = getattr(fn, "__self__", None)
        return owner is None or owner is obj
