"""Built-in race scenarios and the TOML scenario loader for :mod:`kvmmu.explore`.

Each scenario is a dict in the TOML format documented in :mod:`kvmmu.explore`;
:func:`load_scenario` takes a built-in name or a ``.toml`` path.

* ``race-2010`` -- seed 004: vCPU0's shadow fault walks the guest tables
  (no ``mmu_lock``), vCPU1 repoints the PDE of a not-yet-shadowed page
  directory (no #PF: nothing write-protects it), then vCPU0's ``FNAME(fetch)``
  creates the sp for that directory (Point B), re-checks (Point C) and links
  (Point D). ``buggy`` = ``gpte_recheck="level1"`` (only the leaf gPTE is
  re-read, ``arch/x86/kvm/mmu/paging_tmpl.h: FNAME(fetch)`` before 2010) links
  a shadow table built from the stale PDE; ``fixed`` re-reads each level's gPTE
  (``gpte_changed``) and retries.
* ``mmu-notifier-retry`` -- a TDP write fault against a host invalidation
  (``invalidate_range_start``, reclaim, ``invalidate_range_end``) of the same
  page. ``buggy`` = ``mmu_notifier_retry_check=False``: the fault maps the pfn
  it got before the reclaim; ``fixed`` retries through
  ``include/linux/kvm_host.h: mmu_invalidate_retry_gfn``.

No KVMGT partial-write scenario: spec/consumers.md §1.6 W3 says the handler
ignores the written bytes and re-reads the whole guest entry, and every write
(W5 at once, W6 at the post-shadow flush, which re-reads again) is followed by
its own handler under ``vgpu_lock``. The last handler therefore runs after the
last write landed and shadows the guest entry as it finally is; a torn
AABBGGHH entry (open question 3) is the guest's own unsynchronised store, which
the shadow mirrors faithfully, not a shadow/guest divergence to show.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from kvmmu.explore import Scenario, StepGen, Wait, fingerprint

__all__ = [
    "BUILTIN_SCENARIOS",
    "VmInstance",
    "builtin_scenario_dict",
    "load_scenario",
    "scenario_from_dict",
]

_HVA = 0x7F00_0000_0000
_PTE_P, _PTE_W, _PTE_U, _PTE_A, _PTE_D = 1, 2, 4, 0x20, 0x40
_TABLE = _PTE_P | _PTE_W | _PTE_U | _PTE_A
_LEAF = _TABLE | _PTE_D
_CR0_PE, _CR0_WP, _CR0_PG = 1, 1 << 16, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME = 1 << 8

_RACE_2010: dict[str, Any] = {
    "scenario": {
        "name": "race-2010",
        "description": "seed 004: shadow walk, guest repoints an unshadowed PDE, fetch links",
        "default_variant": "fixed",
        "variants": {"buggy": {"gpte_recheck": "level1"}, "fixed": {"gpte_recheck": "fixed"}},
    },
    "vm": {"tdp": False, "vcpus": 2},
    "memslot": [{"slot": 0, "gpa": 0, "size": 0x10000, "hva": _HVA}],
    "setup": [
        # PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> data 0x5000;
        # the alternative PT 0x6000 maps the same gva to 0x7000.
        {"kind": "write_u64", "gpa": 0x1000, "value": 0x2000 | _TABLE},
        {"kind": "write_u64", "gpa": 0x2000, "value": 0x3000 | _TABLE},
        {"kind": "write_u64", "gpa": 0x3008, "value": 0x4000 | _TABLE},
        {"kind": "write_u64", "gpa": 0x4008, "value": 0x5000 | _LEAF},
        {"kind": "write_u64", "gpa": 0x6008, "value": 0x7000 | _LEAF},
        {
            "kind": "sregs",
            "vcpu": [0, 1],
            "cr0": _CR0_PE | _CR0_WP | _CR0_PG,
            "cr3": 0x1000,
            "cr4": _CR4_PAE,
            "efer": _EFER_LME,
        },
    ],
    "op": [
        {"name": "vcpu0-fault", "kind": "shadow_fault", "vcpu": 0, "gva": 0x201000},
        {"name": "vcpu1-write-pde", "kind": "guest_write", "gpa": 0x3008, "value": 0x6000 | _TABLE},
    ],
    "check": {"gvas": [0x201000]},
}

_MN_RETRY: dict[str, Any] = {
    "scenario": {
        "name": "mmu-notifier-retry",
        "description": "TDP fault's faultin_pfn against invalidate_range_start/reclaim/end",
        "default_variant": "fixed",
        "variants": {
            "buggy": {"mmu_notifier_retry_check": False},
            "fixed": {"mmu_notifier_retry_check": True},
        },
    },
    "vm": {"tdp": True, "vcpus": 1},
    "memslot": [{"slot": 0, "gpa": 0, "size": 0x10000, "hva": _HVA}],
    "setup": [],
    "op": [
        {"name": "fault", "kind": "tdp_fault", "gpa": 0x1000, "write": True},
        {
            "name": "host",
            "kind": "invalidate",
            "hva": _HVA + 0x1000,
            "size": 0x1000,
            "reclaim": True,
        },
    ],
    "check": {},
}

_BUILTIN_DICTS = {"race-2010": _RACE_2010, "mmu-notifier-retry": _MN_RETRY}

#: name -> {"description", "variants", "default_variant"} (for ``kvmmu explore``).
BUILTIN_SCENARIOS: dict[str, dict[str, Any]] = {
    name: {
        "description": d["scenario"]["description"],
        "variants": sorted(d["scenario"]["variants"]),
        "default_variant": d["scenario"]["default_variant"],
    }
    for name, d in _BUILTIN_DICTS.items()
}


# ---------------------------------------------------------------- operations
def _tdp_fault(vm: Any, op: dict[str, Any]) -> StepGen:
    """``kvm_tdp_page_fault`` as steps (``arch/x86/kvm/mmu/mmu.c: kvm_faultin_pfn``)."""
    vcpu = vm.vcpus[int(op.get("vcpu", 0))]
    err = 2 if op.get("write", False) else 0
    r = yield from vm.mmu.page_fault_steps(vcpu, int(op["gpa"]), err)
    return f"ret_pf={r}"


def _point(p: Any) -> str:
    """A shadow ``FaultStep`` as ``name[L<level> gfn <gfn>]`` (Points B-D of seed 004)."""
    name = getattr(p, "name", None)
    if name is None:
        return str(p)
    return f"{name}[L{p.level} gfn {p.gfn:#x}]"


def _shadow_fault(vm: Any, op: dict[str, Any]) -> StepGen:
    """``FNAME(page_fault)`` as steps (``arch/x86/kvm/mmu/paging_tmpl.h: FNAME(fetch)``).

    ``walk`` (the guest walk is done, no lock), ``sp[L.. gfn ..]`` (Point B:
    the shadow page of that guest table exists and write-protects it; next
    come Point C, ``gpte_changed``, and Point D, the link), ``install``.
    """
    vcpu = vm.vcpus[int(op.get("vcpu", 0))]
    err = 2 if op.get("write", False) else 0
    gen = vm.mmu.page_fault_steps(vcpu, int(op["gva"]), err)
    try:
        point = next(gen)
        while True:
            yield _point(point)
            point = next(gen)
    except StopIteration as stop:
        return f"ret_pf={stop.value}"


def _guest_write(vm: Any, op: dict[str, Any]) -> StepGen:
    """A vCPU store to guest memory (``arch/x86/kvm/x86.c: emulator_write_phys``).

    To a write-tracked gfn the store faults and is emulated: the bytes land,
    then ``kvm_page_track_write`` -> ``kvm_mmu_track_write`` (which waits for
    ``mmu_lock``). Otherwise the store goes straight to guest memory.
    """
    gpa = int(op["gpa"])
    size = int(op.get("size", 8))
    data = int(op["value"]).to_bytes(8, "little")[:size]
    gfn = gpa >> 12
    slot = vm.memslots.gfn_to_memslot(gfn)
    if not vm.page_track.is_write_tracked(slot, gfn):
        unsync = getattr(vm.mmu, "try_to_unsync_pages", None)
        if unsync is not None and vm.mmu.gfn_sps.get(gfn):
            # A last-level guest table KVM shadows is write-protected but not
            # tracked (spec/kvm-mmu.md §2.4): the store faults, and under
            # mmu_lock mmu_try_to_unsync_pages unsyncs its shadow pages and
            # maps it writable (§3.12) before the store goes through. Writing
            # past the write-protection would leave a synced sp stale.
            yield from _mmu_lock(vm)
            if unsync(slot, gfn, True, False) == 0:
                vm.write_guest(gpa, data)
                return "unsync-store"
            # The gfn became write-tracked (an upper-level sp was made for it)
            # while the store waited: -EPERM, the SPTE stays read-only and the
            # store is emulated instead (spec/kvm-mmu.md §2.3 items 2 and 5).
        else:
            vm.write_guest(gpa, data)
            return "store"
    vm.write_guest_kvm(gpa, data)
    yield "emulated-store"
    vm.page_track.track_write(gpa, data)
    return "track_write"


def _lock_free(vm: Any) -> bool:
    return getattr(vm.mmu, "_mmu_lock_owner", None) is None


def _mmu_lock(vm: Any) -> StepGen:
    """Wait while a suspended shadow fault holds ``mmu_lock`` (``write_lock``)."""
    if not _lock_free(vm):
        yield Wait("mmu_lock", lambda: _lock_free(vm))


def _invalidate(vm: Any, op: dict[str, Any]) -> StepGen:
    """An MMU-notifier invalidation (``mm/mmu_notifier.c``) as three steps."""
    s = int(op["hva"])
    e = s + int(op.get("size", 0x1000))
    yield from _mmu_lock(vm)
    vm.host.invalidate_range_start(s, e)
    yield "invalidate_range_start"
    if op.get("reclaim", True):
        vm.host.reclaim_range(s, e)
        yield "reclaim"
    yield from _mmu_lock(vm)
    vm.host.invalidate_range_end(s, e)
    return "invalidate_range_end"


def _zap(vm: Any, op: dict[str, Any]) -> StepGen:
    """``kvm_zap_gfn_range`` (one step under ``mmu_lock``)."""
    g = int(op["gfn"])
    yield from _mmu_lock(vm)
    vm.zap_gfn_range(g, g + int(op.get("nr", 1)))
    return "zap"


_OPS = {
    "tdp_fault": _tdp_fault,
    "shadow_fault": _shadow_fault,
    "guest_write": _guest_write,
    "invalidate": _invalidate,
    "zap": _zap,
}


# ------------------------------------------------------------------ instance
class VmInstance:
    """A fresh VM built from a scenario dict, with its operations."""

    def __init__(self, d: dict[str, Any], variant: str) -> None:
        import kvmmu

        cfg = dict(d.get("vm", {}))
        cfg.update(d["scenario"]["variants"][variant])
        vm = kvmmu.VM(cfg)
        self.vm = vm
        for m in d.get("memslot", []):
            vm.host.mmap_anon(int(m["hva"]), int(m["size"]))
            flags = int(m.get("flags", 0))
            vm.set_user_memory_region(
                int(m["slot"]), flags, int(m["gpa"]), int(m["size"]), int(m["hva"])
            )
        for s in d.get("setup", []):
            self._setup(s)
        self.gvas = [int(g) for g in d.get("check", {}).get("gvas", [])]
        self.table_gpas = sorted(
            {int(s["gpa"]) & ~0xFFF for s in d.get("setup", []) if s["kind"] == "write_u64"}
            | {int(o["gpa"]) & ~0xFFF for o in d["op"] if o["kind"] == "guest_write"}
        )
        self.ops: list[tuple[str, StepGen]] = []
        for o in d["op"]:
            kind = o["kind"]
            if kind not in _OPS:
                raise ValueError(
                    f"op {o.get('name')!r}: unknown kind {kind!r}; have {sorted(_OPS)}"
                )
            self.ops.append((str(o["name"]), _OPS[kind](vm, o)))

    def _setup(self, s: dict[str, Any]) -> None:
        vm = self.vm
        kind = s["kind"]
        if kind == "write_u64":
            vm.write_guest(int(s["gpa"]), int(s["value"]).to_bytes(8, "little"))
        elif kind == "sregs":
            idx = s.get("vcpu", 0)
            for i in idx if isinstance(idx, list) else [idx]:
                vm.vcpus[int(i)].set_sregs(
                    **{k: int(s[k]) for k in ("cr0", "cr3", "cr4", "efer") if k in s}
                )
                reload = getattr(vm.mmu, "reload", None)
                if reload is not None:
                    reload(vm.vcpus[int(i)])
        elif kind == "access":
            vm.vcpus[int(s.get("vcpu", 0))].access(int(s["gva"]), s.get("access", "read"))
        else:
            raise ValueError(f"setup: unknown kind {kind!r}")

    def check(self) -> list[str]:
        """``vm.check_invariants()`` plus: each checked gva's SPTE translation
        is the guest's current one (no SPTE maps a gfn the guest removed)."""
        out = list(self.vm.check_invariants())
        if not self.vm.mmu.shadow or not self.gvas:
            return out
        mmu = self.vm.shadow_mmu()
        for vcpu in self.vm.vcpus:
            root = mmu.vstate(vcpu).root
            if root is None:
                continue
            for gva in self.gvas:
                err, sp, _i, spte = mmu.hw_walk(vcpu, root, gva, False, False)
                if err is not None or sp.unsync:
                    # An unsync leaf may lag the guest until its INVLPG or CR3
                    # load syncs it (spec/kvm-mmu.md §3.12, §3.15).
                    continue
                w = vcpu.walk(gva, "read")
                hpa = (spte & 0x000F_FFFF_FFFF_F000) | (gva & 0xFFF)
                gpa = None if w.fault or w.gpa is None else int(w.gpa)
                want = None if gpa is None else self.vm.gfn_to_pfn(gpa >> 12)
                if want is None or hpa >> 12 != want:
                    out.append(
                        f"vCPU {vcpu.index}: SPTE maps gva {gva:#x} to hpa {hpa:#x} but the "
                        f"guest maps it to gpa {gpa if gpa is None else hex(gpa)} "
                        "(stale shadow translation)"
                    )
        return out

    def shared(self) -> Sequence[object]:
        vm = self.vm
        slots = list(vm.memslots.all_slots())
        return [vm, vm.mmu, vm.host, vm.memslots, vm.page_track, *vm.vcpus, *slots]

    def state(self) -> Hashable:
        """Digest: the MMU (SPTE tables, roots, invalidate seq/in_progress/range),
        host memory (pfn map, page contents: the guest page tables) and vCPUs."""
        vm = self.vm
        sh = self.shared()
        return hash(
            (
                fingerprint(vm.mmu, sh, depth=6),
                fingerprint(vm.host, sh, depth=6),
                tuple(fingerprint(v, sh, depth=3) for v in vm.vcpus),
                tuple(hash(vm.read_guest(g, 0x1000)) for g in self.table_gpas),
            )
        )


def scenario_from_dict(d: dict[str, Any]) -> Scenario:
    """A :class:`Scenario` from the TOML-shaped dict (see :mod:`kvmmu.explore`)."""
    meta = d["scenario"]
    variants = tuple(sorted(meta.get("variants") or {"default": {}}))
    if "variants" not in meta:
        d = {**d, "scenario": {**meta, "variants": {"default": {}}}}
    default = str(meta.get("default_variant", variants[0]))
    if not 1 <= len(d.get("op", [])) <= 4:
        raise ValueError("a scenario has 1 to 4 operations ([[op]] tables)")
    return Scenario(
        name=str(meta["name"]),
        description=str(meta.get("description", "")),
        variants=variants,
        default_variant=default,
        build=lambda variant: VmInstance(d, variant),
    )


def builtin_scenario_dict(name: str) -> dict[str, Any]:
    """A deep copy of a built-in scenario in the TOML shape (to extend it)."""
    return copy.deepcopy(_BUILTIN_DICTS[name])


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or a TOML scenario file."""
    if name_or_path in _BUILTIN_DICTS:
        return scenario_from_dict(_BUILTIN_DICTS[name_or_path])
    p = Path(name_or_path)
    if not p.is_file():
        raise ValueError(
            f"no built-in scenario or file {name_or_path!r}; built-ins: {sorted(_BUILTIN_DICTS)}"
        )
    with p.open("rb") as f:
        return scenario_from_dict(tomllib.load(f))
