"""Property test: random guest PTE edits (vCPU stores, so emulated or unsynced)
interleaved with accesses, INVLPGs and CR3 reloads; the invariants hold after
every step (issue 7 item 4)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu import paging as P
from test_shadow import TABLE_WINDOW, URW, GuestTables, make_vm

GVAS = [0x400000 + i * 0x1000 for i in range(4)] + [0x600000, 0x601000]
FRAMES = [0x200000 + i * 0x1000 for i in range(6)]
LEVELS = [1, 2]

step = st.one_of(
    st.tuples(
        st.just("access"),
        st.integers(0, 1),
        st.sampled_from(GVAS),
        st.sampled_from(["read", "write", "fetch"]),
    ),
    st.tuples(
        st.just("edit"),
        st.integers(0, 1),
        st.sampled_from(GVAS),
        st.sampled_from(LEVELS),
        st.integers(0, 5),
    ),
    st.tuples(st.just("invlpg"), st.integers(0, 1), st.sampled_from(GVAS)),
    st.tuples(st.just("cr3"), st.integers(0, 1)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=25))
def test_random_gpte_edits_keep_invariants(steps: list[tuple[object, ...]]) -> None:
    vm = make_vm()
    gt = GuestTables(vm)
    for gva, frame in zip(GVAS, FRAMES, strict=True):
        gt.map(gva, frame)
    spares = [gt.alloc() for _ in range(2)]
    for n, t in enumerate(spares):
        gt.write(t + ((GVAS[0] >> 12) & 511) * 8, FRAMES[n] | URW)
    gt.map_tables()
    gt.start()
    for s in steps:
        v = vm.vcpus[int(s[1])]  # type: ignore[call-overload]
        if s[0] == "access":
            kind = str(s[3])
            data = b"\x5a" if kind == "write" else None
            v.access(int(s[2]), kind, 1, data)  # type: ignore[arg-type,call-overload]
        elif s[0] == "edit":
            gva, level, choice = int(s[2]), int(s[3]), int(s[4])  # type: ignore[call-overload]
            if level == 1:
                value = 0 if choice == 0 else FRAMES[choice] | URW
            else:
                value = 0 if choice == 0 else spares[choice % 2] | URW
            pde = gt.read(gt.entry(gva, 2))
            if level == 1 and not pde & P.PTE_P:
                continue
            entry = gt.entry(gva, level)
            v.access(TABLE_WINDOW + entry, "write", 8, value.to_bytes(8, "little"))
        elif s[0] == "invlpg":
            vm.mmu.invlpg(v, int(s[2]))  # type: ignore[call-overload]
        else:
            v.set_sregs(cr3=gt.cr3 | 0x8 if not v.cr3 & 0x8 else gt.cr3)
        assert vm.check_invariants() == [], s
    assert all(
        r.fault is None or r.fault.vector == P.PF_VECTOR
        for r in [vm.vcpus[0].access(g, "read") for g in GVAS]
    )
