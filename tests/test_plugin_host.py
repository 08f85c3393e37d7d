"""Plugin discovery, registration order and error attribution (issue 2 items 3-4)."""

from __future__ import annotations

import errno
import subprocess
import sys

import kvmmu
import pytest
from kvmmu.errors import ConfigError, KvmError, PluginError
from kvmmu.plugin_host import PluginHost, installed_plugins, load_plugin_class


def test_builtin_plugins_are_entry_points_of_kvmmu() -> None:
    found = {(p.name, p.kind, p.distribution) for p in installed_plugins()}
    for name, kind in [
        ("vmx", "vendor"),
        ("svm", "vendor"),
        ("kvmgt", "consumer"),
        ("virtio_gpu", "consumer"),
        ("iommu", "consumer"),
    ]:
        assert (name, kind, "kvmmu") in found


def test_unknown_plugin_lists_installed_names() -> None:
    with pytest.raises(ConfigError) as ei:
        load_plugin_class("no_such_plugin")
    msg = str(ei.value)
    assert "no_such_plugin" in msg and "vmx" in msg and "kvmgt" in msg


def test_disabled_plugin_module_is_never_imported() -> None:
    """A fresh interpreter: an SVM VM imports the svm plugin and nothing else."""
    code = (
        "import sys, kvmmu; kvmmu.VM(kvmmu.VMConfig(vendor='svm')); "
        "print(sorted({m.split('.')[2] for m in sys.modules if m.startswith('kvmmu.plugins.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "['svm']"


class _Recorder:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    @kvmmu.hookimpl
    def kvmmu_track_write(self, gpa: int, new: bytes) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


def test_hooks_called_newest_first_like_hlist_add_head() -> None:
    host = PluginHost()
    log: list[str] = []
    for n in ("a", "b", "c"):
        host.register(_Recorder(log, n), n)
    host.call("kvmmu_track_write", vm=None, gpa=0, new=b"")
    assert log == ["c", "b", "a"]


def test_raising_notifier_does_not_stop_others_and_is_named() -> None:
    host = PluginHost()
    log: list[str] = []
    host.register(_Recorder(log, "a"), "a")
    host.register(_Recorder(log, "bad", fail=True), "bad")
    with pytest.raises(PluginError) as ei:
        host.call("kvmmu_track_write", vm=None, gpa=0, new=b"")
    assert log == ["bad", "a"]
    assert ei.value.plugin == "bad" and ei.value.hook == "kvmmu_track_write"


def test_unregister_during_walk_is_not_called_after() -> None:
    host = PluginHost()
    log: list[str] = []

    class Unreg:
        @kvmmu.hookimpl
        def kvmmu_track_write(self) -> None:
            log.append("u")
            host.unregister("a")

    host.register(_Recorder(log, "a"), "a")
    host.register(Unreg(), "u")
    host.call("kvmmu_track_write", vm=None, gpa=0, new=b"")
    assert log == ["u"]


def test_misspelt_hook_fails_loudly_check_pending() -> None:
    class Typo:
        @kvmmu.hookimpl
        def kvmmu_track_wrte(self) -> None:
            pass

    host = PluginHost()
    with pytest.raises(PluginError, match="kvmmu_track_wrte"):
        host.register(Typo(), "typo")
    assert host.names() == []


def test_veto_hook_propagates_kvm_error_unchanged() -> None:
    class Veto:
        @kvmmu.hookimpl
        def kvmmu_memslot_prepare(self) -> None:
            raise KvmError(errno.EINVAL, "no")

    host = PluginHost()
    host.register(Veto(), "veto")
    with pytest.raises(KvmError) as ei:
        host.call("kvmmu_memslot_prepare", veto=True, vm=None, old=None, new=None, change=None)
    assert ei.value.errno == errno.EINVAL


def test_one_plugin_manager_per_vm() -> None:
    a = kvmmu.VM(kvmmu.VMConfig(vendor="vmx"))
    b = kvmmu.VM(kvmmu.VMConfig(vendor="svm"))
    assert a.plugins.pm is not b.plugins.pm
    assert a.plugins.names() == ["vmx"] and b.plugins.names() == ["svm"]
    assert a.spte_format.name != b.spte_format.name


def test_call_first_args_maps_subset_and_reordered_arguments() -> None:
    """Implementations may take any subset of the hookspec's arguments in any
    order; the positional fast path hands each the right values, newest first,
    and re-plans when a plugin joins or leaves."""
    seen: list[tuple[str, object, object]] = []

    class Old:
        @kvmmu.hookimpl
        def kvmmu_max_mapping_level(self, max_level: int, gfn: int) -> int:
            seen.append(("old", max_level, gfn))
            return 1

    class New:
        @kvmmu.hookimpl
        def kvmmu_max_mapping_level(self, gfn: int) -> None:
            seen.append(("new", gfn, None))

    host = PluginHost()
    host.register(Old(), "old")
    assert host.call_first_args("kvmmu_max_mapping_level", (None, None, 0x42, 3)) == 1
    host.register(New(), "new")
    assert host.call_first("kvmmu_max_mapping_level", vm=None, vcpu=None, gfn=7, max_level=2) == 1
    host.unregister("old")
    assert host.call_first_args("kvmmu_max_mapping_level", (None, None, 9, 3)) is None
    assert seen == [("old", 3, 0x42), ("new", 7, None), ("old", 2, 7), ("new", 9, None)]


def test_call_first_args_names_the_plugin_that_raised() -> None:
    class Bad:
        @kvmmu.hookimpl
        def kvmmu_get_mt_mask(self, gfn: int) -> int:
            raise ZeroDivisionError(gfn)

    host = PluginHost()
    host.register(Bad(), "bad")
    with pytest.raises(PluginError) as ei:
        host.call_first_args("kvmmu_get_mt_mask", (None, None, 5, False))
    assert ei.value.plugin == "bad" and ei.value.hook == "kvmmu_get_mt_mask"
    assert "ZeroDivisionError" in str(ei.value)
