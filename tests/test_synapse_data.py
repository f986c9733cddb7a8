"""Synapse readers (TransUNet npz/h5 and raw BTCV NIfTI) and the synthetic sample set."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import LoadSynapsed, detect_synapse_layout, make_synapse_sample, synapse_datalist
from common.data.synapse import BTCV_TO_SYNAPSE, HU_RANGE


@pytest.fixture(scope="module")
def sample(module_tmp):
    return make_synapse_sample(str(module_tmp("synapse")), n_train=2, n_test=1, size=64, depth=6)


def test_layouts_and_splits(sample):
    tu, nii = os.path.join(sample, "transunet"), os.path.join(sample, "nifti")
    assert detect_synapse_layout(tu) == "transunet" and detect_synapse_layout(nii) == "nifti"
    assert len(synapse_datalist(tu, "train")) == 12 and len(synapse_datalist(nii, "train")) == 12
    assert [d["case"] for d in synapse_datalist(tu, "test")] == ["case0001"]
    assert [d["case"] for d in synapse_datalist(nii, "test")] == ["case0001"]  # TransUNet's test split
    assert len(synapse_datalist(tu, "test", slices=True)) == 6
    with pytest.raises(ValueError, match="no validation split"):
        synapse_datalist(tu, "valid")


def test_both_layouts_give_the_same_volume(sample):
    load = LoadSynapsed()
    a = load(synapse_datalist(os.path.join(sample, "transunet"), "test")[0])
    b = load(synapse_datalist(os.path.join(sample, "nifti"), "test")[0])
    assert a["image"].shape == b["image"].shape == (1, 64, 64, 6)
    assert torch.equal(a["label"], b["label"]) and torch.allclose(a["image"], b["image"])
    assert set(torch.unique(a["label"]).tolist()) <= set(range(9))
    assert float(b["image"].min()) >= 0 and float(b["image"].max()) <= 1


def test_nifti_preprocessing_is_transunets(tmp_path):
    """HU clipped to [-125, 275] then scaled to [0, 1]; BTCV labels mapped to the 8 organs, others dropped."""
    (tmp_path / "img").mkdir()
    (tmp_path / "label").mkdir()
    hu = np.array([-1000, -125, 75, 275, 1000, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.int16).reshape(1, 14, 1)
    btcv = np.arange(14, dtype=np.uint8).reshape(1, 14, 1)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "img" / "img0005.nii.gz"))
    nib.save(nib.Nifti1Image(btcv, np.eye(4)), str(tmp_path / "label" / "label0005.nii.gz"))
    d = LoadSynapsed()(synapse_datalist(str(tmp_path), "train", slices=False)[0])
    lo, hi = HU_RANGE
    assert d["image"][0, 0, :5, 0].tolist() == pytest.approx([0, 0, (75 - lo) / (hi - lo), 1, 1])
    want = [BTCV_TO_SYNAPSE.get(v, 0) for v in range(14)]
    assert d["label"][0, 0, :, 0].tolist() == want


def test_reader_errors_name_the_file(tmp_path, sample):
    with pytest.raises(FileNotFoundError, match="not found"):
        synapse_datalist(str(tmp_path / "missing"), "train")
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 4)), label=np.full((4, 4), 12.0))
    with pytest.raises(ValueError, match="bad.npz.*not organ indices"):
        LoadSynapsed()({"image": str(bad), "label": str(bad)})
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, image=np.zeros((4, 4)), label=np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shapes.npz: image shape"):
        LoadSynapsed()({"image": str(shapes), "label": str(shapes)})
