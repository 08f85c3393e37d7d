"""KVM's side of the RFC: the exported TDP (``KVM_CREATE_TDP_FD``).

``KvmTdpFd(vm, as_id=0, mode=0)`` models the "KVM TDP FD" of "[RFC PATCH
00/42] Sharing KVM TDP to IOMMU" (spec/consumers.md §2.2): the T1
preconditions, the exported root (T2), the non-vCPU fault handler (T3)
and the flush notification to importers (T5).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmmu.errors import KvmError
from kvmmu.spte import SPTE_MMU_PRESENT_HIGH_MASK

if TYPE_CHECKING:
    from kvmmu.vm import VM

__all__ = [
    "SPTE_MMU_PRESENT_HIGH_MASK",  # re-exported from kvmmu.spte
    "KvmTdpFd",
    "fault_type_to_error_code",
    "mmu_present_mask",
]

PAGE_SHIFT = 12

# arch/x86/include/asm/kvm_host.h PFERR_*_MASK (imported lazily: kvmmu.paging)
_PFERR_PRESENT = 1 << 0
_PFERR_WRITE = 1 << 1
_PFERR_USER = 1 << 2
_PFERR_FETCH = 1 << 4

#: RET_PF_* (arch/x86/kvm/mmu/mmu_internal.h), as kvmmu.mmu exports them.
_RET_PF_RETRY = 1
_RET_PF_FIXED = 4


def _pferr() -> tuple[int, int, int, int]:
    try:
        from kvmmu import paging

        return (
            int(paging.PFERR_PRESENT),
            int(paging.PFERR_WRITE),
            int(paging.PFERR_USER),
            int(paging.PFERR_FETCH),
        )
    except (ImportError, AttributeError):  # pragma: no cover - the core exports them
        return _PFERR_PRESENT, _PFERR_WRITE, _PFERR_USER, _PFERR_FETCH


def fault_type_to_error_code(*, read: bool, write: bool, exec: bool) -> int:
    """``kvm_arch_fault_exported_tdp``: read -> PRESENT|USER, write -> WRITE, exec -> FETCH.

    spec/consumers.md T3, [TDP-37] (``arch/x86/kvm/x86.c`` in the RFC).
    """
    present, wr, user, fetch = _pferr()
    err = 0
    if read:
        err |= present | user
    if write:
        err |= wr
    if exec:
        err |= fetch
    return err


def mmu_present_mask(vm: VM) -> int:
    """The VM's ``SPTE_MMU_PRESENT_MASK`` (``SpteFormat.mmu_present_mask``).

    Bit 11, or bit 59 with ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH`` (T6, [TDP-24];
    ``[plugins.vmx] mmu_present_high``).
    """
    return int(vm.spte_format.mmu_present_mask)


def _ret_pf() -> tuple[int, int]:
    try:
        from kvmmu import mmu as _mmu

        return int(_mmu.RET_PF_RETRY), int(_mmu.RET_PF_FIXED)
    except (ImportError, AttributeError):
        return _RET_PF_RETRY, _RET_PF_FIXED


class KvmTdpFd:
    """A "KVM TDP FD": KVM's interface for external users of a TDP.

    Construction runs ``kvm_mmu_is_expoted_allowed`` (T1) and takes the
    exported root (T2). ``require_mmu_present_high`` is the T1 condition
    ``CONFIG_HAVE_KVM_MMU_PRESENT_HIGH`` (needed because VT-d reserves bit
    11, T6); the IOMMU plugin turns it off only when its IOMMU is configured
    not to reserve bit 11.
    """

    def __init__(
        self,
        vm: VM,
        as_id: int = 0,
        mode: int = 0,
        *,
        require_mmu_present_high: bool = True,
        max_retries: int = 64,
    ) -> None:
        self.vm = vm
        self._check_allowed(as_id, mode, require_mmu_present_high)
        self.as_id = as_id
        self.max_retries = max_retries
        self.importers: list[Callable[[int, int], None]] = []
        self.root_hpa = self._get_exported_root()
        self.released = False
        self.refs = 1  # the file descriptor itself
        self.faults = 0
        self.fault_errors: dict[str, int] = {}

    # T1 -------------------------------------------------------------------
    def _check_allowed(self, as_id: int, mode: int, need_high: bool) -> None:
        """``kvm_mmu_is_expoted_allowed`` and the ioctl checks: EINVAL on any failure.

        spec/consumers.md T1 [TDP-35]; ``mode`` must be 0 [TDP-03].
        """
        vm = self.vm

        def refuse(why: str) -> KvmError:
            return KvmError(errno.EINVAL, f"KVM_CREATE_TDP_FD: {why} (spec/consumers.md T1)")

        if mode != 0:
            raise refuse(f"mode must be 0, got {mode}")
        if as_id != 0:
            raise refuse(f"only address space 0 can be exported, got as_id={as_id}")
        if not vm.config.tdp:
            raise refuse("the TDP MMU is not enabled (tdp=false)")
        if need_high and mmu_present_mask(vm) != SPTE_MMU_PRESENT_HIGH_MASK:
            raise refuse(
                "CONFIG_HAVE_KVM_MMU_PRESENT_HIGH is not set: SPTE_MMU_PRESENT_MASK is "
                f"{mmu_present_mask(vm):#x}, a bit VT-d reserves (T6)"
            )
        if not vm.vcpus:
            raise refuse("no vCPU created yet; the root level comes from the vCPUs' maxphyaddr")
        maxphy = min(int(getattr(v, "maxphyaddr", vm.config.host_maxphyaddr)) for v in vm.vcpus)
        if maxphy < 32:
            raise refuse(f"minimum vCPU maxphyaddr is {maxphy}, below 32")
        if vm.noncoherent_dma_count:
            raise refuse(
                f"non-coherent DMA is registered ({vm.noncoherent_dma_count}); the memtype of "
                "an IO page fault cannot be computed without a vCPU (T7)"
            )

    # T2 -------------------------------------------------------------------
    def _get_exported_root(self) -> int:
        """``kvm_tdp_mmu_get_exported_root``: find-and-ref or create the root, mark it.

        ``TdpMmu.get_exported_root`` (spec/consumers.md T2 [TDP-35]).
        """
        mmu: Any = self.vm.mmu
        return int(mmu.get_exported_root(self.as_id))

    def get(self) -> None:
        """An importer takes a reference on the FD (flow step 2, [TDP-00])."""
        if self.released:
            raise KvmError(errno.EBADF, "KVM TDP FD is already released")
        self.refs += 1

    def put(self) -> None:
        """Drop a reference; the last one releases the exported root."""
        if self.refs <= 0:
            raise KvmError(errno.EBADF, "KVM TDP FD: reference count is already 0")
        self.refs -= 1
        if self.refs == 0:
            self.release()

    def close(self) -> None:
        """Userspace closes the FD (drops the FD's own reference)."""
        self.put()

    def release(self) -> None:
        """Put the FD: clear ``exported``, zap the root, put the ref (T2 [TDP-35])."""
        if self.released:
            return
        self.released = True
        self.refs = 0
        self.importers.clear()
        mmu: Any = self.vm.mmu
        mmu.put_exported_root(self.root_hpa)

    # T5 -------------------------------------------------------------------
    def register_importer(self, cb: Callable[[int, int], None]) -> None:
        """An importer (the IOMMUFD KVM HWPT) wants every flush of this TDP."""
        self.importers.append(cb)

    def unregister_importer(self, cb: Callable[[int, int], None]) -> None:
        self.importers = [c for c in self.importers if c is not cb]

    def flush_notify(self, gfn: int, nr_pages: int) -> None:
        """``kvm_tdp_fd_flush_notify(kvm, gfn, nr_pages)`` (T5 [TDP-42])."""
        for cb in list(self.importers):
            cb(gfn, nr_pages)

    # T3 -------------------------------------------------------------------
    def fault(self, gfn: int, *, read: bool, write: bool, exec: bool = False) -> int:
        """``tdp_fd->ops->fault``: fault ``gfn`` in with no vCPU; 0 or -errno.

        ``kvm_arch_fault_exported_tdp`` + ``kvm_mmu_fault_exported_tdp``
        (spec/consumers.md T3, [TDP-37]):

        * ``page_fault_handle_page_track``: a *present* write fault to a
          write-tracked gfn fails with -EINVAL (T3, T8);
        * a gfn in no memslot (emulated MMIO) fails (-EFAULT here: the
          fault path cannot emulate without a vCPU);
        * otherwise ``vm.mmu.page_fault(None, gpa, err)`` is retried while it
          returns RET_PF_RETRY; the result is 0 iff RET_PF_FIXED, else -EFAULT.

        The kernel retries without bound (another thread ends the MMU-notifier
        invalidation); the single-threaded model stops after ``max_retries``
        and fails the fault with -EFAULT.
        """
        if self.released:
            return -errno.EBADF
        self.faults += 1
        err = fault_type_to_error_code(read=read, write=write, exec=exec)
        present, wr, _user, _fetch = _pferr()
        vm = self.vm
        slot = vm.memslots.gfn_to_memslot(gfn)
        if err & present and err & wr and vm.page_track.is_write_tracked(slot, gfn):
            return self._fail("write-tracked", -errno.EINVAL)
        if slot is None or slot.is_invalid:
            return self._fail("no-memslot", -errno.EFAULT)
        retry, fixed = _ret_pf()
        for _ in range(self.max_retries + 1):
            r = int(vm.tdp_mmu().page_fault(None, gfn << PAGE_SHIFT, err))
            if r != retry:
                return 0 if r == fixed else self._fail(f"ret_pf_{r}", -errno.EFAULT)
        return self._fail("retry-budget", -errno.EFAULT)

    def _fail(self, why: str, rc: int) -> int:
        self.fault_errors[why] = self.fault_errors.get(why, 0) + 1
        return rc
