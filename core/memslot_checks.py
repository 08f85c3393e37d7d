"""The ordered validation of ``KVM_SET_USER_MEMORY_REGION(2)``.

``kvm_set_memory_region`` (``virt/kvm/kvm_main.c``) checks a request in a
fixed order and fails with the first failing check's errno; spec/kvm-mmu.md
§1.3 numbers them 2-16.  :func:`check_memory_region` runs them and classifies
the change (``enum kvm_mr_change``); the x86 ``kvm_arch_prepare_memory_region``
checks (§1.5) are :meth:`kvmmu.memslot.Memslots.arch_prepare`.

guest_memfd is not modelled by default (``supports_gmem=False``): the
``KVM_MEM_GUEST_MEMFD`` flag is refused by check 2 on the v1 ioctl and by
check 4 on ``region2``, as on a VM type without private memory.  With
``supports_gmem=True`` the flag passes check 4 so checks 8 and 14 can be
exercised; the fd itself is recorded, not bound (check 18 is not modelled).

Choices the kernel leaves to the platform, fixed here:

* a tagged ``userspace_addr`` (check 7) is one with any of bits 57-63 set,
  i.e. ``untagged_addr`` under x86 LAM57 clears them;
* ``access_ok(hva, size)`` is ``hva + size <= TASK_SIZE_MAX`` (4-level paging).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmmu.errors import KvmError
from kvmmu.memory_slot import (
    _U32,
    _U64,
    _V1_FLAGS,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_USER_MEM_SLOTS,
    LAM_TAG_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    TASK_SIZE_MAX,
    Memslot,
    MemslotChange,
    PreparedChange,
)

if TYPE_CHECKING:
    from kvmmu.memslot import Memslots

__all__ = ["check_memory_region"]


def check_memory_region(
    memslots: Memslots,
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    *,
    region2: bool = False,
    guest_memfd: int = 0,
    guest_memfd_offset: int = 0,
    max_gfn: int = (1 << 40) - 1,
    external_page_track_user: bool = False,
    internal: bool = False,
) -> PreparedChange:
    """spec/kvm-mmu.md §1.3 checks 2-16 of a request on ``memslots``, in order.

    Each UAPI field must fit its type (``ValueError``); then the first failing
    check raises ``KvmError`` with its errno.  Returns the classified change:
    DELETE and a no-op modify (``change`` None) come back with
    ``arch_checked=True``; CREATE, MOVE and FLAGS_ONLY still need
    :meth:`kvmmu.memslot.Memslots.arch_prepare`.  ``internal=True`` is
    ``kvm_set_internal_memslot`` (slot >= KVM_USER_MEM_SLOTS, flags 0).
    """
    for name, val, top in (
        ("slot", slot, _U32),
        ("flags", flags, _U32),
        ("guest_phys_addr", guest_phys_addr, _U64),
        ("memory_size", memory_size, _U64),
        ("userspace_addr", userspace_addr, _U64),
        ("guest_memfd_offset", guest_memfd_offset, _U64),
        ("guest_memfd", guest_memfd, _U32),
    ):
        if not 0 <= val <= top:
            raise ValueError(f"{name}={val!r} does not fit the UAPI field (0..{top:#x})")

    def fail(check: str, msg: str, err: int = errno.EINVAL) -> KvmError:
        return KvmError(err, f"{msg} (spec/kvm-mmu.md §1.3 check {check})")

    if internal:  # kvm_set_internal_memslot
        if slot < KVM_USER_MEM_SLOTS or flags:
            raise fail(
                "internal", f"internal slot {slot} needs id >= {KVM_USER_MEM_SLOTS}, flags 0"
            )
    else:
        if not region2 and flags & ~_V1_FLAGS:
            raise fail("2", f"flags {flags:#x} not allowed by KVM_SET_USER_MEMORY_REGION (v1)")
        if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise fail("3", f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    # check 4: check_memory_region_flags
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if memslots.supports_gmem:
        valid |= KVM_MEM_GUEST_MEMFD
    gmem = bool(flags & KVM_MEM_GUEST_MEMFD)
    if gmem:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES
    else:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        raise fail("4", f"flags {flags:#x} not in the valid set {valid:#x} for this VM")
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if memory_size & (PAGE_SIZE - 1):
        raise fail("5", f"memory_size {memory_size:#x} is not a multiple of 4 KiB")
    if guest_phys_addr & (PAGE_SIZE - 1):
        raise fail("6", f"guest_phys_addr {guest_phys_addr:#x} is not 4 KiB aligned")
    if (
        userspace_addr & (PAGE_SIZE - 1)
        or userspace_addr & LAM_TAG_MASK
        or userspace_addr + memory_size > TASK_SIZE_MAX
    ):
        raise fail(
            "7",
            f"userspace_addr {userspace_addr:#x} must be 4 KiB aligned, untagged, and "
            f"with memory_size {memory_size:#x} end at or below "
            f"TASK_SIZE_MAX {TASK_SIZE_MAX:#x}",
        )
    if gmem and (guest_memfd_offset & (PAGE_SIZE - 1) or guest_memfd_offset + memory_size > _U64):
        raise fail("8", f"guest_memfd_offset {guest_memfd_offset:#x} unaligned or overflows")
    if as_id >= memslots.nr_as_ids or id_ >= KVM_MEM_SLOTS_NUM:
        raise fail(
            "9",
            f"address space {as_id} (allowed < {memslots.nr_as_ids}) / slot id {id_} "
            f"(allowed < {KVM_MEM_SLOTS_NUM})",
        )
    if guest_phys_addr + memory_size > _U64:
        raise fail("10", f"guest_phys_addr {guest_phys_addr:#x} + memory_size overflows u64")
    npages = memory_size >> PAGE_SHIFT
    if id_ < KVM_USER_MEM_SLOTS and npages > KVM_MEM_MAX_NR_PAGES:
        raise fail("11", f"{npages} pages > KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES})")
    old = memslots._by_id[as_id].get(id_)
    base_gfn = guest_phys_addr >> PAGE_SHIFT
    serial = memslots._serial
    if not memory_size:
        if old is None or not old.npages:
            raise fail("12", f"cannot delete slot {as_id}:{id_}: it does not exist")
        if memslots.nr_memslot_pages < old.npages:
            raise fail("12b", "nr_memslot_pages < old->npages (WARN)", errno.EIO)
        return PreparedChange(
            old, None, MemslotChange.DELETE, as_id, id_, arch_checked=True, serial=serial
        )
    if old is None:
        change = MemslotChange.CREATE
        if memslots.nr_memslot_pages + npages > _U64:
            raise fail("13", "total memslot pages would overflow unsigned long")
    else:
        if gmem:
            raise fail("14", f"slot {as_id}:{id_} is a guest_memfd slot: delete only")
        if (
            userspace_addr != old.userspace_addr
            or npages != old.npages
            # kvm_set_memory_region: READONLY *and* GUEST_MEMFD may not toggle;
            # dropping GUEST_MEMFD from a gmem slot fails here, not at check 14.
            or (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)
        ):
            raise fail(
                "15",
                f"slot {as_id}:{id_} exists: only its gpa or LOG_DIRTY_PAGES may change "
                "(not userspace_addr, size, READONLY or GUEST_MEMFD)",
            )
        if base_gfn != old.base_gfn:
            change = MemslotChange.MOVE
        elif flags != old.flags:
            change = MemslotChange.FLAGS_ONLY
        else:
            return PreparedChange(old, None, None, as_id, id_, arch_checked=True, serial=serial)
    if change in (MemslotChange.CREATE, MemslotChange.MOVE):
        for other in memslots.slots_in_gfn_range(base_gfn, base_gfn + npages, as_id):
            if other.id != id_:
                raise fail(
                    "16",
                    f"gfns [{base_gfn:#x}, {base_gfn + npages:#x}) overlap slot "
                    f"{as_id}:{other.id} [{other.base_gfn:#x}, {other.end_gfn:#x})",
                    errno.EEXIST,
                )
    new = Memslot(id_, as_id, base_gfn, npages, userspace_addr, flags)
    if gmem:
        new.gmem_fd, new.gmem_offset = guest_memfd, guest_memfd_offset
    return PreparedChange(
        old, new, change, as_id, id_, max_gfn, external_page_track_user, serial=serial
    )
