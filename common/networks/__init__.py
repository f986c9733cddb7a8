"""Networks and their building blocks."""

from .blocks import SS2D, VSSBlock
from .compile import compile_blocks

__all__ = ["SS2D", "VSSBlock", "compile_blocks"]
