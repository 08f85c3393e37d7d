"""IO page faults (PCIe PRI page requests) grouped as the IOMMU core groups them.

A device reports faults in *groups* (the PRI "last page in group" unit,
``struct iopf_group`` in ``drivers/iommu/io-pgfault.c``). The IOMMUFD
KVM-HWPT work item of the RFC handles a group like this (spec/consumers.md
T3, [TDP-15]):

* every fault in the group becomes one ``tdp_fd->ops->fault(gfn, type)``;
* errors are **sticky**: after the first failure the rest are skipped;
* exactly **one** ``iommu_page_response`` goes out per group.

Response codes are ``enum iommu_page_response_code`` in
``include/linux/iommu.h``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["GroupOutcome", "IopfFault", "IopfGroup", "PageResponse", "handle_group"]


class PageResponse(IntEnum):
    """``IOMMU_PAGE_RESP_SUCCESS`` / ``_INVALID`` / ``_FAILURE`` (include/linux/iommu.h)."""

    SUCCESS = 0
    INVALID = 1
    FAILURE = 2


@dataclass(frozen=True, slots=True)
class IopfFault:
    """One page request: the faulting address and the access type.

    ``addr`` is an IOVA; in shared mode IOVA == GPA (T10: one GPA space).
    """

    addr: int
    read: bool = True
    write: bool = False
    exec: bool = False

    def __post_init__(self) -> None:
        if self.addr < 0:
            raise ValueError(f"IopfFault: addr must be non-negative, got {self.addr:#x}")
        if not (self.read or self.write or self.exec):
            raise ValueError("IopfFault: a page request asks for read, write or exec access")


@dataclass(frozen=True, slots=True)
class IopfGroup:
    """The faults a device reported together (one PRG)."""

    device: str
    faults: tuple[IopfFault, ...]

    def __post_init__(self) -> None:
        if not self.faults:
            raise ValueError("IopfGroup: a fault group holds at least one fault")


@dataclass
class GroupOutcome:
    """What handling one group did: the single response, and per-fault results."""

    response: PageResponse
    handled: int = 0
    skipped: int = 0
    #: negative errno of each handled fault, in order (0 = success)
    results: list[int] = field(default_factory=list)

    @property
    def first_error(self) -> int:
        """The first non-zero result, or 0."""
        return next((r for r in self.results if r), 0)


def handle_group(faults: Sequence[IopfFault], handler: Callable[[IopfFault], int]) -> GroupOutcome:
    """Handle ``faults`` in order with sticky errors; one response for the group.

    ``handler`` returns 0 or a negative errno. After the first error the
    remaining faults are skipped (never handed to KVM) and the group is
    answered ``FAILURE``; otherwise ``SUCCESS`` (spec/consumers.md T3,
    ``iommufd`` KVM-HWPT fault work item [TDP-15]).
    """
    out = GroupOutcome(PageResponse.SUCCESS)
    for i, f in enumerate(faults):
        rc = handler(f)
        out.results.append(rc)
        out.handled += 1
        if rc:
            out.response = PageResponse.FAILURE
            out.skipped = len(faults) - i - 1
            break
    return out
