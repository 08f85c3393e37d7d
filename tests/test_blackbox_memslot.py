"""Black-box tests of memslots, large pages, dirty logging, pre-fault and page
tracking, written from spec/kvm-mmu.md §1-§2 and spec/kvm-mmu-2.md §5-§7.

Each expectation is derived from the spec (and, where the spec is marked
unverified, from ``virt/kvm/kvm_main.c`` / ``arch/x86/kvm/x86.c`` /
``arch/x86/kvm/mmu/mmu.c``), not from the model's code: the oracles below
re-implement the rules independently and the model is compared against them.
"""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Any

import kvmmu
import numpy as np
import pytest
from conftest import FlushRecorder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmmu import spte as S
from kvmmu.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    MemslotChange,
    Memslots,
)
from kvmmu.mmu import PFERR_USER_MASK, PFERR_WRITE_MASK
from kvmmu.mmu.fault import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
)

HVA = 0x7F00_0000_0000
LOG = KVM_MEM_LOG_DIRTY_PAGES
RO = KVM_MEM_READONLY
MB2 = 1 << 21
GB = 1 << 30
U64 = (1 << 64) - 1
USER_MEM_SLOTS = 32764  # KVM_MEM_SLOTS_NUM (SHRT_MAX) - 3 internal slots (§1.2)
MAX_NR_PAGES = (1 << 31) - 1  # KVM_MEM_MAX_NR_PAGES (§1.2)
READ = PFERR_USER_MASK
WRITE = PFERR_WRITE_MASK | PFERR_USER_MASK
FETCH = PFERR_FETCH_MASK | PFERR_USER_MASK


def _err(fn: Any, *a: Any, **kw: Any) -> kvmmu.KvmError:
    with pytest.raises(kvmmu.KvmError) as ei:
        fn(*a, **kw)
    return ei.value


def _check_no(e: kvmmu.KvmError) -> str | None:
    m = re.search(r"check (\w+)\)", e.message)
    return m.group(1) if m else None


# =====================================================================
# §1.3: validation order, an independent oracle
# =====================================================================
class Oracle:
    """spec/kvm-mmu.md §1.3 checks 2-16 and §1.5 (max gfn), from the table alone."""

    def __init__(self, nr_as: int, max_gfn: int) -> None:
        self.nr_as = nr_as
        self.max_gfn = max_gfn
        # as_id -> id -> (base_gfn, npages, hva, flags)
        self.slots: dict[int, dict[int, tuple[int, int, int, int]]] = {a: {} for a in range(nr_as)}

    def classify(
        self, slot: int, flags: int, gpa: int, size: int, hva: int, region2: bool
    ) -> tuple[int, str | None] | str:
        """(errno, check) on failure, else the change name or 'NOOP'."""
        if not region2 and flags & ~(LOG | RO):
            return errno.EINVAL, "2"
        if (slot & 0xFFFF) >= USER_MEM_SLOTS:
            return errno.EINVAL, "3"
        if flags & ~(LOG | RO):  # no guest_memfd support on this VM
            return errno.EINVAL, "4"
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if size % 4096:
            return errno.EINVAL, "5"
        if gpa % 4096:
            return errno.EINVAL, "6"
        if hva % 4096 or hva >> 57 or hva + size > (1 << 47) - 4096:
            return errno.EINVAL, "7"
        if as_id >= self.nr_as:
            return errno.EINVAL, "9"
        if gpa + size > U64:
            return errno.EINVAL, "10"
        npages = size >> 12
        if npages > MAX_NR_PAGES:
            return errno.EINVAL, "11"
        old = self.slots[as_id].get(id_)
        base = gpa >> 12
        if size == 0:
            if old is None:
                return errno.EINVAL, "12"
            return "DELETE"
        if old is None:
            change = "CREATE"
        else:
            obase, onp, ohva, oflags = old
            if hva != ohva or npages != onp or (flags ^ oflags) & RO:
                return errno.EINVAL, "15"
            if base != obase:
                change = "MOVE"
            elif flags != oflags:
                change = "FLAGS_ONLY"
            else:
                return "NOOP"
        for oid, (obase, onp, _h, _f) in self.slots[as_id].items():
            if oid != id_ and obase < base + npages and base < obase + onp:
                return errno.EEXIST, "16"
        if base + npages - 1 > self.max_gfn:
            return errno.EINVAL, None  # §1.5, x86 kvm_arch_prepare_memory_region
        return change

    def apply(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if size == 0:
            del self.slots[as_id][id_]
        else:
            self.slots[as_id][id_] = (gpa >> 12, size >> 12, hva, flags)


_SLOTS = st.sampled_from(
    [0, 1, 2, 7, USER_MEM_SLOTS - 1, USER_MEM_SLOTS, 0xFFFF, 1 << 16, (1 << 16) | 2, 2 << 16,
     (2 << 16) | USER_MEM_SLOTS, 0xFFFF_0001]
)  # fmt: skip
_FLAGS = st.sampled_from([0, LOG, RO, LOG | RO, 1 << 2, 1 << 3, LOG | (1 << 9)])
_GPAS = st.sampled_from(
    [0, 0x1000, 0x80_0000, 0x20_0000, 0x800, U64 - 0xFFF, (1 << 46) - 0x1000, 1 << 46,
     0x1_0000_0000]
)  # fmt: skip
_SIZES = st.sampled_from(
    [0, 0x1000, 0x1800, 0x20_0000, 0x40_0000, (MAX_NR_PAGES + 1) << 12, MAX_NR_PAGES << 12,
     U64 - 0xFFF]
)  # fmt: skip
_HVAS = st.sampled_from([HVA, HVA + 0x20_0000, HVA + 0x10, HVA | (1 << 60), 1 << 47, 0x1000_0000])
_REQ = st.tuples(_SLOTS, _FLAGS, _GPAS, _SIZES, _HVAS, st.booleans())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nr_as=st.sampled_from([1, 2]), reqs=st.lists(_REQ, min_size=1, max_size=12))
def test_set_region_matches_spec_oracle(nr_as: int, reqs: list[tuple[Any, ...]]) -> None:
    """§1.3 checks in order (first failure decides), §1.3 classification, §1.5 max gfn,
    and §1.4 generation arithmetic over random request sequences, several checks
    failing at once."""
    max_gfn = (1 << 34) - 1
    ms = Memslots(nr_as_ids=nr_as)
    orc = Oracle(nr_as, max_gfn)
    gens = list(range(nr_as))  # kvm_create_vm: address space i starts at i
    for slot, flags, gpa, size, hva, region2 in reqs:
        want = orc.classify(slot, flags, gpa, size, hva, region2)
        before = [ms.generation_of(a) for a in range(nr_as)]
        pages = ms.nr_memslot_pages
        if isinstance(want, tuple):
            e = _err(
                ms.set_memory_region, slot, flags, gpa, size, hva, region2=region2, max_gfn=max_gfn
            )
            assert e.errno == want[0], (want, e.message)
            if want[1] is not None:
                assert _check_no(e) == want[1], (want, e.message)
            assert [ms.generation_of(a) for a in range(nr_as)] == before
            assert ms.nr_memslot_pages == pages
            continue
        prep = ms.prepare(slot, flags, gpa, size, hva, region2=region2, max_gfn=max_gfn)
        got = "NOOP" if prep.change is None else prep.change.name
        assert got == want
        ms.set_memory_region(slot, flags, gpa, size, hva, region2=region2, max_gfn=max_gfn)
        orc.apply(slot, flags, gpa, size, hva)
        as_id = slot >> 16
        # §1.4: each swap adds nr_as; DELETE/MOVE swap twice (INVALID copy first)
        swaps = {"NOOP": 0, "CREATE": 1, "FLAGS_ONLY": 1, "DELETE": 2, "MOVE": 2}[want]
        gens[as_id] += swaps * nr_as
        assert [ms.generation_of(a) for a in range(nr_as)] == gens
        for a in range(nr_as):
            assert ms.generation_of(a) % nr_as == a
        # §1.4 nr_memslot_pages tracks CREATE/DELETE only
        assert ms.nr_memslot_pages == sum(v[1] for d in orc.slots.values() for v in d.values())
        assert ms.nr_memslots_dirty_logging == sum(
            1 for d in orc.slots.values() for v in d.values() if v[3] & LOG
        )
    for a in range(nr_as):
        got_slots = {s.id: (s.base_gfn, s.npages, s.userspace_addr, s.flags) for s in ms.slots(a)}
        assert got_slots == orc.slots[a]


def test_errno_order_several_failures_at_once() -> None:
    """§1.3: the first failing check decides, whatever fails after it."""
    ms = Memslots()
    ms.set_memory_region(0, 0, 0, MB2, HVA)
    # 2 (v1 gmem flag) beats 3 (slot id), 5 (size), 6 (gpa), 7 (hva)
    assert _check_no(_err(ms.prepare, 40000, 1 << 2, 0x800, 5, HVA + 1)) == "2"
    # via region2 the same flag fails at 3 first (bad id), then 4
    assert _check_no(_err(ms.prepare, 40000, 1 << 2, 0x800, 5, HVA + 1, region2=True)) == "3"
    assert _check_no(_err(ms.prepare, 3, 1 << 2, 0x800, 5, HVA + 1, region2=True)) == "4"
    # 5 before 6 before 7 before 9 (as_id 2)
    assert _check_no(_err(ms.prepare, 2 << 16, 0, 0x800, 5, HVA + 1)) == "5"
    assert _check_no(_err(ms.prepare, 2 << 16, 0, 0x800, 4096, HVA + 1)) == "6"
    assert _check_no(_err(ms.prepare, 2 << 16, 0, 0, 4096, HVA + 1)) == "7"
    # 9 before 10 (gpa wrap) before 11 (too many pages)
    big = (MAX_NR_PAGES + 1) << 12
    assert _check_no(_err(ms.prepare, 2 << 16, 0, U64 - 0xFFF, big, 0x1000)) == "9"
    assert _check_no(_err(ms.prepare, 1 << 16, 0, U64 - 0xFFF, big, 0x1000)) == "10"
    assert _check_no(_err(ms.prepare, 1 << 16, 0, 0, big, 0x1000)) == "11"
    # check 12 (delete a missing slot) after 7: a bad hva still fails 7 first
    assert _check_no(_err(ms.prepare, 5, 0, 0, 0, HVA + 1)) == "7"
    assert _check_no(_err(ms.prepare, 5, 0, 0, 0, HVA)) == "12"
    # deleting slot 0 of address space 1 (exists only in AS 0) -> 12
    assert _check_no(_err(ms.prepare, 1 << 16, 0, 0, 0, HVA)) == "12"
    # 15 (resize) before 16 (overlap) for a modify
    ms.set_memory_region(1, 0, 4 * MB2, MB2, HVA + 4 * MB2)
    e = _err(ms.prepare, 1, 0, 0, 2 * MB2, HVA + 4 * MB2)
    assert e.errno == errno.EINVAL and _check_no(e) == "15"
    # a MOVE onto slot 0 -> EEXIST (16) even though it would also end past max gfn? no:
    # overlap (16) precedes the arch check (19)
    e = _err(ms.prepare, 1, 0, 0, MB2, HVA + 4 * MB2, max_gfn=0x100)
    assert e.errno == errno.EEXIST
    # READONLY toggle on an existing slot is refused (15) even with LOG toggled too
    e = _err(ms.prepare, 1, RO | LOG, 4 * MB2, MB2, HVA + 4 * MB2)
    assert _check_no(e) == "15"


def test_delete_ignores_flags_gpa_but_not_flag_validity() -> None:
    """§1.3: DELETE is memory_size 0; checks 2-11 still run on the other fields,
    but gpa/hva/flags need not match the slot (only check 12 looks at the slot)."""
    ms = Memslots()
    ms.set_memory_region(3, LOG, 0x40_0000, MB2, HVA)
    # different gpa / hva / flags (valid ones): still a DELETE
    prep = ms.prepare(3, RO, 0x1234_5000, 0, HVA + 0x20_0000)
    assert prep.change is MemslotChange.DELETE
    # an invalid flag bit is refused by check 4 before the delete
    assert _check_no(_err(ms.prepare, 3, 1 << 5, 0, 0, HVA, region2=True)) == "4"
    ms.set_memory_region(3, RO, 0x1234_5000, 0, HVA + 0x20_0000)
    assert ms.id_to_memslot(0, 3) is None
    assert ms.nr_memslot_pages == 0 and ms.nr_memslots_dirty_logging == 0


def test_overlap_rules_across_address_spaces_and_move_onto_itself() -> None:
    """§1.1/§1.3 check 16: no-overlap only within one address space; a MOVE that
    overlaps its own old range is fine (only *other* ids count)."""
    ms = Memslots()
    ms.set_memory_region(0, 0, 0, 4 * MB2, HVA)
    ms.set_memory_region((1 << 16) | 1, 0, 0, 4 * MB2, HVA)  # same gfns, AS 1
    ms.set_memory_region((1 << 16) | 0, 0, 8 * MB2, MB2, HVA)  # id 0 in AS 1 is its own slot
    assert ms.id_to_memslot(0, 0).base_gfn == 0
    assert ms.id_to_memslot(1, 0).base_gfn == 8 * MB2 >> 12
    # a MOVE of slot 0 by one page overlaps only itself
    prep = ms.prepare(0, 0, 0x1000, 4 * MB2, HVA)
    assert prep.change is MemslotChange.MOVE
    # AS 1 slot 1 moving onto AS1 slot 0's range -> EEXIST
    e = _err(ms.prepare, (1 << 16) | 1, 0, 8 * MB2 - 0x1000, 4 * MB2, HVA)
    assert e.errno == errno.EEXIST
    # adjacent (touching) ranges do not overlap
    ms.set_memory_region(2, 0, 4 * MB2, 0x1000, HVA)
    ms.set_memory_region(3, 0, 4 * MB2 + 0x1000, 0x1000, HVA)
    # gfn_to_memslot in each address space
    assert ms.gfn_to_memslot(8 * MB2 >> 12, 1).id == 0
    assert ms.gfn_to_memslot(8 * MB2 >> 12, 0) is None


@pytest.mark.parametrize("nr_as", [1, 2])
def test_generation_wraps_in_step_with_nr_as(nr_as: int) -> None:
    """§1.4: gen = (gen & ~IN_PROGRESS) + nr_as; the memslots_updated hook sees
    the new value while the stored value still has IN_PROGRESS (bit 63)."""
    ms = Memslots(nr_as_ids=nr_as)
    seen: list[tuple[int, int, int]] = []
    ms.memslots_updated.append(lambda a, g: seen.append((a, g, ms.generation_of(a))))
    ms.set_memory_region(0, 0, 0, MB2, HVA)
    ms.set_memory_region(0, LOG, 0, MB2, HVA)  # FLAGS_ONLY
    ms.set_memory_region(0, LOG, MB2, MB2, HVA)  # MOVE
    ms.set_memory_region(0, 0, 0, 0, HVA)  # DELETE
    gens = [g for (_a, g, _s) in seen]
    assert gens == [nr_as * k for k in range(1, 7)]
    assert all(s == (g - nr_as) | (1 << 63) for (_a, g, s) in seen)
    assert ms.generation_of(0) == 6 * nr_as
    if nr_as == 2:
        assert ms.generation_of(1) == 1


# =====================================================================
# §5.1: lpage_info initial values and runtime counts
# =====================================================================
def _lpage_oracle(base: int, npages: int, hva: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for level in (2, 3):
        sh = 9 * (level - 1)
        p = 1 << sh
        n = ((base + npages - 1) >> sh) - (base >> sh) + 1
        vals = [0] * n
        if base % p:
            vals[0] = 1
        if (base + npages) % p:
            vals[-1] = 1
        if (base ^ (hva >> 12)) % p:
            vals = [1] * n
        out[level] = vals
    return out


@settings(max_examples=150, deadline=None)
@given(
    base=st.one_of(
        st.integers(0, 1 << 20),
        st.sampled_from([0, 511, 512, 513, 262143, 262144, 262145, (1 << 18) * 3 - 1]),
    ),
    npages=st.one_of(
        st.integers(1, 3000), st.sampled_from([1, 511, 512, 513, 262144, 262145, 524288])
    ),
    hva_off=st.one_of(st.integers(0, 1 << 19), st.sampled_from([0, 1, 512, 262144, 511])),
)
def test_lpage_info_matches_spec(base: int, npages: int, hva_off: int) -> None:
    """§5.1: one entry per overlapping huge frame; head/tail partial frames and
    GPA/HVA incongruence seed the disallow counts; the same on CREATE and MOVE."""
    hva = (1 << 40) + (hva_off << 12)
    ms = Memslots()
    slot = ms.set_memory_region(0, 0, base << 12, npages << 12, hva)
    want = _lpage_oracle(base, npages, hva)
    for level in (2, 3):
        assert slot.lpage_info[level].tolist() == want[level], level
    # MOVE to a new base: metadata recomputed for the new geometry (§1.5)
    nb = base + 1 + (npages | 511) + 7
    moved = ms.set_memory_region(0, 0, nb << 12, npages << 12, hva)
    want = _lpage_oracle(nb, npages, hva)
    for level in (2, 3):
        assert moved.lpage_info[level].tolist() == want[level], level


def _vm(size: int = 16 << 20, page_level: int = 2, **cfg: Any) -> Any:
    vm = kvmmu.VM(kvmmu.VMConfig(**cfg))
    vm.host.mmap_anon(HVA, 64 << 20, page_level=page_level)
    return vm


def _level(vm: Any, gpa: int, as_id: int = 0) -> int | None:
    t = vm.mmu.translate(gpa, as_id)
    return None if t is None else t[1]


def _spte(vm: Any, gpa: int) -> int:
    t = vm.mmu.translate(gpa)
    assert t is not None, hex(gpa)
    return t[0]


def test_fault_level_follows_slot_head_tail_and_congruence() -> None:
    """§5.1 + §3.6: a huge SPTE only where disallow_lpage is 0 at that level."""
    vm = _vm()
    # slot from gpa 1M to 9M, hva congruent modulo 2M: frames [0,2M) and [8M,10M)
    # are partial -> 4K; [2M,8M) -> 2M
    vm.set_user_memory_region(0, 0, 1 << 20, 8 << 20, HVA + (1 << 20))
    vcpu = vm.vcpus[0]
    for gpa, want in [(1 << 20, 1), (MB2, 2), (3 * MB2 + 0x5000, 2), (8 << 20, 1)]:
        assert vm.mmu.page_fault(vcpu, gpa, READ) == RET_PF_FIXED
        assert _level(vm, gpa) == want, hex(gpa)
    # same slot geometry but hva off by 4K: no huge page anywhere
    vm2 = _vm()
    vm2.set_user_memory_region(0, 0, 0, 8 << 20, HVA + 0x1000)
    for gpa in (0, MB2, 3 * MB2):
        vm2.mmu.page_fault(vm2.vcpus[0], gpa, READ)
        assert _level(vm2, gpa) == 1


def test_track_add_remove_counts_at_partial_head_frame() -> None:
    """§2.3 item 1 / §5.1: tracking adds 1 to disallow at 2M and 1G on top of the
    alignment seed; removing takes exactly that 1 back (still disallowed)."""
    vm = _vm()
    vm.set_user_memory_region(0, 0, 1 << 20, 8 << 20, HVA + (1 << 20))
    slot = vm.slot_of(1 << 20)
    g_head, g_mid = (1 << 20) >> 12, (3 * MB2) >> 12
    assert slot.lpage_info[2].tolist() == [1, 0, 0, 0, 1]
    assert slot.lpage_info[3].tolist() == [1]
    vm.write_track_add_gfn(g_head)
    vm.write_track_add_gfn(g_head)
    vm.write_track_add_gfn(g_mid)
    # gfn_to_index: (gfn >> 9) - (base_gfn >> 9); 3M is frame 1, 6M frame 3
    assert slot.lpage_info[2].tolist() == [3, 0, 0, 1, 1]
    assert slot.lpage_info[3].tolist() == [4]
    vm.write_track_remove_gfn(g_head)
    vm.write_track_remove_gfn(g_head)
    vm.write_track_remove_gfn(g_mid)
    assert slot.lpage_info[2].tolist() == [1, 0, 0, 0, 1]
    assert slot.lpage_info[3].tolist() == [1]
    # the middle frame can map 2M again once the count is back to 0
    vm.mmu.page_fault(vm.vcpus[0], 3 * MB2, READ)
    assert _level(vm, 3 * MB2) == 2


def test_flags_only_keeps_counts_move_resets_them() -> None:
    """§1.5 / §2.5: FLAGS_ONLY carries arch metadata (write-track and disallow counts);
    MOVE starts fresh."""
    vm = _vm()
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    vm.write_track_add_gfn(0x201)
    vm.set_user_memory_region(0, LOG, 0, 8 << 20, HVA)  # FLAGS_ONLY
    slot = vm.slot_of(0)
    assert vm.page_track.count(0x201) == 1
    assert slot.lpage_info[2].tolist() == [0, 1, 0, 0]
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)  # FLAGS_ONLY back
    assert vm.page_track.count(0x201) == 1
    vm.set_user_memory_region(0, 0, 16 << 20, 8 << 20, HVA)  # MOVE
    slot = vm.slot_of(16 << 20)
    assert vm.page_track.count((16 << 20 >> 12) + 0x201) == 0
    assert slot.lpage_info[2].tolist() == [0, 0, 0, 0]
    # and removing the (now gone) tracking is refused, not an underflow
    with pytest.raises(kvmmu.KvmError):
        vm.write_track_remove_gfn((16 << 20 >> 12) + 0x201)


# =====================================================================
# §7: dirty logging
# =====================================================================
def test_dirty_logged_slot_maps_4k_and_logs_only_writes() -> None:
    """§7.2 / §5.1: huge pages are never used in a dirty-logged slot; a write
    fault marks the page dirty, a fault that leaves the SPTE read-only does not."""
    vm = _vm()
    vm.set_user_memory_region(0, LOG, 0, 8 << 20, HVA)
    vcpu = vm.vcpus[0]
    vm.mmu.page_fault(vcpu, MB2, READ)
    assert _level(vm, MB2) == 1
    # a read fault may map writable (host page writable); make_spte logs the page
    # dirty exactly when the new SPTE is writable (§7.2, slow path)
    writable = bool(_spte(vm, MB2) & S.PT_WRITABLE_MASK)
    assert vm.get_dirty_log(0).tolist() == ([MB2 >> 12] if writable else [])
    vm.mmu.page_fault(vcpu, MB2 + 0x3000, WRITE)
    assert _level(vm, MB2 + 0x3000) == 1
    assert vm.get_dirty_log(0).tolist() == [(MB2 >> 12) + 3]
    # harvested: re-protected, so the next write is logged again (§7.3)
    assert not _spte(vm, MB2 + 0x3000) & S.PT_WRITABLE_MASK
    vm.mmu.page_fault(vcpu, MB2 + 0x3000, WRITE | PFERR_PRESENT_MASK)
    assert vm.get_dirty_log(0).tolist() == [(MB2 >> 12) + 3]
    assert vm.get_dirty_log(0).tolist() == []


@pytest.mark.parametrize("eager", [True, False])
def test_enable_logging_on_huge_mapping_then_disable_restores_huge(eager: bool) -> None:
    """§7.1 enable: eager split to 4K (if enabled), write-protect; writes then
    dirty exactly one 4K page.  Disable: huge mappings come back (§5.3)."""
    vm = _vm(eager_page_split=eager)
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    vcpu = vm.vcpus[0]
    vm.mmu.page_fault(vcpu, MB2, WRITE)
    assert _level(vm, MB2) == 2 and _spte(vm, MB2) & S.PT_WRITABLE_MASK
    vm.set_user_memory_region(0, LOG, 0, 8 << 20, HVA)
    t = vm.mmu.translate(MB2 + 0x5000)
    assert t is not None and not t[0] & S.PT_WRITABLE_MASK
    assert t[1] == (1 if eager else 2)
    r = vm.mmu.page_fault(vcpu, MB2 + 0x5000, WRITE | PFERR_PRESENT_MASK)
    assert r == RET_PF_FIXED
    assert _level(vm, MB2 + 0x5000) == 1
    assert _spte(vm, MB2 + 0x5000) & S.PT_WRITABLE_MASK
    assert vm.get_dirty_log(0).tolist() == [(MB2 >> 12) + 5]
    # the rest of the old huge page is not writable (no silent dirtying)
    t = vm.mmu.translate(MB2 + 0x6000)
    assert t is None or not t[0] & S.PT_WRITABLE_MASK
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    assert vm.slot_of(0).dirty_bitmap is None
    vm.mmu.page_fault(vcpu, MB2 + 0x5000, READ)
    assert _level(vm, MB2 + 0x5000) == 2


def test_readonly_slot_with_logging_and_dirty_log_errors() -> None:
    """§1.3 check 4: READONLY|LOG_DIRTY is allowed; §7.3 GET_DIRTY_LOG errors:
    EINVAL (as_id, id >= KVM_USER_MEM_SLOTS) before ENOENT (no slot / no bitmap)."""
    vm = _vm()
    vm.set_user_memory_region(0, LOG | RO, 0, 4 << 20, HVA)
    vm.set_user_memory_region(1, 0, 4 << 20, 4 << 20, HVA + (4 << 20))
    vm.set_user_memory_region((1 << 16) | 1, LOG, 0, 4 << 20, HVA)
    assert vm.get_dirty_log(0).tolist() == []
    assert _err(vm.get_dirty_log, 1).errno == errno.ENOENT  # no bitmap
    assert _err(vm.get_dirty_log, 9).errno == errno.ENOENT  # no slot
    assert _err(vm.get_dirty_log, USER_MEM_SLOTS).errno == errno.EINVAL
    assert _err(vm.get_dirty_log, 0, as_id=2).errno == errno.EINVAL
    assert vm.get_dirty_log(1, as_id=1).tolist() == []
    # a write to the read-only slot is emulated (MMIO exit), never logged
    r = vm.mmu.page_fault(vm.vcpus[0], 0x3000, WRITE)
    assert r == RET_PF_EMULATE
    assert vm.get_dirty_log(0).tolist() == []
    # KVM itself writing AS 1 guest memory logs in the AS 1 slot only
    slot1 = vm.memslots.id_to_memslot(1, 1)
    vm.memslots.mark_page_dirty(slot1, 7)
    assert vm.get_dirty_log(1, as_id=1).tolist() == [7]
    assert vm.get_dirty_log(0).tolist() == []


def test_dirty_bitmap_survives_move_and_is_dropped_when_logging_stops() -> None:
    """§1.4 kvm_prepare_memory_region: LOG kept -> old bitmap reused (also on MOVE);
    LOG cleared -> NULL; re-enabled -> a fresh, empty bitmap."""
    vm = _vm()
    vm.set_user_memory_region(0, LOG, 0, 4 << 20, HVA)
    vm.mmu.page_fault(vm.vcpus[0], 0x5000, WRITE)
    vm.set_user_memory_region(0, LOG, 32 << 20, 4 << 20, HVA)  # MOVE
    assert vm.get_dirty_log(0).tolist() == [(32 << 20 >> 12) + 5]
    vm.mmu.page_fault(vm.vcpus[0], (32 << 20) + 0x6000, WRITE)
    vm.set_user_memory_region(0, 0, 32 << 20, 4 << 20, HVA)
    vm.set_user_memory_region(0, LOG, 32 << 20, 4 << 20, HVA)
    assert vm.get_dirty_log(0).tolist() == []
    assert vm.memslots.nr_memslots_dirty_logging == 1


def test_initially_set_bitmap_all_ones_and_no_protection_on_enable() -> None:
    """§1.4 + §7.1: manual-protect + INITIALLY_SET -> bitmap starts all set (exactly
    npages bits), enabling logging neither splits nor write-protects."""
    vm = _vm()
    vm.memslots.manual_dirty_log_protect = True
    vm.memslots.dirty_log_initially_set = True
    npages = 1000  # not a multiple of 64
    vm.set_user_memory_region(0, 0, 0, npages << 12, HVA)
    vm.mmu.page_fault(vm.vcpus[0], 0x1000, WRITE)
    w_before = _spte(vm, 0x1000)
    vm.set_user_memory_region(0, LOG, 0, npages << 12, HVA)
    assert _spte(vm, 0x1000) == w_before and w_before & S.PT_WRITABLE_MASK
    got = vm.get_dirty_log(0)
    assert got.tolist() == list(range(npages))
    assert vm.get_dirty_log(0).tolist() == list(range(npages))  # GET only copies
    # CLEAR: first_page % 64 -> EINVAL; num_pages % 64 only allowed at the slot end
    assert _err(vm.clear_dirty_log, 0, 32, 64).errno == errno.EINVAL
    assert _err(vm.clear_dirty_log, 0, 0, 100).errno == errno.EINVAL
    assert _err(vm.clear_dirty_log, 0, 960, 41).errno == errno.EINVAL
    assert _err(vm.clear_dirty_log, 0, 1024, 0).errno == errno.EINVAL
    cleared = vm.clear_dirty_log(0, 960, 40)
    assert cleared.tolist() == list(range(960, 1000))
    assert not _spte(vm, 0x1000) & 0  # untouched page 1 not in the cleared range
    cleared = vm.clear_dirty_log(0, 0, 64)
    assert cleared.tolist() == list(range(64))
    assert not _spte(vm, 0x1000) & S.PT_WRITABLE_MASK  # re-protected by CLEAR
    assert vm.get_dirty_log(0).tolist() == list(range(64, 960))


# =====================================================================
# §5.2: NX huge pages
# =====================================================================
def test_nx_huge_pages_exec_maps_4k_and_blocks_rehuge() -> None:
    """§5.2: huge SPTEs are never executable; an exec fault maps 4K; a later
    read fault in that region does not re-create the huge page."""
    vm = _vm(nx_huge_pages=True)
    vm.set_user_memory_region(0, 0, 0, 16 << 20, HVA)
    vcpu = vm.vcpus[0]
    fmt = vm.spte_format
    vm.mmu.page_fault(vcpu, MB2, READ)
    spte = _spte(vm, MB2)
    assert _level(vm, MB2) == 2 and not spte & fmt.x_mask
    vm.mmu.page_fault(vcpu, 2 * MB2 + 0x3000, FETCH)
    assert _level(vm, 2 * MB2 + 0x3000) == 1 and _spte(vm, 2 * MB2 + 0x3000) & fmt.x_mask
    vm.mmu.page_fault(vcpu, 2 * MB2 + 0x8000, READ)
    assert _level(vm, 2 * MB2 + 0x8000) == 1
    # an exec fault inside an existing non-X huge mapping splits it to 4K
    # (the split children already get X back from make_small_spte, so the
    # target-level SPTE may be unchanged: SPURIOUS is as good as FIXED)
    r = vm.mmu.page_fault(vcpu, MB2 + 0x2000, FETCH | PFERR_PRESENT_MASK)
    assert r in (RET_PF_FIXED, RET_PF_SPURIOUS)
    assert _level(vm, MB2 + 0x2000) == 1 and _spte(vm, MB2 + 0x2000) & fmt.x_mask
    # without the mitigation the exec fault maps huge and executable
    vm2 = _vm(nx_huge_pages=False)
    vm2.set_user_memory_region(0, 0, 0, 16 << 20, HVA)
    vm2.mmu.page_fault(vm2.vcpus[0], MB2, FETCH)
    assert _level(vm2, MB2) == 2 and _spte(vm2, MB2) & vm2.spte_format.x_mask


# =====================================================================
# lookups, MMU-notifier ranges, zaps per address space
# =====================================================================
_OPS = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, (1 << 16) | 0, (1 << 16) | 1]),
        st.integers(0, 40),  # base, in 64-page units
        st.sampled_from([0, 1, 3, 8]),  # size in 64-page units (0 = delete)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=120, deadline=None)
@given(ops=_OPS, probes=st.lists(st.integers(0, 64 * 50), min_size=5, max_size=30))
def test_gfn_to_memslot_matches_brute_force(
    ops: list[tuple[int, int, int]], probes: list[int]
) -> None:
    """§1.1: slot lookup per address space, after CREATE/MOVE/DELETE sequences
    (incl. a stale last-used cache)."""
    ms = Memslots()
    for slot, base, size in ops:
        old = ms.id_to_memslot(slot >> 16, slot & 0xFFFF)
        hva = HVA if old is None else old.userspace_addr
        npages = size * 64 if old is None or size == 0 else old.npages
        with contextlib.suppress(kvmmu.KvmError):
            ms.set_memory_region(slot, 0, base * 64 << 12, npages << 12, hva)
        for g in probes:
            for a in (0, 1):
                want = [s for s in ms.slots(a) if s.base_gfn <= g < s.base_gfn + s.npages]
                assert len(want) <= 1
                got = ms.gfn_to_memslot(g, a)
                assert got is (want[0] if want else None), (g, a)


def test_mmu_notifier_zaps_every_alias_in_every_address_space() -> None:
    """kvm_handle_hva_range: every slot of every address space that maps the hva
    range is unmapped (slots may alias the same hva)."""
    vm = _vm(page_level=1)
    vm.set_user_memory_region(0, 0, 0, 4 << 20, HVA)
    vm.set_user_memory_region(1, 0, 16 << 20, 4 << 20, HVA)  # alias of slot 0
    vm.set_user_memory_region((1 << 16) | 0, 0, 32 << 20, 4 << 20, HVA)
    vcpu = vm.vcpus[0]
    vm.mmu.page_fault(vcpu, 0x5000, READ)
    vm.mmu.page_fault(vcpu, (16 << 20) + 0x5000, READ)
    vm.mmu.page_fault(vcpu, 0x6000, READ)
    vm.mmu.page_fault(vcpu, (32 << 20) + 0x5000, READ, as_id=1)
    assert _level(vm, (32 << 20) + 0x5000, as_id=1) == 1
    vm.invalidate_hva_range(HVA + 0x5000, HVA + 0x6000)
    assert _level(vm, 0x5000) is None
    assert _level(vm, (16 << 20) + 0x5000) is None
    assert _level(vm, (32 << 20) + 0x5000, as_id=1) is None
    assert _level(vm, 0x6000) == 1  # outside the range


@pytest.mark.parametrize("zap_all", [True, False])
def test_delete_in_one_address_space_leaves_the_other(zap_all: bool) -> None:
    """§1.1: slots in different address spaces are unrelated; §1.4 DELETE zaps
    the deleted slot's SPTEs - and, with KVM_X86_QUIRK_SLOT_ZAP_ALL (default on,
    kvm_arch_flush_shadow_memslot -> kvm_mmu_zap_all_fast), everything."""
    vm = _vm(page_level=1, quirks={"slot_zap_all": zap_all})
    vm.set_user_memory_region(0, 0, 0, 4 << 20, HVA)
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 4 << 20, HVA + (8 << 20))
    vcpu = vm.vcpus[0]
    vm.mmu.page_fault(vcpu, 0x5000, READ)
    vm.mmu.page_fault(vcpu, 0x5000, READ, as_id=1)
    vm.set_user_memory_region((1 << 16) | 0, 0, 0, 0, 0)
    assert _level(vm, 0x5000) == (None if zap_all else 1)
    assert _level(vm, 0x5000, as_id=1) is None
    assert vm.memslots.generation_of(0) == 2 and vm.memslots.generation_of(1) == 1 + 2 + 4


def test_mmio_spte_goes_stale_when_a_slot_appears() -> None:
    """§1.4 / §3.10: a new memslot bumps the generation, so an MMIO SPTE made for
    the gfn before is not trusted: the next access maps the new memory."""
    vm = _vm(page_level=1)
    vcpu = vm.vcpus[0]
    assert vm.mmu.page_fault(vcpu, 0x5000, READ) == RET_PF_EMULATE
    vm.set_user_memory_region(0, 0, 0, 4 << 20, HVA)
    r = vm.mmu.page_fault(vcpu, 0x5000, READ | PFERR_RSVD_MASK)
    assert r in (RET_PF_FIXED, RET_PF_SPURIOUS) or r == 1  # RETRY then map
    for _ in range(3):
        if _level(vm, 0x5000) is not None and not vm.mmu.translate(0x5000)[0] & 1 << 51:
            break
        vm.mmu.page_fault(vcpu, 0x5000, READ)
    t = vm.mmu.translate(0x5000)
    assert t is not None and t[0] & vm.spte_format.mmu_present_mask


def test_readonly_slot_logging_toggle_does_nothing_to_sptes() -> None:
    """§7.1 step 2: for a READONLY slot nothing beyond the CPU dirty-logging
    update happens (no split, no write-protect, no flush)."""
    vm = _vm()
    vm.set_user_memory_region(0, RO, 0, 8 << 20, HVA)
    vm.mmu.page_fault(vm.vcpus[0], MB2, READ)
    before = vm.mmu.translate(MB2)
    assert before is not None and before[1] == 2

    rec = FlushRecorder()
    vm.register_plugin(rec, "rec")
    vm.set_user_memory_region(0, RO | LOG, 0, 8 << 20, HVA)
    assert vm.mmu.translate(MB2) == before and not rec.ranges
    assert vm.memslots.nr_memslots_dirty_logging == 1
    vm.set_user_memory_region(0, RO, 0, 8 << 20, HVA)
    assert vm.mmu.translate(MB2) == before and not rec.ranges
    assert vm.memslots.nr_memslots_dirty_logging == 0


# =====================================================================
# §6: KVM_PRE_FAULT_MEMORY
# =====================================================================
def test_prefault_progress_and_errors() -> None:
    """§6: progress to the end of the mapping; partial progress is success;
    ENOENT for no memslot (incl. a slot only in address space 1 and gfns past
    max gfn); EINVAL for gpa+size wrapping to exactly 2^64."""
    vm = _vm()
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    vm.set_user_memory_region((1 << 16) | 1, 0, 16 << 20, 4 << 20, HVA)
    assert vm.pre_fault_memory(MB2 + 0x3000, 0x1000) == 0x1000
    assert _level(vm, MB2) == 2
    assert vm.pre_fault_memory(6 << 20, 12 << 20) == 2 << 20  # stops at the slot end
    assert _err(vm.pre_fault_memory, 8 << 20, 0x1000).errno == errno.ENOENT
    assert _err(vm.pre_fault_memory, 16 << 20, 0x1000).errno == errno.ENOENT
    assert _err(vm.pre_fault_memory, 1 << 50, 0x1000).errno == errno.ENOENT
    assert _err(vm.pre_fault_memory, U64 + 1 - 0x1000, 0x1000).errno == errno.EINVAL
    assert _err(vm.pre_fault_memory, 0, 0).errno == errno.EINVAL
    # huge mapping already there: SPURIOUS, still progress to its end
    assert vm.pre_fault_memory(MB2 + 0x5000, 4 << 20) == 4 << 20


def test_prefault_tracked_dirty_logged_and_readonly() -> None:
    """§6 read-fault semantics: a tracked gfn gets a read-only 4K SPTE (§2.3);
    a dirty-logged slot is mapped at 4K (§7.2), one page per step; a READONLY
    slot maps read-only, huge where allowed."""
    vm = _vm()
    vm.set_user_memory_region(0, 0, 0, 8 << 20, HVA)
    vm.set_user_memory_region(1, LOG, 16 << 20, 4 << 20, HVA + (16 << 20))
    vm.set_user_memory_region(2, RO, 32 << 20, 4 << 20, HVA + (32 << 20))
    vm.write_track_add_gfn(0x205)
    assert vm.pre_fault_memory(0x205000, 0x1000) == 0x1000
    t = vm.mmu.translate(0x205000)
    assert t is not None and t[1] == 1 and not t[0] & S.PT_WRITABLE_MASK
    assert vm.pre_fault_memory((16 << 20) + 0x3000, 4 << 20) == (4 << 20) - 0x3000
    for off in (0x3000, 0x10000, MB2 + 0x7000):
        assert _level(vm, (16 << 20) + off) == 1
    assert vm.pre_fault_memory(32 << 20, 4 << 20) == 4 << 20
    t = vm.mmu.translate((32 << 20) + 0x1000)
    assert t is not None and t[1] == 2 and not t[0] & S.PT_WRITABLE_MASK


def test_dirty_log_harvest_reprotects_only_its_address_space() -> None:
    """§7.3: KVM_GET_DIRTY_LOG on an address-space-1 slot re-protects that slot's
    SPTEs; the same gfn in address space 0 (another slot) keeps W."""
    vm = _vm(page_level=1)
    vm.set_user_memory_region(0, 0, 0, 4 << 20, HVA)
    vm.set_user_memory_region((1 << 16) | 0, LOG, 0, 4 << 20, HVA + (8 << 20))
    vcpu = vm.vcpus[0]
    vm.mmu.page_fault(vcpu, 0x5000, WRITE)
    vm.mmu.page_fault(vcpu, 0x5000, WRITE, as_id=1)
    assert _err(vm.get_dirty_log, 0).errno == errno.ENOENT  # AS 0 slot 0 does not log
    assert vm.get_dirty_log(0, as_id=1).tolist() == [5]
    t1 = vm.mmu.translate(0x5000, 1)
    assert t1 is not None and not t1[0] & S.PT_WRITABLE_MASK
    assert _spte(vm, 0x5000) & S.PT_WRITABLE_MASK


@pytest.mark.parametrize("zap_all", [True, False])
def test_shadow_move_of_slot_holding_guest_tables_starts_fresh(zap_all: bool) -> None:
    """§2.4 + §1.5: shadowed guest tables raise write-track and disallow counts
    in their slot; a MOVE zaps them (counts undone on the old slot) and the new
    slot starts with zero counts; invariants hold throughout."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_shadow import GUEST_SIZE, GuestTables, make_vm
    from test_shadow import HVA as SHVA

    vm = make_vm(quirks={"slot_zap_all": zap_all})
    vm.host.mmap_anon(SHVA + GUEST_SIZE, GUEST_SIZE)
    vm.set_user_memory_region(1, 0, GUEST_SIZE, GUEST_SIZE, SHVA + GUEST_SIZE)
    gt = GuestTables(vm, base=GUEST_SIZE + 0x10000)  # the tables live in slot 1
    for i in range(4):
        gt.map(0x400000 + i * 0x1000, 0x200000 + i * 0x1000)
    gt.map_tables()
    gt.start()
    vm.vcpus[0].access(0x400000, "read")
    slot = vm.memslots.id_to_memslot(0, 1)
    assert vm.page_track.count(gt.cr3 >> 12) == 1  # root table: write-tracked (§2.4)
    assert slot.lpage_info[2][0] == 4  # 4 shadowed tables in the first 2M frame
    vm.set_user_memory_region(1, 0, 64 << 20, GUEST_SIZE, SHVA + GUEST_SIZE)  # MOVE
    moved = vm.memslots.id_to_memslot(0, 1)
    assert moved.lpage_info[2].tolist() == [0] * (GUEST_SIZE >> 21)
    assert int(np.asarray(moved.gfn_write_track).sum()) == 0
    assert vm.check_invariants() == []
