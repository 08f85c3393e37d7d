"""The 2010 walk/fetch race (seed 004; spec/kvm-mmu.md §3.8).

vCPU 0 faults on ``G`` (mapped to page ``X`` through PML4E -> PDPTE -> PDE
-> PTE). Its fault runs as :meth:`ShadowMmu.page_fault_steps`; at one step
vCPU 1 removes (or retargets) one of those guest entries with an ordinary
guest store. If that store needs ``mmu_lock`` while vCPU 0's fault holds it
(:class:`MmuLockContended`), vCPU 1 would spin in KVM, so the store runs
after the fault - the kernel's order. The guest then flushes (INVLPG ``G``).

With ``gpte_recheck = "level1"`` (the pre-fix check of the leaf gPTE only),
some interleaving leaves ``G`` mapped to ``X`` after the guest removed it;
with ``"fixed"`` no interleaving does, and the invariants hold throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import kvmmu
import pytest
from kvmmu import paging as P
from kvmmu.mmu.shadow import MmuLockContended, drive
from test_shadow import URW, GuestTables, guest_write_entry, make_vm

G = 0x400000
X = 0x200000
Y = 0x300000
#: A gva under the same PD as G but another PDE (warms the PD's shadow page).
H = 0x600000

Edit = Callable[[GuestTables], tuple[int, int]]


def _clear(level: int) -> Edit:
    def edit(gt: GuestTables) -> tuple[int, int]:
        return gt.entry(G, level), 0

    edit.__name__ = f"clear_level{level}"
    return edit


def _retarget_pde(gt: GuestTables) -> tuple[int, int]:
    """Point G's PDE at another table that maps G to Y."""
    return gt.entry(G, 2), gt.spare | URW


EDITS: dict[str, Edit] = {
    "clear_pdpte": _clear(3),
    "clear_pde": _clear(2),
    "clear_pte": _clear(1),
    "retarget_pde": _retarget_pde,
}
#: Shadow state before vCPU 0's fault: nothing of G's path, or G's PD shadowed.
PRESTATES = ("cold", "warm_pd")


def build(recheck: str, prestate: str) -> tuple[kvmmu.VM, GuestTables]:
    vm = make_vm(gpte_recheck=recheck)
    gt = GuestTables(vm)
    gt.map(G, X)
    gt.map(H, X + 0x1000)
    spare = gt.spare = gt.alloc()
    gt.write(spare + ((G >> 12) & 511) * 8, Y | URW)
    gt.map_tables()
    gt.start()
    v1 = vm.vcpus[1]
    for t in gt.tables:
        # vCPU 1 touches every table page with a write of the value already
        # there, so it holds a mapping of each (writable while not shadowed).
        addr = t + 8 * 511
        guest_write_entry(v1, addr, gt.read(addr))
    if prestate == "warm_pd":
        assert vm.vcpus[0].access(H, "read").fault is None
    assert vm.check_invariants() == []
    return vm, gt


def run_interleaving(recheck: str, prestate: str, edit: Edit, point: int) -> kvmmu.VM:
    """Run vCPU 0's fault on G with vCPU 1's store at interleaving ``point``.

    Point 0 is before the fault, point k at the fault's k-th step, any later
    point after the fault. The guest then flushes G (INVLPG).
    """
    vm, gt = build(recheck, prestate)
    v0, v1 = vm.vcpus
    entry, value = edit(gt)
    steps = 0
    pending = [True]

    def store() -> None:
        try:
            guest_write_entry(v1, entry, value)
        except MmuLockContended:
            return
        pending[0] = False

    def on_step(_step: object) -> None:
        nonlocal steps
        steps += 1
        if steps == point and pending[0]:
            store()

    if point == 0:
        store()
    drive(vm.mmu.page_fault_steps(v0, G, 0), on_step)
    if pending[0]:
        store()
    assert not pending[0]
    vm.mmu.invlpg(v0, G)
    return vm


def removed_mapping_installed(vm: kvmmu.VM) -> bool:
    """vCPU 0 still reaches X through G although the guest's tables no longer say so."""
    r = vm.vcpus[0].access(G, "read")
    return r.fault is None and r.gpa == X


def _points(recheck: str, prestate: str) -> range:
    """Every interleaving point: before the fault, at each of its steps, after it."""
    vm, _gt = build(recheck, prestate)
    count = 0

    def tick(_s: object) -> None:
        nonlocal count
        count += 1

    drive(vm.mmu.page_fault_steps(vm.vcpus[0], G, 0), tick)
    return range(count + 2)


def test_race_2010_buggy_installs_removed_mapping() -> None:
    """Pre-fix (level-1-only re-check): the seed's case 1 installs a removed mapping."""
    found = []
    for prestate in PRESTATES:
        for name, edit in EDITS.items():
            for point in _points("level1", prestate):
                vm = run_interleaving("level1", prestate, edit, point)
                if removed_mapping_installed(vm):
                    found.append((prestate, name, point))
                    assert vm.check_invariants() != []
    assert found, "the pre-2010 check should let some interleaving install a removed mapping"
    # The seed's case 1a: the PD is shadowed, the PDE write is emulated and zaps
    # the shadow PDE at once, then fetch links the stale PT's shadow page.
    assert any(p == "warm_pd" and n == "clear_pde" for p, n, _ in found)
    # Case 1b: the PD is not shadowed yet, so the PDE store lands unseen.
    assert any(p == "cold" and n == "clear_pde" for p, n, _ in found)


@pytest.mark.parametrize("prestate", PRESTATES)
@pytest.mark.parametrize("name", sorted(EDITS))
def test_race_2010_fixed_never_does(prestate: str, name: str) -> None:
    """With every level re-checked, no interleaving point installs a removed mapping."""
    edit = EDITS[name]
    points = _points("fixed", prestate)
    assert len(points) >= 5
    for point in points:
        vm = run_interleaving("fixed", prestate, edit, point)
        assert not removed_mapping_installed(vm), (prestate, name, point)
        assert vm.check_invariants() == [], (prestate, name, point)
        r = vm.vcpus[0].access(G, "read")
        if name == "retarget_pde":
            assert r.fault is None and r.gpa == Y
        else:
            assert r.fault is not None and r.fault.vector == P.PF_VECTOR


def test_race_2010_fixed_retries_on_changed_pde() -> None:
    """The fixed fetch returns RETRY at the re-check and counts it."""
    vm, gt = build("fixed", "warm_pd")
    v0, v1 = vm.vcpus
    gen = vm.mmu.page_fault_steps(v0, G, 0)
    assert next(gen).name == "walk"
    guest_write_entry(v1, gt.entry(G, 2), 0)
    assert drive(gen) == 1  # RET_PF_RETRY
    assert vm.stats["mmu_gpte_changed"] == 1
