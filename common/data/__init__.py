"""Data readers, sample-data generators and data lists of the bundles."""

from .acdc import (
    ACDC_CLASSES,
    LoadACDCd,
    acdc_datalist,
    detect_acdc_layout,
    ensure_acdc_sample,
    load_acdc,
    make_acdc_sample,
)

__all__ = [
    "ACDC_CLASSES",
    "LoadACDCd",
    "acdc_datalist",
    "detect_acdc_layout",
    "ensure_acdc_sample",
    "load_acdc",
    "make_acdc_sample",
]
