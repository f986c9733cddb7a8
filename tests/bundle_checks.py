"""Checks every bundle's tests run: a clean copy of the bundle, metadata against the schema, net in/out."""

from __future__ import annotations

import json
import os
import shutil

from monai.bundle import verify_metadata, verify_net_in_out

from common.bundle_run import REPO

SCHEMA = os.path.join(REPO, "..", "shared", "schemas", "meta_schema_20240725.json")
REQUIRED_METADATA = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format")


def fresh_bundle(name: str, tmp_path) -> str:
    """A copy of the bundle folder without outputs, so runs do not touch the repository."""
    dst = os.path.join(str(tmp_path), name)
    shutil.copytree(os.path.join(REPO, name), dst, ignore=shutil.ignore_patterns("sample_data", "eval", "*.pt"))
    return dst


def tiny_acdc(folder) -> str:
    """A tiny synthetic ACDC set (2 training patients: 16 slices; 1 validation, 1 test) in the
    MT-UNet layout, for short training runs; returns its ``mtunet`` folder."""
    from common.data import make_acdc_sample

    root = make_acdc_sample(str(folder), n_train=2, n_valid=1, n_test=1, depth=4)
    return os.path.join(root, "mtunet")


def check_metadata(name: str) -> dict:
    """``verify_metadata`` against the local schema (when shared/ is beside), the required fields; the metadata."""
    meta_file = os.path.join(REPO, name, "configs", "metadata.json")
    if os.path.isfile(SCHEMA):
        # what ``python -m monai.bundle verify_metadata --meta_file ... --filepath ...`` runs (raises on
        # a violation), in this process: a CLI process would spend ~12 s importing MONAI
        verify_metadata(meta_file=meta_file, filepath=SCHEMA)
    with open(meta_file) as f:
        meta = json.load(f)
    for key in REQUIRED_METADATA:
        assert key in meta, key
    return meta


def check_net_in_out(name: str, **extra) -> None:
    """``verify_net_in_out`` of ``network_def`` from the bundle's inference config, on CPU.

    The function ``python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json
    --config_file configs/inference.json --device cpu`` runs (model-zoo CI's check; it raises on a shape or
    dtype mismatch), called in this process from the bundle folder: a CLI process would spend ~12 s
    importing MONAI. ``extra`` are its other arguments (``n``, ``p``, ...)."""
    cwd = os.getcwd()
    os.chdir(os.path.join(REPO, name))
    try:
        verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json",
                          config_file="configs/inference.json", device="cpu", **extra)
    finally:
        os.chdir(cwd)
