"""Stateful property test: random memslot ioctls against a plain reference model.

The reference re-states spec/kvm-mmu.md §1.3 checks 2-16 and §1.4 counters as
straightforward code over a dict of slots; after every step the errno (or
success) and the full resulting state must agree.
"""

from __future__ import annotations

import errno

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kvmmu.errors import KvmError
from kvmmu.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    MemslotChange,
    Memslots,
)

HVAS = [0x7F00_0000_0000, 0x7F00_0020_0000, 0x7F00_0000_1000]
MAX_GFN = (1 << 36) - 1


def reference(slots: dict, slot: int, flags: int, gpa: int, size: int, hva: int):
    """Return (errno or None, change or None); straight from the §1.3 table."""
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
        return errno.EINVAL, None  # 2
    if id_ >= KVM_USER_MEM_SLOTS:
        return errno.EINVAL, None  # 3
    if size % 4096 or gpa % 4096 or hva % 4096:
        return errno.EINVAL, None  # 5, 6, 7
    if as_id >= 2:
        return errno.EINVAL, None  # 9
    npages, base = size // 4096, gpa // 4096
    old = slots.get((as_id, id_))
    if size == 0:
        return (errno.EINVAL, None) if old is None else (None, MemslotChange.DELETE)
    if old is None:
        change = MemslotChange.CREATE
    else:
        if hva != old["hva"] or npages != old["npages"] or (flags ^ old["flags"]) & 2:
            return errno.EINVAL, None  # 15
        if base != old["base"]:
            change = MemslotChange.MOVE
        elif flags != old["flags"]:
            change = MemslotChange.FLAGS_ONLY
        else:
            return None, None
    if change in (MemslotChange.CREATE, MemslotChange.MOVE):
        for (a, i), s in slots.items():
            if (
                a == as_id
                and i != id_
                and s["base"] < base + npages
                and base < s["base"] + s["npages"]
            ):
                return errno.EEXIST, None  # 16
        if base + npages - 1 > MAX_GFN:
            return errno.EINVAL, None  # x86 §1.5
    return None, change


class MemslotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ms = Memslots()
        self.ref: dict = {}
        self.gen = [0, 1]
        self.dirty: dict = {}  # (as_id, id) -> set of gfns expected dirty

    @rule(
        as_id=st.sampled_from([0, 0, 1, 2]),
        id_=st.sampled_from([0, 1, 2, KVM_USER_MEM_SLOTS - 1, KVM_USER_MEM_SLOTS]),
        flags=st.sampled_from([0, 0, 1, 2, 3, 4]),
        gpa=st.sampled_from([0, 0x4000, 0x10000, 0x11000, 0x800, (MAX_GFN) << 12]),
        npages=st.sampled_from([0, 1, 4, 16, 0x10]),
        bad_size=st.booleans(),
        hva=st.sampled_from(HVAS),
    )
    def set_region(self, as_id, id_, flags, gpa, npages, bad_size, hva):
        slot = as_id << 16 | id_
        size = npages * 4096 + (1 if bad_size else 0)
        want_err, change = reference(self.ref, slot, flags, gpa, size, hva)
        try:
            self.ms.set_memory_region(slot, flags, gpa, size, hva, max_gfn=MAX_GFN)
            got = None
        except KvmError as e:
            got = e.errno
        assert got == want_err, (slot, flags, gpa, size, hva)
        if want_err is not None or change is None:
            return
        key = (as_id, id_)
        swaps = 2 if change in (MemslotChange.DELETE, MemslotChange.MOVE) else 1
        self.gen[as_id] += 2 * swaps
        if change is MemslotChange.DELETE:
            del self.ref[key]
            self.dirty.pop(key, None)
            return
        old = self.ref.get(key)
        self.ref[key] = dict(base=gpa >> 12, npages=size >> 12, flags=flags, hva=hva)
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.dirty.pop(key, None)
        elif old is None or not old["flags"] & KVM_MEM_LOG_DIRTY_PAGES:
            self.dirty[key] = set()
        # else: the old bitmap is reused (relative offsets survive a MOVE)
        elif old["base"] != gpa >> 12:
            self.dirty[key] = {g - old["base"] + (gpa >> 12) for g in self.dirty[key]}

    @rule(data=st.data())
    def dirty_a_page(self, data):
        if not self.ref:
            return
        key = data.draw(st.sampled_from(sorted(self.ref)))
        s = self.ref[key]
        gfn = s["base"] + data.draw(st.integers(0, s["npages"] - 1))
        slot = self.ms.gfn_to_memslot(gfn, key[0])
        assert slot is not None and slot.id == key[1]
        self.ms.mark_page_dirty(slot, gfn)
        if key in self.dirty:
            self.dirty[key].add(gfn)

    @rule(data=st.data())
    def harvest(self, data):
        key = data.draw(st.sampled_from([(0, 0), (0, 1), (1, 2), (1, 0)]))
        try:
            got = self.ms.get_dirty_log(*key)
        except KvmError as e:
            assert e.errno == errno.ENOENT and key not in self.dirty
            return
        assert got.tolist() == sorted(self.dirty[key])
        self.dirty[key] = set()

    @invariant()
    def state_matches(self):
        got = {
            (s.as_id, s.id): dict(
                base=s.base_gfn, npages=s.npages, flags=s.flags, hva=s.userspace_addr
            )
            for s in self.ms
        }
        assert got == self.ref
        assert [self.ms.generation_of(0), self.ms.generation_of(1)] == self.gen
        assert self.ms.nr_memslot_pages == sum(s["npages"] for s in self.ref.values())
        assert self.ms.nr_memslots_dirty_logging == sum(
            1 for s in self.ref.values() if s["flags"] & KVM_MEM_LOG_DIRTY_PAGES
        )
        for (as_id, _id), s in self.ref.items():
            for gfn in (s["base"], s["base"] + s["npages"] - 1):
                hit = self.ms.gfn_to_memslot(gfn, as_id)
                assert hit is not None and hit.id == _id and not hit.is_invalid
            slot = self.ms.id_to_memslot(as_id, _id)
            assert (slot.dirty_bitmap is not None) == bool(s["flags"] & KVM_MEM_LOG_DIRTY_PAGES)
            assert isinstance(slot.lpage_info[2], np.ndarray)


TestMemslotMachine = MemslotMachine.TestCase
TestMemslotMachine.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
