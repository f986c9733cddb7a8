"""Networks and their building blocks."""

from .blocks import SS2D, VSSBlock

__all__ = ["SS2D", "VSSBlock"]
