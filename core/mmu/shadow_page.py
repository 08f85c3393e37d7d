"""Shadow pages: ``struct kvm_mmu_page`` for the shadow MMU, and their bookkeeping.

A shadow page (sp) is a row of the MMU core's :class:`~kvmmu.mmu.pool.SptePool`
plus KVM's metadata (``arch/x86/kvm/mmu/mmu_internal.h``): ``gfn``, ``role``,
``parent_ptes``, ``unsync``/``unsync_children``, ``root_count``,
``mmu_valid_gen``, ``write_flooding_count`` and the shadowed translation of
each entry (``sp->shadowed_translation``: gfn and access). This module holds
the sp lifecycle of ``arch/x86/kvm/mmu/mmu.c``: find-or-create
(``kvm_mmu_get_shadow_page``), ``account_shadowed``/``unaccount_shadowed``
(spec/kvm-mmu.md §2.4), linking, the rmap, dropping SPTEs and
``__kvm_mmu_prepare_zap_page`` (§3.14), and unsync marking (§3.12).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, NamedTuple

from kvmmu import paging
from kvmmu import spte as S
from kvmmu.errors import KvmError
from kvmmu.mmu.invalidate import InvalidateState
from kvmmu.mmu.pool import SptePool, pool_base_for

if TYPE_CHECKING:
    from kvmmu.memslot import Memslot
    from kvmmu.vcpu import VCpu

__all__ = [
    "KVM_MMU_NUM_PREV_ROOTS",
    "MmuLockContended",
    "Role",
    "ShadowBase",
    "ShadowPage",
    "SptePtr",
    "VcpuMmu",
]

#: ``KVM_MMU_NUM_PREV_ROOTS`` (kvm_host.h).
KVM_MMU_NUM_PREV_ROOTS = 3


class MmuLockContended(KvmError):
    """A suspended fault holds ``mmu_lock`` and this operation needs it.

    In KVM the caller would spin until the fault in flight drops the lock;
    a single-threaded model cannot, so it refuses: drive the suspended
    :meth:`page_fault_steps` generator to its end first, then retry.
    """

    def __init__(self, what: str) -> None:
        super().__init__(errno.EBUSY, f"{what}: mmu_lock is held by a suspended page fault")


class Role(NamedTuple):
    """``union kvm_mmu_page_role`` (mmu_internal.h / kvm_host.h).

    ``direct`` pages map a contiguous gfn range (guest huge page split, or
    guest paging off); indirect pages shadow the guest table at ``gfn``.
    ``access`` is the access accumulated above the table (``pt_access``).
    The CR0.WP / EFER.NX / SMEP / SMAP bits make a table built under one
    paging mode unusable under another (``kvm_calc_cpu_role``).
    ``has_4_byte_gpte``: the guest uses 32-bit paging; its 1024-entry tables
    are shadowed by 512-entry ones and ``quadrant`` says which part: for a
    guest PD the 1 GiB quarter (0..3, set by ``mmu_alloc_shadow_roots``), for
    a guest PT the 2 MiB half (0..1, ``kvm_mmu_child_role``).
    """

    level: int
    direct: bool
    access: int
    cr0_wp: bool
    efer_nx: bool
    smep_andnot_wp: bool
    smap_andnot_wp: bool
    has_4_byte_gpte: bool = False
    quadrant: int = 0


SptePtr = tuple["ShadowPage", int]


class ShadowPage:
    """``struct kvm_mmu_page`` of the shadow MMU (mmu_internal.h)."""

    __slots__ = (
        "access",
        "gfn",
        "gfns",
        "gpat",
        "hpa",
        "idx",
        "invalid",
        "mmu_valid_gen",
        "pae",
        "parent_ptes",
        "role",
        "root_count",
        "unsync",
        "unsync_child",
        "write_flooding_count",
    )

    def __init__(self, idx: int, hpa: int, gfn: int, role: Role, gen: int) -> None:
        self.idx = idx
        self.hpa = hpa
        self.gfn = gfn
        self.role = role
        self.mmu_valid_gen = gen
        self.invalid = False
        #: ``parent_ptes``: the (sp, index) entries linking this table.
        self.parent_ptes: set[SptePtr] = set()
        self.unsync = False
        #: ``unsync_child_bitmap``; ``unsync_children`` is its size.
        self.unsync_child: set[int] = set()
        self.root_count = 0
        self.write_flooding_count = 0
        #: ``shadowed_translation``: gfn and access of each leaf entry.
        self.gfns: dict[int, int] = {}
        self.access: dict[int, int] = {}
        #: The guest leaf's (PAT, PCD, PWT) per entry (for the memory type).
        self.gpat: dict[int, int] = {}
        #: Only for a vCPU's ``mmu->pae_root`` (not an sp in KVM): the four
        #: level-2 root sps its entries point to (None: ``INVALID_PAE_ROOT``).
        self.pae: list[ShadowPage | None] | None = None

    @property
    def unsync_children(self) -> int:
        return len(self.unsync_child)

    def __repr__(self) -> str:
        if self.pae is not None:
            return f"PaeRoot(hpa={self.hpa:#x})"
        kind = "direct" if self.role.direct else "indirect"
        return (
            f"ShadowPage(gfn={self.gfn:#x}, level={self.role.level}, {kind}, "
            f"access={self.role.access}, unsync={self.unsync}, invalid={self.invalid})"
        )


class VcpuMmu:
    """Per-vCPU MMU state: ``mmu->root``, ``prev_roots``, the pending injection."""

    __slots__ = ("fault", "gpa", "pdptrs", "pgd", "prev_roots", "root")

    def __init__(self) -> None:
        #: ``mmu->pdptrs``: the guest PDPTEs ``load_pdptrs`` read at CR3 load (PAE).
        self.pdptrs: list[int] = [0, 0, 0, 0]
        self.root: ShadowPage | None = None
        self.pgd = 0
        #: ``mmu->prev_roots``: (pgd, root) most recent first.
        self.prev_roots: list[tuple[int, ShadowPage]] = []
        #: The #PF/#GP ``kvm_inject_emulated_page_fault`` queued.
        self.fault: Any = None
        #: The gpa of the last fault (for emulation).
        self.gpa = 0


class ShadowBase:
    """Shadow-page storage and lifecycle shared by the fetch, sync and VM-wide parts."""

    #: The shadow MMU (``vcpu.access`` delegates whole accesses to it).
    shadow = True

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.fmt: S.SpteFormat = vm.spte_format
        maxphy = int(vm.config.host_maxphyaddr)
        self.pool = SptePool(pool_base_for(maxphy))
        self._data = self.pool.data
        #: ``kvm_mmu_max_gfn``: shadow paging allows 52-bit gpas (``max_gpa_bits``).
        self.max_gfn = (1 << (52 - S.PAGE_SHIFT)) - 1
        self.max_huge_page_level = int(self.fmt.max_level)
        self.invalidate = InvalidateState()
        self.mmu_valid_gen = 0
        #: ``mmu_page_hash``: (gfn, role) -> valid sp.
        self.page_hash: dict[tuple[int, Role], ShadowPage] = {}
        #: valid indirect sps per gfn (``for_each_gfn_valid_sp_with_gptes``).
        self.gfn_sps: dict[int, list[ShadowPage]] = {}
        #: ``active_mmu_pages`` (insertion order = age).
        self.active: dict[int, ShadowPage] = {}
        #: pool row -> sp, for every sp not yet freed (invalid roots included).
        self.by_idx: dict[int, ShadowPage] = {}
        #: rmap: first gfn a leaf maps -> the (sp, index) leaf SPTEs.
        self.rmap: dict[int, set[SptePtr]] = {}
        self.indirect_shadow_pages = 0
        self.vcpus: dict[int, VcpuMmu] = {}
        self._mmu_lock_owner: int | None = None
        #: track_writes waiting for ``mmu_lock``: (gpa, bytes, writer is_pae).
        self._deferred: list[tuple[int, bytes, bool]] = []
        #: The vCPU whose access is being emulated (for ``is_pae``).
        self._writer: VCpu | None = None
        self._mn_found: list[tuple[int, int, bool]] = []

    # ---------------------------------------------------------------- helpers
    def vstate(self, vcpu: VCpu) -> VcpuMmu:
        st = self.vcpus.get(vcpu.index)
        if st is None:
            st = self.vcpus[vcpu.index] = VcpuMmu()
        return st

    def spte(self, sp: ShadowPage, i: int) -> int:
        return int(self._data[sp.idx, i])

    def set_spte(self, sp: ShadowPage, i: int, value: int) -> None:
        self.pool.data[sp.idx, i] = value

    def child_sp(self, spte: int) -> ShadowPage:
        """``spte_to_child_sp``: the sp a non-leaf SPTE points to."""
        return self.by_idx[self.pool.index_of(spte & S.SPTE_BASE_ADDR_MASK)]

    @staticmethod
    def root_top(root: ShadowPage, gva: int) -> ShadowPage | None:
        """``shadow_walk_init_using_root``: a PAE root starts at the level-2 sp
        of ``pae_root[(gva >> 30) & 3]`` (None if that entry is invalid)."""
        if root.pae is None:
            return root
        return root.pae[(gva >> 30) & 3]

    @staticmethod
    def child_role(parent: ShadowPage, i: int, direct: bool, access: int) -> Role:
        """``kvm_mmu_child_role``: the parent's role one level down; for 4-byte
        gPTEs the child PT's quadrant is bit 21 of the address, i.e. ``i & 1``."""
        role = parent.role._replace(level=parent.role.level - 1, direct=direct, access=access)
        if role.has_4_byte_gpte:
            role = role._replace(quadrant=i & 1)
        return role

    def _need_lock(self, what: str) -> None:
        if self._mmu_lock_owner is not None:
            raise MmuLockContended(what)

    def flush_gfns(self, gfn: int, nr: int) -> None:
        """``kvm_flush_remote_tlbs_range`` (every zap / write-protect that changed)."""
        self.vm.hooks.flush_remote_tlbs_range(gfn, nr)

    def flush_all(self) -> None:
        """``kvm_flush_remote_tlbs``: the whole gfn space."""
        self.vm.hooks.flush_remote_tlbs_range(0, self.max_gfn + 1)

    def base_role(self, vcpu: VCpu) -> Role:
        """``kvm_calc_cpu_role``-derived root role for the vCPU's paging mode."""
        wp = bool(vcpu.cr0 & paging.CR0_WP)
        pg = bool(vcpu.cr0 & paging.CR0_PG)
        return Role(
            level=self.guest_root_level(vcpu),
            direct=not vcpu.cr0 & paging.CR0_PG,
            access=S.ACC_ALL,
            cr0_wp=wp,
            efer_nx=bool(vcpu.efer & paging.EFER_NXE),
            smep_andnot_wp=bool(vcpu.cr4 & paging.CR4_SMEP) and not wp,
            smap_andnot_wp=bool(vcpu.cr4 & paging.CR4_SMAP) and not wp,
            has_4_byte_gpte=pg and not vcpu.cr4 & paging.CR4_PAE,
        )

    @staticmethod
    def guest_root_level(vcpu: VCpu) -> int:
        """The shadow root level (``kvm_init_shadow_mmu``: ``max(level, PT32E)``).

        4 or 5 for long-mode guests; 3 (``PT32E_ROOT_LEVEL``, the PAE root)
        for PAE and 32-bit guests. Guest paging off maps gva = gpa through a
        direct 4-level root.
        """
        if not vcpu.cr0 & paging.CR0_PG:
            return 4
        if not vcpu.efer & paging.EFER_LMA:
            return 3
        return 5 if vcpu.cr4 & paging.CR4_LA57 else 4

    @staticmethod
    def gpte_size(sp: ShadowPage) -> int:
        """``sizeof(pt_element_t)``: 4 for ``paging32``, else 8."""
        return 4 if sp.role.has_4_byte_gpte else 8

    @staticmethod
    def gpte_gpa(sp: ShadowPage, i: int) -> int:
        """The gpa of the guest entry shadow entry ``i`` of indirect ``sp`` shadows.

        ``FNAME(get_level1_sp_gpa)`` for a 32-bit PT (the quadrant selects the
        half); for a 32-bit PD, two shadow PDEs per 4-byte guest PDE in the
        quadrant's quarter (``get_written_sptes`` read backwards).
        """
        if not sp.role.has_4_byte_gpte:
            return (sp.gfn << 12) + i * 8
        if sp.role.level == 1:
            return (sp.gfn << 12) + (sp.role.quadrant * 512 + i) * 4
        return (sp.gfn << 12) + (sp.role.quadrant * 256 + i // 2) * 4

    def account_shadowed(self, sp: ShadowPage) -> None:
        """``account_shadowed`` (mmu.c; spec/kvm-mmu.md §2.4).

        Non-leaf guest tables: ``__kvm_write_track_add_gfn`` (count, lpage
        disallow, write-protect, flush) - a permanent write-protect. A
        last-level table: lpage disallow and a 4K write-protect only, so it may
        later go unsync.
        """
        self.indirect_shadow_pages += 1
        slot = self.vm.memslots.gfn_to_memslot(sp.gfn)
        if slot is None:
            return
        if sp.role.level > 1:
            self.vm.page_track.add_gfn_in_slot(slot, sp.gfn)
            return
        slot.disallow_lpage(sp.gfn)
        self.write_protect_gfn(slot, sp.gfn)

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        """``unaccount_shadowed``: undo :meth:`account_shadowed` (no un-protect)."""
        self.indirect_shadow_pages -= 1
        slot = self.vm.memslots.gfn_to_memslot(sp.gfn)
        if slot is None:
            return
        if sp.role.level > 1:
            self.vm.page_track.remove_gfn_in_slot(slot, sp.gfn)
            return
        slot.allow_lpage(sp.gfn)

    def write_protect_gfn(self, slot: Memslot, gfn: int, level: int = 1) -> bool:
        """``kvm_mmu_slot_gfn_write_protect`` (rmap walk of levels ``level``..1G).

        Clears W and MMU-writable on every leaf mapping ``gfn`` (huge ones
        covering it included) and flushes that gfn if anything changed.
        """
        changed = False
        clear = S.PT_WRITABLE_MASK | self.fmt.mmu_writable_mask
        for lvl in range(level, self.max_huge_page_level + 1):
            base = gfn & ~(S.KVM_PAGES_PER_HPAGE(lvl) - 1)
            for sp, i in list(self.rmap.get(base, ())):
                if sp.role.level != lvl:
                    continue
                spte = self.spte(sp, i)
                if spte & clear:
                    self.set_spte(sp, i, spte & ~clear)
                    changed = changed or bool(spte & S.PT_WRITABLE_MASK)
        if changed:
            self.flush_gfns(gfn, 1)
        return changed

    # --------------------------------------------------------------- linking
    def link_shadow_page(self, parent: ShadowPage, i: int, sp: ShadowPage) -> None:
        """``link_shadow_page``: non-leaf SPTE to ``sp``; propagate unsync upwards."""
        spte = S.make_nonleaf_spte(self.fmt, sp.hpa, False)
        self.set_spte(parent, i, spte)
        sp.parent_ptes.add((parent, i))
        if sp.unsync_children or sp.unsync:
            self.mark_unsync(parent, i)

    def mark_unsync(self, sp: ShadowPage, i: int) -> None:
        """``mark_unsync`` / ``kvm_mmu_mark_parents_unsync`` (mmu.c)."""
        if i in sp.unsync_child:
            return
        sp.unsync_child.add(i)
        if len(sp.unsync_child) > 1:
            return
        for parent, pi in list(sp.parent_ptes):
            self.mark_unsync(parent, pi)

    def unsync_page(self, sp: ShadowPage) -> None:
        """``kvm_unsync_page``: the 4K table becomes writable; parents learn of it."""
        self.vm.stats["mmu_unsync"] += 1
        sp.unsync = True
        for parent, pi in list(sp.parent_ptes):
            self.mark_unsync(parent, pi)

    def clear_unsync(self, sp: ShadowPage) -> None:
        """``kvm_unlink_unsync_page``: synced again; clear the parents' bits."""
        sp.unsync = False
        for parent, pi in list(sp.parent_ptes):
            self.clear_unsync_child_bit(parent, pi)

    def clear_unsync_child_bit(self, sp: ShadowPage, i: int) -> None:
        """``clear_unsync_child_bit``, propagated while a parent loses its last child."""
        if i not in sp.unsync_child:
            return
        sp.unsync_child.discard(i)
        if not sp.unsync_child and not sp.unsync:
            for parent, pi in list(sp.parent_ptes):
                self.clear_unsync_child_bit(parent, pi)

    def rmap_add(self, sp: ShadowPage, i: int, gfn: int) -> None:
        self.rmap.setdefault(gfn, set()).add((sp, i))

    def rmap_remove(self, sp: ShadowPage, i: int) -> None:
        gfn = sp.gfns.get(i)
        if gfn is None:
            return
        entries = self.rmap.get(gfn)
        if entries is not None:
            entries.discard((sp, i))
            if not entries:
                del self.rmap[gfn]

    def leaf_gfn(self, sp: ShadowPage, i: int) -> int:
        """``kvm_mmu_page_get_gfn``: the first gfn entry ``i`` maps."""
        if sp.role.direct:
            return sp.gfn + (i << (9 * (sp.role.level - 1)))
        return sp.gfns[i]

    # ------------------------------------------------------------- dropping
    def drop_spte(self, sp: ShadowPage, i: int) -> bool:
        """``drop_spte`` / ``mmu_page_zap_pte``: clear one entry; True if it was present.

        A leaf leaves the rmap; a non-leaf drops the child's parent link
        (``drop_parent_pte``) - the parentless child stays in the hash.
        """
        spte = self.spte(sp, i)
        if not spte:
            return False
        self.set_spte(sp, i, 0)
        present = S.is_shadow_present_pte(spte) and not S.is_mmio_spte(self.fmt, spte)
        if not present:
            return False
        if S.is_last_spte(spte, sp.role.level):
            self.rmap_remove(sp, i)
            sp.gfns.pop(i, None)
            sp.access.pop(i, None)
            sp.gpat.pop(i, None)
        else:
            child = self.child_sp(spte)
            child.parent_ptes.discard((sp, i))
            self.clear_unsync_child_bit(sp, i)
        return True

    def spte_flush_range(self, sp: ShadowPage, i: int) -> tuple[int, int]:
        """The gfns an entry covered, for the flush after it changed."""
        nr = S.KVM_PAGES_PER_HPAGE(sp.role.level)
        if sp.role.direct or i in sp.gfns:
            return self.leaf_gfn(sp, i), nr
        return 0, self.max_gfn + 1

    def zap_page(self, sp: ShadowPage, flush_now: bool = True) -> bool:
        """``kvm_mmu_prepare_zap_page`` + commit (mmu.c; spec/kvm-mmu.md §3.14).

        Unlink children and parents, ``unaccount_shadowed``, unlink unsync,
        mark ``role.invalid``; a root still in use leaves the hash and the
        active list and is freed when its last vCPU drops it. Returns whether
        an entry was present; flushes then unless ``flush_now`` is False
        (the caller batches, as ``kvm_mmu_commit_zap_page`` does).
        """
        if sp.invalid:
            return False
        flush = False
        for i in [int(x) for x in self._data[sp.idx].nonzero()[0]]:
            flush |= self.drop_spte(sp, i)
        for parent, pi in list(sp.parent_ptes):
            self.set_spte(parent, pi, 0)
            self.clear_unsync_child_bit(parent, pi)
            flush = True
        sp.parent_ptes.clear()
        if not sp.role.direct:
            self.unaccount_shadowed(sp)
            bucket = self.gfn_sps.get(sp.gfn)
            if bucket is not None:
                bucket.remove(sp)
                if not bucket:
                    del self.gfn_sps[sp.gfn]
        if sp.unsync:
            sp.unsync = False
        sp.unsync_child.clear()
        sp.invalid = True
        self.vm.stats["mmu_shadow_zapped"] += 1
        if self.page_hash.get((sp.gfn, sp.role)) is sp:
            del self.page_hash[(sp.gfn, sp.role)]
        self.active.pop(sp.idx, None)
        if not sp.root_count:
            self.free_page(sp)
        if flush and flush_now:
            self.flush_all()
        return flush

    def free_page(self, sp: ShadowPage) -> None:
        """``kvm_mmu_free_shadow_page``: return the table to the pool."""
        if self.by_idx.pop(sp.idx, None) is not None:
            self.pool.free(sp.idx)

    def is_obsolete(self, sp: ShadowPage) -> bool:
        """``is_obsolete_sp``: invalid, or built before the last ``zap_all_fast``.

        A PAE root has no sp (``is_obsolete_root``): it counts as obsolete
        when one of its four roots is - the model's stand-in for the pending
        ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` that zapping a root in use sends.
        """
        if sp.pae is not None:
            return any(r is not None and self.is_obsolete(r) for r in sp.pae)
        return sp.invalid or sp.mmu_valid_gen != self.mmu_valid_gen
