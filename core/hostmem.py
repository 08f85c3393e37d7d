"""Host physical memory and the host virtual address space behind guest RAM.

This is the host side KVM sits on: userspace (the VMM) ``mmap``s anonymous
memory or a device BAR, hands the host virtual address (hva) to
``KVM_SET_USER_MEMORY_REGION``, and KVM turns an hva into a host pfn with GUP
(``virt/kvm/kvm_main.c: hva_to_pfn``).  The model keeps exactly the state the
MMU can observe:

* **VMAs** (:class:`Vma`): anonymous RAM (4K pages, THP-backed 2M, or
  hugetlbfs 1G) and MMIO BAR mappings with a host memory type.
* **Populated pages**: an hva page gets a host pfn on first touch
  (:meth:`HostMemory.hva_to_pfn`).  A huge-page VMA allocates a whole naturally
  aligned, physically contiguous block, so :meth:`HostMemory.host_mapping_level`
  is real (spec/kvm-mmu.md §3.6 ``host_pfn_mapping_level``).  Such a VMA
  keeps its block base pfns in one numpy array (``Vma.blocks``, -1 = not
  populated as a block), so a range of blocks is faulted in with one pfn
  run and one array assignment (:meth:`HostMemory.fault_in_blocks`).
* **Bytes**: page contents are materialised (a 4 KiB ``bytearray`` per pfn)
  only when written; an untouched page reads as zeros without allocating.
* **MMU notifiers** (``include/linux/mmu_notifier.h``): every invalidation calls
  ``invalidate_range_start`` on each registered notifier, changes the primary
  mapping, then calls ``invalidate_range_end``.  Reclaim gives a page a *new*
  pfn on its next touch (migration / swap), so a stale SPTE still pointing at
  the old pfn is detectable (:meth:`HostMemory.pfn_is_live`).
* **Pins** (``vfio_pin_pages`` / ``pin_user_pages``): a pinned pfn is never
  reclaimed; an invalidation of its hva only fires the notifiers.

Physical address map (a modelling choice, documented here):

* host RAM pfns come from a bump allocator in ``[RAM_BASE, 2**(maxphyaddr-1))``
  (4 GiB up to half the physical address space); pfns are never reused, so a
  freed pfn never aliases a live page;
* everything outside that window is *not* e820 RAM, so
  :meth:`HostMemory.is_mmio_pfn` is true for it, as ``kvm_is_mmio_pfn``
  (spec/kvm-mmu.md §4.6) says for a pfn that is not RAM.  Device BARs
  (:meth:`HostMemory.map_mmio`) must live there.
* MMIO register accesses are device accesses; the model backs each written
  MMIO page with a small byte store, so reads return what was last written
  (like a BAR of GPU memory).  Unwritten MMIO reads as zeros.

The parts live in their own modules, combined by :class:`HostMemory`:
:mod:`kvmmu.host_state` (page sizes, shared state), :mod:`kvmmu.host_vma`,
:mod:`kvmmu.host_gup`, :mod:`kvmmu.physmem`, :mod:`kvmmu.host_pin` and
:mod:`kvmmu.host_invalidate`.
"""

from __future__ import annotations

from kvmmu.host_gup import GupMixin
from kvmmu.host_invalidate import InvalidateMixin, MmuNotifier
from kvmmu.host_pin import PinMixin
from kvmmu.host_state import (
    KVM_HPAGE_SIZE,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    RAM_BASE,
    TASK_SIZE_MAX,
    HostStats,
)
from kvmmu.host_vma import Vma, VmaMixin
from kvmmu.physmem import PhysMemMixin

__all__ = [
    "KVM_HPAGE_SIZE",
    "KVM_PAGES_PER_HPAGE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "RAM_BASE",
    "TASK_SIZE_MAX",
    "HostMemory",
    "HostStats",
    "MmuNotifier",
    "Vma",
]


class HostMemory(VmaMixin, GupMixin, PhysMemMixin, PinMixin, InvalidateMixin):
    """The host: VMAs, GUP (hva -> pfn), page bytes, MMU notifiers and pins.

    ``maxphyaddr`` bounds host physical addresses (36..52); RAM pfns are
    allocated from ``[RAM_BASE, 2**(maxphyaddr-1))``.
    """
