"""Building blocks shared by the networks: SS2D, the VSS block, patch embed / merge / expand."""

from ...ops.cross_scan import cross_merge, cross_scan
from .layers import (
    DropPath,
    LayerNorm2d,
    Linear2d,
    Mlp,
    PatchEmbed2D,
    PatchExpand2D,
    PatchMerging2D,
    to_channels_first,
    to_channels_last,
)
from .ss2d import SS2D
from .vss import VSSBlock

__all__ = [
    "SS2D",
    "VSSBlock",
    "cross_scan",
    "cross_merge",
    "DropPath",
    "LayerNorm2d",
    "Linear2d",
    "Mlp",
    "PatchEmbed2D",
    "PatchMerging2D",
    "PatchExpand2D",
    "to_channels_first",
    "to_channels_last",
]
