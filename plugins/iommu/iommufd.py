"""IOMMUFD objects and ioctls: IOAS, HWPT_PAGING, the RFC's HWPT_KVM, devices.

Modelled on ``drivers/iommu/iommufd/`` (``ioas.c``, ``io_pagetable.c``,
``hw_pagetable.c``, ``device.c``) and ``include/uapi/linux/iommufd.h``
(spec/consumers.md §2.1), plus the RFC's ``IOMMUFD_OBJ_HWPT_KVM`` (§2.2).
Every object has an id; errors are :class:`kvmmu.KvmError` with the errno
the kernel returns. A failing call changes nothing.

Pinning (spec/consumers.md §2.1 "Pinning"): an IOAS area's pages are
pinned once, when the IOAS has at least one paging domain (at map time, or
when the first domain is filled), and unpinned when the area is unmapped
or the last domain goes away.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from kvmmu.errors import KvmError
from kvmmu.plugins.iommu.domain import Iommu, KvmDomain, PagingDomain
from kvmmu.plugins.iommu.iopf import GroupOutcome, IopfFault, handle_group
from kvmmu.plugins.iommu.pgtable import IoPteFormat

if TYPE_CHECKING:
    from kvmmu.plugins.iommu.device import DmaDevice
    from kvmmu.plugins.iommu.tdp_fd import KvmTdpFd

__all__ = [
    "IOMMU_IOAS_MAP_FIXED_IOVA",
    "IOMMU_IOAS_MAP_READABLE",
    "IOMMU_IOAS_MAP_WRITEABLE",
    "U64_MAX",
    "Area",
    "BoundDevice",
    "HwptKvm",
    "HwptPaging",
    "Ioas",
    "Iommufd",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = (1 << 64) - 1
#: include/uapi/linux/iommufd.h, enum iommufd_ioas_map_flags (spec/consumers.md §2.1)
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2
#: enum iommufd_hwpt_alloc_flags (spec/consumers.md §2.1)
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
_MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
#: Highest IOVA the modelled IOMMU translates (48-bit, 4-level second level).
IOVA_LIMIT = 1 << 48


@dataclass(eq=False)
class Area:
    """One IOAS_MAP: ``[iova, iova+length)`` -> user VA, with its pins."""

    iova: int
    length: int
    user_va: int
    readable: bool
    writable: bool
    pfns: np.ndarray | None = None  # pinned pfns while the IOAS has a domain

    @property
    def last(self) -> int:
        return self.iova + self.length - 1

    @property
    def npages(self) -> int:
        return self.length >> PAGE_SHIFT


@dataclass(eq=False)
class Ioas:
    """``IOMMUFD_OBJ_IOAS``: the IOVA map, copied into every linked HWPT_PAGING."""

    id: int
    areas: list[Area] = field(default_factory=list)  # sorted by iova
    hwpts: list[HwptPaging] = field(default_factory=list)

    def overlapping(self, first: int, last: int) -> list[Area]:
        return [a for a in self.areas if a.iova <= last and first <= a.last]


@dataclass(eq=False)
class HwptPaging:
    """``IOMMUFD_OBJ_HWPT_PAGING``: a kernel-managed domain linked to an IOAS."""

    id: int
    ioas: Ioas
    domain: PagingDomain
    auto: bool
    devices: list[BoundDevice] = field(default_factory=list)


@dataclass(eq=False)
class HwptKvm:
    """The RFC's ``IOMMUFD_OBJ_HWPT_KVM``: no IOAS; the domain is KVM's TDP.

    ``IOMMU_HWPT_ALLOC`` with ``IOMMU_HWPT_DATA_KVM`` (spec/consumers.md §2.2
    [TDP-12/13]): takes a ref on the TDP FD, allocates the KVM domain,
    registers as an importer for invalidations and handles IOPFs.
    """

    id: int
    tdp_fd: KvmTdpFd
    domain: KvmDomain
    devices: list[BoundDevice] = field(default_factory=list)
    invalidations: int = 0
    pages_invalidated: int = 0
    groups: int = 0
    responses: dict[str, int] = field(default_factory=dict)
    importer: Callable[[int, int], None] | None = None

    def invalidate(self, iommu: Iommu, gfn: int, nr_pages: int) -> None:
        """``iommufd_kvmtdp_invalidate`` -> ``cache_invalidate_kvm`` (T5 [TDP-15])."""
        self.invalidations += 1
        self.pages_invalidated += nr_pages
        iommu.invalidate(self.domain, gfn, nr_pages)

    def handle_iopf(self, faults: list[IopfFault]) -> GroupOutcome:
        """The KVM-HWPT fault work item: sticky errors, one response (T3 [TDP-15])."""
        self.groups += 1
        out = handle_group(
            faults,
            lambda f: self.tdp_fd.fault(
                f.addr >> PAGE_SHIFT, read=f.read, write=f.write, exec=f.exec
            ),
        )
        self.responses[out.response.name] = self.responses.get(out.response.name, 0) + 1
        return out


@dataclass(eq=False)
class BoundDevice:
    """``IOMMUFD_OBJ_DEVICE``: a device bound by VFIO; attached to at most one HWPT."""

    id: int
    dev: DmaDevice
    hwpt: HwptPaging | HwptKvm | None = None


class Iommufd:
    """One ``/dev/iommu`` context: its objects, and the IOMMU they program."""

    def __init__(self, host: Any, iommu: Iommu) -> None:
        self.host = host
        self.iommu = iommu
        self.objects: dict[int, Ioas | HwptPaging | HwptKvm | BoundDevice] = {}
        self._next_id = 1
        self._next_domain = 1
        self.pinned_pages = 0  # pages pinned by this context right now
        self.pins_total = 0  # pages ever pinned
        self.map_calls = 0
        self.unmap_calls = 0

    # ------------------------------------------------------------ objects
    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _get(self, obj_id: int, kind: type, what: str) -> Any:
        """``iommufd_get_object``: -ENOENT for an unknown id or the wrong type."""
        obj = self.objects.get(obj_id)
        if not isinstance(obj, kind):
            found = "no object" if obj is None else f"a {type(obj).__name__}"
            raise KvmError(errno.ENOENT, f"{what}: id {obj_id} is {found}, not a {kind.__name__}")
        return obj

    def ioas(self, ioas_id: int) -> Ioas:
        ioas: Ioas = self._get(ioas_id, Ioas, "IOAS")
        return ioas

    def hwpts(self) -> list[HwptPaging | HwptKvm]:
        return [o for o in self.objects.values() if isinstance(o, HwptPaging | HwptKvm)]

    def devices(self) -> list[BoundDevice]:
        return [o for o in self.objects.values() if isinstance(o, BoundDevice)]

    # --------------------------------------------------------------- IOAS
    def ioas_alloc(self) -> int:
        """``IOMMU_IOAS_ALLOC``."""
        ioas = Ioas(self._new_id())
        self.objects[ioas.id] = ioas
        return ioas.id

    def ioas_map(self, ioas_id: int, user_va: int, length: int, flags: int, iova: int = 0) -> int:
        """``IOMMU_IOAS_MAP``; returns the IOVA (chosen unless FIXED_IOVA).

        Errors in the kernel's order (``ioas.c: iommufd_ioas_map``, then
        ``io_pagetable.c``): unknown flags -EOPNOTSUPP; ``iova`` or ``length``
        >= U64_MAX -EOVERFLOW; neither READABLE nor WRITEABLE -EINVAL; only
        then an unknown IOAS -ENOENT. Then zero length or an IOVA/length/user
        VA not page aligned -EINVAL; a FIXED range that wraps u64 -EOVERFLOW,
        that leaves the modelled aperture (reserved IOVA) -EINVAL or overlaps
        a mapping -EEXIST; no free IOVA range -ENOSPC; pinning an unmapped
        (or, for WRITEABLE, read-only) user VA -EFAULT.
        """
        if flags & ~_MAP_FLAGS:
            raise KvmError(
                errno.EOPNOTSUPP,
                f"IOAS_MAP: unknown flags {flags & ~_MAP_FLAGS:#x}; allowed FIXED_IOVA (1), "
                "WRITEABLE (2), READABLE (4)",
            )
        if iova >= U64_MAX or length >= U64_MAX:
            raise KvmError(errno.EOVERFLOW, "IOAS_MAP: iova or length >= ULONG_MAX")
        if not flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE):
            raise KvmError(errno.EINVAL, "IOAS_MAP: flags need READABLE and/or WRITEABLE")
        ioas = self.ioas(ioas_id)
        if length <= 0:
            raise KvmError(errno.EINVAL, f"IOAS_MAP: length must be positive, got {length}")
        fixed = bool(flags & IOMMU_IOAS_MAP_FIXED_IOVA)
        for name, v in (("user_va", user_va), ("length", length)) + (
            (("iova", iova),) if fixed else ()
        ):
            if v < 0 or v % PAGE_SIZE:
                raise KvmError(
                    errno.EINVAL,
                    f"IOAS_MAP: {name} {v:#x} must be a multiple of out_iova_alignment "
                    f"({PAGE_SIZE:#x})",
                )
        if fixed:
            # iopt_check_iova: wrap -EOVERFLOW, reserved IOVA -EINVAL, mapped -EEXIST
            if iova + length - 1 > U64_MAX:
                raise KvmError(errno.EOVERFLOW, "IOAS_MAP: iova + length - 1 overflows u64")
            if iova + length > IOVA_LIMIT:
                raise KvmError(
                    errno.EINVAL,
                    f"IOAS_MAP: [{iova:#x}, {iova + length:#x}) reaches past the domain "
                    f"aperture {IOVA_LIMIT:#x} (reserved IOVA)",
                )
            hit = ioas.overlapping(iova, iova + length - 1)
            if hit:
                raise KvmError(
                    errno.EEXIST,
                    f"IOAS_MAP: FIXED_IOVA [{iova:#x}, {iova + length:#x}) overlaps the "
                    f"mapping at {hit[0].iova:#x}; unmap it first (no replacing)",
                )
        else:
            iova = self._alloc_iova(ioas, length, user_va)
        area = Area(
            iova,
            length,
            user_va,
            bool(flags & IOMMU_IOAS_MAP_READABLE),
            bool(flags & IOMMU_IOAS_MAP_WRITEABLE),
        )
        if ioas.hwpts:
            self._pin(area)  # raises before anything changed
            for hwpt in ioas.hwpts:
                self._fill(hwpt.domain, area)
        bisect.insort(ioas.areas, area, key=lambda a: a.iova)
        self.map_calls += 1
        return iova

    @staticmethod
    def _alloc_iova(ioas: Ioas, length: int, user_va: int = 0) -> int:
        """``iopt_alloc_iova``: the lowest free hole, never IOVA 0 (-ENOSPC if none).

        The search starts at PAGE_SIZE ("Does not return a 0 IOVA even if it
        is valid") and the IOVA is aligned to ``min(roundup_pow_of_two(length),
        lowest set bit of user_va)`` (just the first when ``user_va`` is 0) to
        keep huge-page alignment (``io_pagetable.c``).
        """
        align = 1 << (length - 1).bit_length()
        if user_va:
            align = min(align, user_va & -user_va)
        align = max(align, PAGE_SIZE)
        cur = PAGE_SIZE
        for a in ioas.areas:
            cur = -(-cur // align) * align
            if a.iova - cur >= length:
                return cur
            cur = max(cur, a.last + 1)
        cur = -(-cur // align) * align
        if IOVA_LIMIT - cur >= length:
            return cur
        raise KvmError(errno.ENOSPC, f"IOAS_MAP: no free IOVA range of {length:#x} bytes")

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP``; returns the bytes unmapped.

        Kernel order (``ioas.c: iommufd_ioas_unmap``, ``iopt_unmap_iova``):
        unknown IOAS -ENOENT; ``(0, U64_MAX)`` unmaps everything and succeeds
        on an empty IOAS (``iopt_unmap_all``); else ``iova`` or ``length`` >=
        U64_MAX -EOVERFLOW, length 0 -EINVAL, a range wrapping u64
        -EOVERFLOW. The range must cover whole earlier maps, and a range
        holding no map is -ENOENT. ``iopt_unmap_iova_range`` works through
        the maps in IOVA order and stops at the first one the range would
        cut (-ENOENT): maps below it that the range covers whole are already
        unmapped by then, as in the kernel (the error carries no byte count).
        """
        ioas = self.ioas(ioas_id)
        unmap_all = iova == 0 and length == U64_MAX
        if not unmap_all:
            if iova >= U64_MAX or length >= U64_MAX:
                raise KvmError(errno.EOVERFLOW, "IOAS_UNMAP: iova or length >= ULONG_MAX")
            if length <= 0:
                raise KvmError(errno.EINVAL, "IOAS_UNMAP: length must be positive")
            if iova < 0 or iova + length - 1 > U64_MAX:
                raise KvmError(errno.EOVERFLOW, "IOAS_UNMAP: iova + length overflows u64")
        last = U64_MAX if unmap_all else iova + length - 1
        hit = ioas.overlapping(iova, last)
        if not hit and not unmap_all:
            raise KvmError(
                errno.ENOENT, f"IOAS_UNMAP: nothing mapped in [{iova:#x}, {last + 1:#x})"
            )
        unmapped = 0
        for a in hit:  # sorted by IOVA, like iopt_area_iter_first
            if a.iova < iova or a.last > last:
                if unmapped:
                    self.unmap_calls += 1
                raise KvmError(
                    errno.ENOENT,
                    f"IOAS_UNMAP: [{iova:#x}, {last + 1:#x}) would split the mapping "
                    f"[{a.iova:#x}, {a.last + 1:#x}); splitting or truncating is not allowed"
                    + (f" ({unmapped:#x} bytes below it were unmapped)" if unmapped else ""),
                )
            for hwpt in ioas.hwpts:
                self._unfill(hwpt.domain, a)
            self._unpin(a)
            ioas.areas.remove(a)
            unmapped += a.length
        self.unmap_calls += 1
        return unmapped

    # ------------------------------------------------------------ pinning
    def _pin(self, area: Area) -> None:
        """``pin_user_pages`` for the area, once (spec/consumers.md §2.1 Pinning)."""
        if area.pfns is not None:
            return
        try:
            area.pfns = self.host.pin(area.user_va, area.npages, write=area.writable)
        except KvmError as e:
            raise KvmError(
                errno.EFAULT,
                f"IOAS_MAP: cannot pin user VA [{area.user_va:#x}, "
                f"{area.user_va + area.length:#x}): {e.message}",
            ) from e
        self.pinned_pages += area.npages
        self.pins_total += area.npages

    def _unpin(self, area: Area) -> None:
        if area.pfns is None:
            return
        self.host.unpin(area.user_va, area.npages)
        self.pinned_pages -= area.npages
        area.pfns = None

    def _fill(self, dom: PagingDomain, area: Area) -> None:
        assert area.pfns is not None
        first = area.iova >> PAGE_SHIFT
        for i, pfn in enumerate(area.pfns.tolist()):
            dom.pgtable.map_page(first + i, int(pfn), read=area.readable, write=area.writable)

    def _unfill(self, dom: PagingDomain, area: Area) -> None:
        first = area.iova >> PAGE_SHIFT
        for i in range(area.npages):
            dom.pgtable.unmap_page(first + i)
        # the kernel invalidates the IOTLB as part of unmap (spec/consumers.md §2.1)
        self.iommu.invalidate(dom, first, area.npages)

    # --------------------------------------------------------------- HWPT
    def _new_paging(self, ioas: Ioas, *, auto: bool) -> HwptPaging:
        """Allocate a domain and fill it from the IOAS (``iopt_table_add_domain``)."""
        dom = PagingDomain(self._next_domain)
        pinned_now: list[Area] = []
        try:
            if not ioas.hwpts:
                for a in ioas.areas:
                    if a.pfns is None:
                        self._pin(a)
                        pinned_now.append(a)
        except KvmError:
            for a in pinned_now:
                self._unpin(a)
            raise
        for a in ioas.areas:
            self._fill(dom, a)
        self._next_domain += 1
        hwpt = HwptPaging(self._new_id(), ioas, dom, auto)
        ioas.hwpts.append(hwpt)
        self.objects[hwpt.id] = hwpt
        return hwpt

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0) -> int:
        """``IOMMU_HWPT_ALLOC`` of a HWPT_PAGING over IOAS ``pt_id``.

        Kernel order (``hw_pagetable.c: iommufd_hwpt_alloc``): flags other than
        NEST_PARENT / DIRTY_TRACKING -EOPNOTSUPP; unknown ``dev_id`` -ENOENT;
        a ``pt_id`` that is no object, or not an IOAS, -EINVAL (the kernel
        maps the lookup failure to -EINVAL). NEST_PARENT / DIRTY_TRACKING are
        not modelled: -EOPNOTSUPP, as an IOMMU without those capabilities
        answers (no ``domain_alloc_user``).
        """
        known = IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        if flags & ~known:
            raise KvmError(errno.EOPNOTSUPP, f"HWPT_ALLOC: unknown flags {flags & ~known:#x}")
        self._get(dev_id, BoundDevice, "HWPT_ALLOC dev_id")
        ioas = self.objects.get(pt_id)
        if not isinstance(ioas, Ioas):
            raise KvmError(errno.EINVAL, f"HWPT_ALLOC: pt_id {pt_id} is not an IOAS")
        if flags:
            raise KvmError(
                errno.EOPNOTSUPP,
                f"HWPT_ALLOC: flags {flags:#x} unsupported by this IOMMU (no nesting, no "
                "dirty tracking); only 0 is allowed",
            )
        return self._new_paging(ioas, auto=False).id

    def hwpt_alloc_kvm(
        self, dev_id: int, tdp_fd: KvmTdpFd, fmt: IoPteFormat, levels: int, table_of: Any
    ) -> int:
        """``IOMMU_HWPT_ALLOC`` with ``IOMMU_HWPT_DATA_KVM`` (the RFC, §2.2 step 2)."""
        self._get(dev_id, BoundDevice, "HWPT_ALLOC dev_id")
        if tdp_fd.released:
            raise KvmError(errno.EBADF, "HWPT_ALLOC: the KVM TDP FD is closed")
        tdp_fd.get()
        dom = KvmDomain(self._next_domain, tdp_fd.root_hpa, levels, fmt, table_of)
        self._next_domain += 1
        hwpt = HwptKvm(self._new_id(), tdp_fd, dom)
        iommu = self.iommu

        def importer(gfn: int, nr: int) -> None:
            hwpt.invalidate(iommu, gfn, nr)

        hwpt.importer = importer
        tdp_fd.register_importer(importer)
        self.objects[hwpt.id] = hwpt
        return hwpt.id

    # ------------------------------------------------------------ devices
    def bind(self, dev: DmaDevice) -> int:
        """``iommufd_device_bind`` (VFIO cdev bind): claims DMA ownership."""
        for d in self.devices():
            if d.dev is dev:
                raise KvmError(errno.EBUSY, f"device {dev.name!r} is already bound (id {d.id})")
        bd = BoundDevice(self._new_id(), dev)
        self.objects[bd.id] = bd
        dev.bound = bd
        return bd.id

    def attach(self, dev_id: int, pt_id: int) -> int:
        """``IOMMU_*_ATTACH``: attach to a HWPT, or to an IOAS (auto domain); returns the HWPT id.

        An unknown ``pt_id`` is -ENOENT, an object that is neither an IOAS
        nor a HWPT -EINVAL (``device.c: iommufd_device_change_pt``). Attaching
        to an IOAS reuses an existing *auto* HWPT of it, never a manually
        allocated one. Attaching an already attached device is -EINVAL (use replace). A
        KVM HWPT needs a device with IOPF/PRI (-EOPNOTSUPP otherwise; the
        RFC's use case is devices with full IOPF, T12).
        """
        bd = self._get(dev_id, BoundDevice, "ATTACH dev_id")
        if bd.hwpt is not None:
            raise KvmError(
                errno.EINVAL, f"ATTACH: device {bd.dev.name!r} is already attached to {bd.hwpt.id}"
            )
        obj = self.objects.get(pt_id)
        hwpt: HwptPaging | HwptKvm
        if obj is None:
            raise KvmError(errno.ENOENT, f"ATTACH: no object with id {pt_id}")
        if isinstance(obj, Ioas):
            # iommufd_device_auto_get_domain reuses only auto-created domains
            auto = [h for h in obj.hwpts if h.auto]
            hwpt = auto[0] if auto else self._new_paging(obj, auto=True)
        elif isinstance(obj, HwptPaging | HwptKvm):
            hwpt = obj
        else:
            # iommufd_device_change_pt: any other object type is -EINVAL
            raise KvmError(errno.EINVAL, f"ATTACH: pt_id {pt_id} is neither an IOAS nor a HWPT")
        if isinstance(hwpt, HwptKvm) and not bd.dev.iopf:
            raise KvmError(
                errno.EOPNOTSUPP,
                f"ATTACH: device {bd.dev.name!r} has no IOPF support; a KVM HWPT has no "
                "pinned pages, so it needs full IOPF (spec/consumers.md T12)",
            )
        hwpt.devices.append(bd)
        bd.hwpt = hwpt
        return hwpt.id

    def detach(self, dev_id: int) -> None:
        """Detach; an auto-created HWPT goes away with its last device."""
        bd = self._get(dev_id, BoundDevice, "DETACH dev_id")
        hwpt = bd.hwpt
        if hwpt is None:
            raise KvmError(errno.EINVAL, f"DETACH: device {bd.dev.name!r} is not attached")
        hwpt.devices.remove(bd)
        bd.hwpt = None
        self.iommu.iotlb.invalidate_domain(hwpt.domain.id)
        if isinstance(hwpt, HwptPaging) and hwpt.auto and not hwpt.devices:
            self._destroy_hwpt(hwpt)

    def unbind(self, dev_id: int) -> None:
        """``iommufd_device_unbind``: detaches first."""
        bd = self._get(dev_id, BoundDevice, "UNBIND dev_id")
        if bd.hwpt is not None:
            self.detach(dev_id)
        bd.dev.bound = None
        del self.objects[dev_id]

    # ------------------------------------------------------------ destroy
    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY``: -EBUSY while the object is in use, -ENOENT if unknown."""
        obj = self.objects.get(obj_id)
        if obj is None:
            raise KvmError(errno.ENOENT, f"DESTROY: no object with id {obj_id}")
        if isinstance(obj, BoundDevice):
            raise KvmError(errno.EINVAL, f"DESTROY: device {obj_id} is released by unbind")
        if isinstance(obj, Ioas):
            if obj.hwpts:
                raise KvmError(
                    errno.EBUSY,
                    f"DESTROY: IOAS {obj_id} still has HWPTs {[h.id for h in obj.hwpts]}",
                )
            for a in list(obj.areas):
                self._unpin(a)
            obj.areas.clear()
            del self.objects[obj_id]
            return
        if obj.devices:
            raise KvmError(
                errno.EBUSY,
                f"DESTROY: HWPT {obj_id} still has devices {[d.id for d in obj.devices]} attached",
            )
        self._destroy_hwpt(obj)

    def _destroy_hwpt(self, hwpt: HwptPaging | HwptKvm) -> None:
        if isinstance(hwpt, HwptPaging):
            ioas = hwpt.ioas
            ioas.hwpts.remove(hwpt)
            for a in ioas.areas:
                self._unfill(hwpt.domain, a)
                if not ioas.hwpts:
                    self._unpin(a)
        else:
            # flow step 6: free the domain, unregister the importer, put the FD
            if hwpt.importer is not None:
                hwpt.tdp_fd.unregister_importer(hwpt.importer)
            hwpt.tdp_fd.put()
        self.iommu.iotlb.invalidate_domain(hwpt.domain.id)
        del self.objects[hwpt.id]
