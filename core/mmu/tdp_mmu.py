"""``TdpMmu``: the TDP MMU a VM builds (``arch/x86/kvm/mmu/tdp_mmu.c`` + mmu.c)."""

from __future__ import annotations

from kvmmu.mmu.dirty import DirtyMixin
from kvmmu.mmu.invariants import InvariantsMixin
from kvmmu.mmu.ops import OpsMixin
from kvmmu.mmu.prefault import PrefaultMixin

__all__ = ["TdpMmu"]


class TdpMmu(PrefaultMixin, OpsMixin, DirtyMixin, InvariantsMixin):
    """The TDP MMU of one VM: ``TdpMmu(vm)``.

    Fault path: :meth:`page_fault`, :meth:`page_fault_steps`. VM-wide:
    :meth:`zap_gfn_range`, :meth:`zap_all_fast`, :meth:`flush_shadow_memslot`,
    :meth:`write_protect_gfn`, :meth:`slot_apply_flags`,
    :meth:`write_protect_gfns`, :meth:`invalidate_range_start` /
    :meth:`invalidate_range_end`, :meth:`pre_fault_memory`. Hardware view:
    :meth:`translate`, :meth:`access_allowed`, :meth:`fault_error_code`,
    :meth:`root_hpa`, :attr:`pool`. Checks: :meth:`check_invariants`.
    """
