"""Operators: the selective scan and its backends."""

from .dispatch import (
    SCAN_BACKEND_ENV,
    SCAN_BACKENDS,
    available_backends,
    backend_unavailable_reason,
    resolve_backend,
    selective_scan,
)
from .scan_export import selective_scan_export
from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_torch

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_export",
    "selective_scan_torch",
    "resolve_backend",
    "available_backends",
    "backend_unavailable_reason",
    "SCAN_BACKENDS",
    "SCAN_BACKEND_ENV",
]
