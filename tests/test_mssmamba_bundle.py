"""The mssmamba_synapse bundle end to end through the MONAI bundle CLI."""

from __future__ import annotations

import json
import os

import bundle_checks
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.bundle_run import run_workflow

QUICK = {"image_size": 64, "batch_size": 8, "num_workers": 0, "show_progress": False}
ORGANS = ["aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach"]


def fresh_bundle(tmp_path) -> str:
    return bundle_checks.fresh_bundle("mssmamba_synapse", tmp_path)


def test_metadata_is_valid():
    meta = bundle_checks.check_metadata("mssmamba_synapse")
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channels[str(i)] for i in range(1, 9)] == [o.replace("_", " ") for o in ORGANS]


def test_verify_net_in_out():
    bundle_checks.check_net_in_out("mssmamba_synapse")


@pytest.mark.slow
def test_bundle_cli_learns_evaluates_and_infers(tmp_path):
    """The bundle CLI end to end on the sample data, with a learning check: about 12 minutes of CPU
    training, then the mean Dice of the 8 organs >= 0.74 on the 2 held-out sample volumes (per-volume
    3D Dice of the best checkpoint, the bundle's evaluation), then inference on every sample volume.

    The recipe's optimizer and learning rate (SGD 0.01, momentum 0.9, poly decay), batch 4 at 64 x 64,
    12 epochs (216 steps), no augmentation (a short run with TransUNet's rotations and flips confuses
    the left and right kidneys). Until 2026-12-07: 16 epochs and a bar of 0.78 (0.825-0.829 over 5
    seeds on an H100, 0.80-0.82 on CPUs), cut to keep the CI under 40 minutes. 12 epochs gave
    0.776-0.803 over 4 seeds on an H100 and 0.788 on CPU with this test's seed 1234, every organ found
    in all 8 sample volumes (benchmarks/results/learning_sweeps_ci_cuda_2026-12-07.json,
    learning_checks_cpu_2026-12-07.json), hence 0.74; an untrained network scores about 0.0."""
    root = fresh_bundle(tmp_path)
    noaug = {"_target_": "Identityd", "keys": ["image", "label"]}
    run_workflow(root, "training", {**QUICK, "batch_size": 4, "epochs": 12, "val_interval": 2,
                                    "train#augmentation": noaug}, capture=True)
    for name in ("model.pt", "model_final.pt"):
        ckpt = torch.load(os.path.join(root, "models", name), map_location="cpu", weights_only=True)
        assert "hlaem.alise2.weight" in ckpt.get("model", ckpt)
    run_workflow(root, "evaluating", {"image_size": 64, "num_workers": 0}, capture=True)
    with open(os.path.join(root, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert [r["case"] for r in metrics["per_volume"]] == ["case0001", "case0002"]
    assert {f"val_mean_dice_{o}" for o in ORGANS} | {f"val_hd95_{o}" for o in ORGANS} <= set(metrics["per_volume"][0])
    summary = {(s["metric"], s["class"]): s["mean"] for s in metrics["summary"]}
    print("sample-data test mean Dice", summary[("val_mean_dice", "mean")], summary)
    assert summary[("val_mean_dice", "mean")] >= 0.74
    run_workflow(root, "inference", {"image_size": 64, "save_overlays": True}, capture=True)
    sources = sorted(os.path.join(root, "sample_data", "nifti", "img", f) for f in
                     os.listdir(os.path.join(root, "sample_data", "nifti", "img")))
    assert len(sources) == 8
    for src in sources:
        out = os.path.join(root, "eval", "predictions", os.path.basename(src).replace(".nii.gz", "_seg.nii.gz"))
        pred, img = nib.load(out), nib.load(src)
        assert pred.shape == img.shape and np.allclose(pred.affine, img.affine)
        assert pred.get_data_dtype() == np.uint8
        labels = set(np.unique(np.asarray(pred.dataobj)).tolist())
        assert labels <= set(range(9)) and len(labels) >= 8  # background and (nearly) every organ found
        with Image.open(out.replace("_seg.nii.gz", "_overlay.png")) as im:
            assert im.size[1] == 96 and im.mode == "RGB"
