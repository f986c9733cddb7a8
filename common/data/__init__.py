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
from .ms import (
    MS_CLASSES,
    LoadMSFlaird,
    PreprocessFlaird,
    ensure_ms_sample,
    find_flair_images,
    find_ms_cases,
    flair_preprocessing,
    make_ms_sample,
    ms_datalist,
    split_cases,
)
from .sampling import ForegroundOversampler, slices_with_foreground
from .synapse import (
    BTCV_TO_SYNAPSE,
    SYNAPSE_CLASSES,
    LoadSynapsed,
    detect_synapse_layout,
    ensure_synapse_sample,
    make_synapse_sample,
    synapse_datalist,
)

__all__ = [
    "ACDC_CLASSES",
    "LoadACDCd",
    "acdc_datalist",
    "detect_acdc_layout",
    "ensure_acdc_sample",
    "load_acdc",
    "make_acdc_sample",
    "MS_CLASSES",
    "LoadMSFlaird",
    "PreprocessFlaird",
    "ensure_ms_sample",
    "find_flair_images",
    "find_ms_cases",
    "flair_preprocessing",
    "make_ms_sample",
    "ms_datalist",
    "split_cases",
    "ForegroundOversampler",
    "slices_with_foreground",
    "BTCV_TO_SYNAPSE",
    "SYNAPSE_CLASSES",
    "LoadSynapsed",
    "detect_synapse_layout",
    "ensure_synapse_sample",
    "make_synapse_sample",
    "synapse_datalist",
]
