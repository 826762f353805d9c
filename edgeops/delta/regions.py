"""The value the layout readers produce: a tensor's bytes inside a file (light core: stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ELEM_SIZES", "LayoutError", "Region"]

ELEM_SIZES = (1, 2, 4, 8)  # element sizes the byte-plane split handles; anything else counts as 1


class LayoutError(ValueError):
    """A layout reader met bytes it cannot parse; internal: :func:`edgeops.delta.layout.find_regions` turns it
    into "no regions" (the file is then delta-coded as opaque bytes), so it never reaches a caller."""


@dataclass(frozen=True)
class Region:
    """``length`` bytes at ``offset`` holding one tensor's data, made of elements of ``elem_size`` bytes.

    ``key`` names the tensor stably across versions of a model (member path + tensor name, or member path +
    buffer index when the tensor has no name), so the encoder can pair a tensor with its previous version.
    """

    offset: int
    length: int
    elem_size: int
    key: str
