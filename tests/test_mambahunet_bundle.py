"""The mambahunet_ms bundle end to end through the MONAI bundle CLI."""

from __future__ import annotations

import csv
import json
import os

import bundle_checks
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.bundle_run import run_workflow

QUICK = {"image_size": 96, "batch_size": 8, "num_workers": 0, "show_progress": False}


def fresh_bundle(tmp_path) -> str:
    return bundle_checks.fresh_bundle("mambahunet_ms", tmp_path)


def test_metadata_is_valid():
    meta = bundle_checks.check_metadata("mambahunet_ms")
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [256, 256]


def test_verify_net_in_out():
    bundle_checks.check_net_in_out("mambahunet_ms")


@pytest.mark.slow
def test_bundle_cli_learns_evaluates_and_infers(tmp_path):
    """The bundle CLI end to end on the sample data, with a learning check: about 7 minutes of CPU
    training, then lesion DSC >= 0.7 on the held-out test patients (per-volume 3D DSC of the best
    checkpoint, the bundle's evaluation), then inference on every sample volume.

    Batch 4 at 96 x 96, 350 iterations, the recipe's SGD (momentum 0.9, poly decay) at lr 0.05 instead
    of 0.01 (at 0.01 a run this short never starts segmenting), the recipe's augmentation and half of
    every batch from lesion slices (the bundle's foreground oversampling at 0.5 instead of 0.33).
    Chosen from GPU sweeps and CPU runs (benchmarks/results/learning_sweeps_ci_cuda_2026-12-07.json,
    learning_checks_cpu_2026-12-07.json): on an H100, test DSC 0.817-0.890 over 8 seeds (0.876 with
    this test's seed 1337); 300 iterations gave 0.709-0.872 (0.709 with seed 1337), too close to the
    bar. On CPU, seed 1337: 0.878 (300 iterations: 0.873). Until 2026-12-07 the check trained 400
    iterations at 0.33 (0.879 on CPU; onset at 200-300 iterations in 10 of 10 GPU seeds)."""
    root = fresh_bundle(tmp_path)
    run_workflow(root, "training", {**QUICK, "batch_size": 4, "max_iterations": 350, "learning_rate": 0.05,
                                    "oversample_foreground": 0.5, "val_interval": 2}, capture=True)
    for name in ("model.pt", "model_final.pt"):
        ckpt = torch.load(os.path.join(root, "models", name), map_location="cpu", weights_only=True)
        assert any(k.startswith("decoder.") for k in ckpt.get("model", ckpt))
    run_workflow(root, "evaluating", {"image_size": 96, "num_workers": 0}, capture=True)
    with open(os.path.join(root, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert [r["case"] for r in metrics["per_volume"]] == ["Patient-5", "Patient-7"]  # the seed-0 test patients
    columns = {f"val_{m}_lesion" for m in ("iou", "mean_dice", "hd95", "sensitivity", "specificity")}
    assert columns <= set(metrics["per_volume"][0])
    summary = {(s["metric"], s["class"]): s["mean"] for s in metrics["summary"]}
    print("sample-data test lesion DSC", summary[("val_mean_dice", "lesion")], summary)
    assert summary[("val_mean_dice", "lesion")] >= 0.7
    run_workflow(root, "inference", {"image_size": 96, "save_overlays": True}, capture=True)
    sample = os.path.join(root, "sample_data")
    with open(os.path.join(root, "eval", "predictions", "lesions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == sorted(f"Patient-{i}/{i}-Flair" for i in range(1, 11))
    # every sample patient has 3-9 lesions: the trained model finds lesions in most of them
    assert sum(int(r["lesion_count"]) >= 1 for r in rows) >= 5
    for row in rows:
        src = os.path.join(sample, row["case"] + ".nii.gz")
        out = os.path.join(root, "eval", "predictions", row["case"] + "_lesions.nii.gz")
        pred, img = nib.load(out), nib.load(src)
        assert pred.shape == img.shape and np.allclose(pred.affine, img.affine)
        assert pred.get_data_dtype() == np.uint8
        mask = np.asarray(pred.dataobj)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        assert float(row["lesion_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml, rel=1e-5)
        assert int(row["lesion_count"]) >= 0
        with Image.open(out.replace("_lesions.nii.gz", "_overlay.png")) as im:
            assert im.size[1] == 96 and im.mode == "RGB"
