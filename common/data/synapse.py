"""Synapse multi-organ CT (MICCAI 2015 BTCV): data lists, a loader for both layouts, sample data.

8 organs in TransUNet's label values: 1 aorta, 2 gallbladder, 3 left kidney, 4 right kidney,
5 liver, 6 pancreas, 7 spleen, 8 stomach (0 background).

1. **TransUNet preprocessed** (what TransUNet, HiFormer, MSSMamba train on)::

       <dataset_dir>/lists_Synapse/train.txt, test_vol.txt  (also lists/lists_Synapse/)
       <dataset_dir>/train_npz/case0005_slice000.npz        "image" (512, 512) in [0, 1], "label"
       <dataset_dir>/test_vol_h5/case0001.npy.h5            "image", "label" of shape (D, H, W)

2. **Raw Synapse / BTCV NIfTI**: ``<dataset_dir>/img/img0001.nii.gz`` and
   ``<dataset_dir>/label/label0001.nii.gz`` (13 BTCV labels). The loader applies TransUNet's
   preprocessing: HU clipped to [-125, 275] and scaled to [0, 1], labels mapped to the 8 organs
   (others -> background). Split: TransUNet's 12 test cases (``TEST_CASES``), the rest train.

Volumes come out as ``(1, H, W, D)`` (axial slices along the last axis), slices as ``(1, H, W)``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..guards import (
    BadInputError,
    MissingInputError,
    check_finite,
    check_label_values,
    read_volume,
    volume_depth,
)
from .sample import ensure_generated, expand_slices

__all__ = [
    "SYNAPSE_CLASSES",
    "BTCV_TO_SYNAPSE",
    "TEST_CASES",
    "HU_RANGE",
    "synapse_datalist",
    "detect_synapse_layout",
    "LoadSynapsed",
    "make_synapse_sample",
    "ensure_synapse_sample",
]

SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas",
                   "spleen", "stomach")
# BTCV: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta,
# 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right adrenal, 13 left adrenal
BTCV_TO_SYNAPSE = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
# TransUNet's test split (lists_Synapse/test_vol.txt)
TEST_CASES = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")
HU_RANGE = (-125.0, 275.0)
_LIST_DIRS = ("lists_Synapse", os.path.join("lists", "lists_Synapse"))


def detect_synapse_layout(dataset_dir: str) -> str:
    """``"transunet"`` or ``"nifti"``; an error naming the folder when it is neither."""
    if not os.path.isdir(dataset_dir):
        raise MissingInputError(dataset_dir, "Synapse dataset folder not found")
    if any(os.path.isdir(os.path.join(dataset_dir, d)) for d in _LIST_DIRS):
        return "transunet"
    if glob.glob(os.path.join(dataset_dir, "img", "img*.nii*")):
        return "nifti"
    empty = " (the folder is empty)" if not os.listdir(dataset_dir) else ""
    raise BadInputError(dataset_dir, f"this folder is not a Synapse folder{empty}: expected lists_Synapse/ with "
                                     "train_npz/ and test_vol_h5/ (TransUNet layout) or img/imgXXXX.nii.gz with "
                                     "label/labelXXXX.nii.gz (raw)")


def _list(dataset_dir: str, name: str) -> list[str]:
    for d in _LIST_DIRS:
        path = os.path.join(dataset_dir, d, name)
        if os.path.isfile(path):
            with open(path) as f:
                return [line.strip() for line in f if line.strip()]
    raise MissingInputError(dataset_dir, f"no lists_Synapse/{name} in this folder")


def synapse_datalist(dataset_dir: str, split: str, slices: bool | None = None) -> list[dict]:
    """Data dicts (``image``, ``label``, ``case``; ``slice`` for slices of volumes) of ``train`` or ``test``.

    ``slices`` defaults to True for ``train`` (2D training) and False for ``test`` (whole volumes).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (Synapse has no validation split), got {split!r}")
    slices = (split == "train") if slices is None else slices
    if detect_synapse_layout(dataset_dir) == "transunet":
        if split == "train":
            return _listed(dataset_dir, "train.txt", "train_npz", ".npz")
        vols = _listed(dataset_dir, "test_vol.txt", "test_vol_h5", ".npy.h5")
        return expand_slices(vols, _depth) if slices else vols
    vols = []
    for image in sorted(glob.glob(os.path.join(dataset_dir, "img", "img*.nii*"))):
        case = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(image))[3:]
        label = os.path.join(dataset_dir, "label", os.path.basename(image).replace("img", "label", 1))
        if not os.path.isfile(label):
            raise MissingInputError(image, f"this image has no label (expected {label})")
        if (case in TEST_CASES) == (split == "test"):
            vols.append({"image": image, "label": label, "case": "case" + case})
    if not vols:
        raise MissingInputError(dataset_dir, f"no {split} cases in this folder (test cases are "
                                             f"{', '.join(TEST_CASES)})")
    return expand_slices(vols, _depth) if slices else vols


def _listed(dataset_dir: str, list_name: str, folder: str, suffix: str) -> list[dict]:
    """Data dicts of the cases named in ``lists_Synapse/<list_name>`` (files ``<folder>/<name><suffix>``)."""
    items = []
    for name in _list(dataset_dir, list_name):
        path = os.path.join(dataset_dir, folder, name + suffix)
        if not os.path.isfile(path):
            raise MissingInputError(path, f"listed in lists_Synapse/{list_name} but does not exist")
        items.append({"image": path, "label": path, "case": name})
    return items


def _depth(path: str) -> int:
    if path.endswith((".npz", ".h5")):
        return _read(path)[0].shape[-1]
    return volume_depth(path)


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and label arrays of a TransUNet npz slice or h5 volume ((D,H,W) -> (H,W,D))."""
    try:
        if path.endswith(".h5"):
            import h5py

            with h5py.File(path, "r") as f:
                missing = [k for k in ("image", "label") if k not in f]
                if missing:
                    raise BadInputError(path, f"h5 file has no {missing[0]!r} dataset (expected 'image' and 'label')")
                img, lab = np.asarray(f["image"]), np.asarray(f["label"])
        else:
            with np.load(path) as f:
                missing = [k for k in ("image", "label") if k not in f.files]
                if missing:
                    raise BadInputError(path, f"npz file has no {missing[0]!r} array (expected 'image' and 'label')")
                img, lab = f["image"], f["label"]
    except BadInputError:
        raise
    except FileNotFoundError as err:
        raise MissingInputError(path, "file not found") from err
    except Exception as err:
        raise BadInputError(path, f"cannot read this file: it is corrupt or truncated ({err})") from err
    if img.shape != lab.shape:
        raise BadInputError(path, f"image shape {img.shape} and label shape {lab.shape} differ")
    check_finite(img.astype(np.float32), path)
    if img.ndim == 3:
        img, lab = np.moveaxis(img, 0, -1), np.moveaxis(lab, 0, -1)
    return img.astype(np.float32), lab.astype(np.float32)


class LoadSynapsed(MapTransform):
    """Load ``image`` and ``label`` of a Synapse data dict from either layout, channel-first.

    Raw NIfTI gets TransUNet's preprocessing (HU clip and scale, 13 -> 8 labels); labels are
    checked to be BTCV labels 0..13 (raw NIfTI) or organ indices 0..8 (TransUNet files). Every
    problem with a file (missing, corrupt, 2D or 4D, several channels, NaN / infinite voxels, shapes
    of image and label differ, other label values) raises one :class:`~common.guards.BundleError`
    naming it.
    """

    def __init__(self, keys=("image", "label"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError("LoadSynapsed takes exactly two keys: the image key and the label key")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ik, lk = self.keys
        path, index = str(d[ik]), d.get("slice")
        if path.endswith((".npz", ".h5")):
            img, lab = _read(path)
            if index is not None:
                img, lab = img[..., index], lab[..., index]
            image = MetaTensor(torch.from_numpy(np.ascontiguousarray(img))[None], meta={"filename_or_obj": path})
            label = MetaTensor(torch.from_numpy(np.ascontiguousarray(lab))[None], meta={"filename_or_obj": path})
        else:
            image, label = read_volume(path, "image"), read_volume(str(d[lk]), "label")
            if image.shape != label.shape:
                raise BadInputError(path, f"image shape {tuple(image.shape[1:])} and label shape "
                                          f"{tuple(label.shape[1:])} differ (label {d[lk]})")
            check_label_values(label, str(d[lk]), 14, "BTCV labels 0..13 (raw Synapse NIfTI)")
            lo, hi = HU_RANGE
            image = (image.clamp(lo, hi) - lo) / (hi - lo)
            mapped = torch.zeros_like(label)
            for btcv, organ in BTCV_TO_SYNAPSE.items():
                mapped[label == btcv] = organ
            label = mapped
            if index is not None:
                image, label = image[..., index], label[..., index]
        check_label_values(label, str(d[lk]), len(SYNAPSE_CLASSES), "organ indices 0..8 of this bundle (" +
                           ", ".join(f"{i} {n}" for i, n in enumerate(SYNAPSE_CLASSES)) + ")")
        d[ik], d[lk] = image, label
        return d


# --------------------------------------------------------------------------------------------
# Synthetic sample data
# --------------------------------------------------------------------------------------------

# organ: (BTCV label, HU, centre (y, x) as fractions of the body box, radii (ry, rx) as fractions).
# Drawn in this order, each into the voxels still free: the gallbladder and the kidneys come before the
# liver, so they stay whole where the liver reaches them (the gallbladder in its fossa; drawn after, it
# kept only the sliver outside the liver). The small
# organs (gallbladder, kidneys, aorta, pancreas) are drawn about 1.2x their typical share of the
# abdomen: the CPU learning checks train at 64 x 64, where MSSMamba's 1/4-resolution decoder sees a
# real-proportioned gallbladder as 1-2 feature pixels.
_ORGANS = {
    "gallbladder": (4, 10, (0.53, 0.36), (0.085, 0.075)),
    "right kidney": (2, 150, (0.68, 0.30), (0.095, 0.07)),
    "left kidney": (3, 150, (0.68, 0.70), (0.095, 0.07)),
    "liver": (6, 60, (0.45, 0.30), (0.22, 0.18)),
    "spleen": (1, 50, (0.55, 0.78), (0.12, 0.08)),
    "aorta": (8, 220, (0.60, 0.52), (0.065, 0.065)),
    "stomach": (7, 30, (0.35, 0.66), (0.11, 0.09)),
    "pancreas": (11, 45, (0.52, 0.56), (0.065, 0.15)),
}


def _ct_phantom(rng: np.random.Generator, size: int, depth: int):
    """(H, W, D) int16 HU volume and uint8 BTCV labels of an abdomen-like phantom."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    hu = np.full((size, size, depth), -1000, np.float32)
    lab = np.zeros((size, size, depth), np.uint8)
    jitter = {k: (rng.uniform(-0.03, 0.03, 2), rng.uniform(0.85, 1.15, 2)) for k in _ORGANS}
    for k in range(depth):
        z = k / max(depth - 1, 1)
        body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.47) ** 2 <= 1
        hu[..., k][body] = -90  # fat
        muscle = body & ~(((yy - 0.5) / 0.38) ** 2 + ((xx - 0.5) / 0.43) ** 2 <= 1)
        hu[..., k][muscle] = 45
        spine = ((yy - 0.78) / 0.06) ** 2 + ((xx - 0.5) / 0.06) ** 2 <= 1
        hu[..., k][spine] = 700
        for name, (value, organ_hu, (cy, cx), (ry, rx)) in _ORGANS.items():
            (dy, dx), (sy, sx) = jitter[name]
            extent = np.exp(-((z - 0.5) / 0.35) ** 2)  # organs grow and shrink through the stack
            if name in ("aorta",):
                extent = 1.0
            if name in ("gallbladder", "pancreas") and not 0.25 < z < 0.75:
                continue
            mask = ((yy - cy - dy) / (ry * sy * extent)) ** 2 + ((xx - cx - dx) / (rx * sx * extent)) ** 2 <= 1
            mask &= body & (lab[..., k] == 0)
            hu[..., k][mask] = organ_hu
            lab[..., k][mask] = value
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    return np.round(hu).astype(np.int16), lab


def make_synapse_sample(out_dir: str, n_train: int = 6, n_test: int = 2, size: int = 96, depth: int = 12,
                        seed: int = 0) -> str:
    """Write a deterministic synthetic Synapse-like set in both layouts; returns ``out_dir``.

    ``out_dir/transunet``: ``train_npz`` slices, ``test_vol_h5`` volumes and ``lists_Synapse``
    (train cases ``case0005``..., test cases from :data:`TEST_CASES`); ``out_dir/nifti``: ``img``
    and ``label`` NIfTI volumes in HU with BTCV's 13-label values, 1.5 x 1.5 x 3 mm voxels.
    """
    import h5py
    import nibabel as nib

    rng = np.random.default_rng(seed)
    tu, nii = os.path.join(out_dir, "transunet"), os.path.join(out_dir, "nifti")
    for d in (os.path.join(tu, "lists_Synapse"), os.path.join(tu, "train_npz"), os.path.join(tu, "test_vol_h5"),
              os.path.join(nii, "img"), os.path.join(nii, "label")):
        os.makedirs(d, exist_ok=True)
    train_ids = [f"{i:04d}" for i in range(1, 41) if f"{i:04d}" not in TEST_CASES][:n_train]
    test_ids = list(TEST_CASES[:n_test])
    lo, hi = HU_RANGE
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for cid in train_ids + test_ids:
        hu, btcv = _ct_phantom(rng, size, depth)
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), os.path.join(nii, "img", f"img{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(btcv, np.diag([1.5, 1.5, 3.0, 1.0])),
                 os.path.join(nii, "label", f"label{cid}.nii.gz"))
        image = (np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo)
        organs = np.zeros_like(btcv)
        for b, o in BTCV_TO_SYNAPSE.items():
            organs[btcv == b] = o
        if cid in test_ids:
            with h5py.File(os.path.join(tu, "test_vol_h5", f"case{cid}.npy.h5"), "w") as f:
                f.create_dataset("image", data=np.moveaxis(image, -1, 0))
                f.create_dataset("label", data=np.moveaxis(organs, -1, 0).astype(np.float32))
            lists["test"].append(f"case{cid}")
        else:
            for k in range(depth):
                name = f"case{cid}_slice{k:03d}"
                np.savez_compressed(os.path.join(tu, "train_npz", name + ".npz"), image=image[..., k],
                                    label=organs[..., k].astype(np.float32))
                lists["train"].append(name)
    with open(os.path.join(tu, "lists_Synapse", "train.txt"), "w") as f:
        f.write("\n".join(lists["train"]) + "\n")
    with open(os.path.join(tu, "lists_Synapse", "test_vol.txt"), "w") as f:
        f.write("\n".join(lists["test"]) + "\n")
    with open(os.path.join(tu, "lists_Synapse", "all.lst"), "w") as f:
        f.write("\n".join(f"case{c}.npy.h5" for c in train_ids + test_ids) + "\n")
    return out_dir


def ensure_synapse_sample(out_dir: str, **kwargs) -> str:
    """Generate the sample set into ``out_dir`` unless it is there (temporary folder, then rename)."""
    return ensure_generated(out_dir, os.path.join("transunet", "lists_Synapse", "test_vol.txt"),
                            lambda tmp: make_synapse_sample(tmp, **kwargs))
