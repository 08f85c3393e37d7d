"""The MMU proper: SPTE tables, the TDP MMU, the shadow MMU.

``TdpMmu(vm)`` is the TDP MMU the VM builds when ``config.tdp`` is on; it is
composed of the fault path (:mod:`.fault`), VM-wide operations (:mod:`.ops`),
dirty logging (:mod:`.dirty`), pre-fault (:mod:`.prefault`) and its own
invariant checks (:mod:`.invariants`) over the table pool (:mod:`.pool`).
"""

from __future__ import annotations

from kvmmu.mmu.fault import (
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
)
from kvmmu.mmu.pool import SptePool
from kvmmu.mmu.tdp_mmu import TdpMmu

__all__ = [
    "PFERR_FETCH_MASK",
    "PFERR_GUEST_FINAL_MASK",
    "PFERR_PRESENT_MASK",
    "PFERR_RSVD_MASK",
    "PFERR_USER_MASK",
    "PFERR_WRITE_MASK",
    "RET_PF_CONTINUE",
    "RET_PF_EMULATE",
    "RET_PF_FIXED",
    "RET_PF_INVALID",
    "RET_PF_RETRY",
    "RET_PF_SPURIOUS",
    "SptePool",
    "TdpMmu",
]
