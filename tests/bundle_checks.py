"""Checks every bundle's tests run: a clean copy of the bundle, metadata against the schema, net in/out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
        res = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta_file,
                              "--filepath", SCHEMA], capture_output=True, text=True)
        assert res.returncode == 0 and "metadata is verified with no error" in res.stdout + res.stderr
    with open(meta_file) as f:
        meta = json.load(f)
    for key in REQUIRED_METADATA:
        assert key in meta, key
    return meta


def check_net_in_out(name: str, *extra: str) -> None:
    """``verify_net_in_out`` of ``network_def`` from the bundle's inference config, on CPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.json", *extra, "--device", "cpu"],
        cwd=os.path.join(REPO, name), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "data shape of network is verified with no error" in res.stdout + res.stderr
