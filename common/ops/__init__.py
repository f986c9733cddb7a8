"""Operators: the selective scan and its backends."""

from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_torch
from .selective_scan import (
    SCAN_BACKEND_ENV,
    SCAN_BACKENDS,
    available_backends,
    backend_unavailable_reason,
    resolve_backend,
    selective_scan,
)

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
    "resolve_backend",
    "available_backends",
    "backend_unavailable_reason",
    "SCAN_BACKENDS",
    "SCAN_BACKEND_ENV",
]
