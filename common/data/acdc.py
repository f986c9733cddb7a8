"""ACDC cardiac MRI: data lists, a loader for both on-disk layouts, and a synthetic sample set.

Two layouts are read (3 foreground classes: 1 RV, 2 Myo, 3 LV; 0 background):

1. **MT-UNet preprocessed** (what MSVM-UNet, MT-UNet and most ACDC 2D papers train on)::

       <dataset_dir>/lists_ACDC/{train,valid,test}.txt   file names, one per line
       <dataset_dir>/{train,valid}/case_001_sliceED_0.npz  2D slices: "img" (H, W) float in [0, 1], "label"
       <dataset_dir>/test/case_002_volume_ED.npz          volumes:   "img" (D, H, W), "label" (D, H, W)

   (``lists/lists_ACDC`` is accepted as the list folder too.)

2. **Raw ACDC NIfTI** (the challenge download)::

       <dataset_dir>/training/patient001/patient001_frame01.nii.gz (+ _gt.nii.gz), ...
       <dataset_dir>/testing/patient101/...

   ``training`` patients give the training slices, ``testing`` patients the validation/test
   volumes. Each volume is min-max scaled to [0, 1] (the range of the MT-UNet files).

Everything is returned in one convention: 2D samples ``(1, H, W)``, volumes ``(1, H, W, D)``
(slices along the last axis), as MONAI MetaTensors; NIfTI inputs keep their affine.
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
    "ACDC_CLASSES",
    "acdc_datalist",
    "detect_acdc_layout",
    "LoadACDCd",
    "load_acdc",
    "make_acdc_sample",
    "ensure_acdc_sample",
]

ACDC_CLASSES = ("background", "RV", "Myo", "LV")
_LIST_DIRS = ("lists_ACDC", os.path.join("lists", "lists_ACDC"))
_FRAME_RE = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$")


def detect_acdc_layout(dataset_dir: str) -> str:
    """``"mtunet"`` or ``"nifti"``; :class:`~common.guards.BadInputError` naming the folder when it is neither
    (:class:`~common.guards.MissingInputError` when it does not exist)."""
    if not os.path.isdir(dataset_dir):
        raise MissingInputError(dataset_dir, "ACDC dataset folder not found")
    if any(os.path.isdir(os.path.join(dataset_dir, d)) for d in _LIST_DIRS):
        return "mtunet"
    if glob.glob(os.path.join(dataset_dir, "*", "patient*", "patient*_frame*_gt.nii*")):
        return "nifti"
    empty = " (the folder is empty)" if not os.listdir(dataset_dir) else ""
    raise BadInputError(
        dataset_dir,
        f"this folder is not an ACDC folder{empty}: expected lists_ACDC/ with train/ valid/ test/ npz files "
        "(MT-UNet layout) or training/ and testing/ with patientXXX/patientXXX_frameYY[_gt].nii.gz (raw ACDC)",
    )


def _mtunet_list(dataset_dir: str, split: str) -> list[str]:
    for d in _LIST_DIRS:
        path = os.path.join(dataset_dir, d, f"{split}.txt")
        if os.path.isfile(path):
            with open(path) as f:
                return [line.strip() for line in f if line.strip()]
    raise MissingInputError(dataset_dir, f"no list file for split '{split}' (looked for lists_ACDC/{split}.txt)")


def _nifti_cases(dataset_dir: str, subset: str) -> list[dict]:
    cases = []
    for gt in sorted(glob.glob(os.path.join(dataset_dir, subset, "patient*", "patient*_frame*_gt.nii*"))):
        image = gt.replace("_gt.nii", ".nii")
        if not os.path.isfile(image):
            raise MissingInputError(gt, f"this label has no image beside it (expected {image})")
        cases.append({"image": image, "label": gt, "case": os.path.basename(image).split(".nii")[0]})
    return cases


def acdc_datalist(dataset_dir: str, split: str, slices: bool | None = None) -> list[dict]:
    """Data dicts (``image``, ``label``, ``case``; ``slice`` for slices of NIfTI volumes) of a split.

    Args:
        dataset_dir: an ACDC folder in either layout (see the module docstring).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        slices: one entry per 2D slice (training) or per volume (evaluation); default: slices for
            ``"train"``, volumes otherwise.
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    slices = (split == "train") if slices is None else slices
    layout = detect_acdc_layout(dataset_dir)
    if layout == "mtunet":
        items = []
        for name in _mtunet_list(dataset_dir, split):
            path = os.path.join(dataset_dir, split, name if name.endswith(".npz") else name + ".npz")
            if not os.path.isfile(path):
                raise MissingInputError(path, f"listed in lists_ACDC/{split}.txt but does not exist")
            items.append({"image": path, "label": path, "case": os.path.splitext(os.path.basename(path))[0]})
        is_volume = bool(items) and _depth_or_none(items[0]["image"]) is not None
        if slices and is_volume:
            return expand_slices(items, _depth)
        if not slices and items and not is_volume:
            return _group_slices(items)
        return items
    cases = _nifti_cases(dataset_dir, "training" if split == "train" else "testing")
    if not cases:
        raise MissingInputError(dataset_dir, f"no patient*_frame*_gt.nii[.gz] files for split '{split}'")
    return expand_slices(cases, _depth) if slices else cases


_SLICE_RE = re.compile(r"^(.*)_slice([A-Za-z]+)_(\d+)$")


def _group_slices(items: list[dict]) -> list[dict]:
    """MT-UNet slice files (case_019_sliceED_3.npz) grouped into volumes, slices in index order."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for item in items:
        m = _SLICE_RE.match(item["case"])
        if not m:
            raise BadInputError(item["image"], "slice file name is not <case>_slice<FRAME>_<index>.npz")
        groups.setdefault(f"{m.group(1)}_volume_{m.group(2)}", []).append((int(m.group(3)), item["image"]))
    out = []
    for case, members in groups.items():
        paths = [p for _, p in sorted(members)]
        out.append({"image": paths, "label": paths, "case": case})
    return out


def _depth_or_none(path: str) -> int | None:
    """Depth of an npz volume, None for a 2D slice file."""
    img = _read_npz(path)[0]
    return int(img.shape[0]) if img.ndim == 3 else None


def _depth(path: str) -> int:
    if path.endswith(".npz"):
        img = _read_npz(path)[0]
        if img.ndim != 3:
            raise BadInputError(path, f"expected a (D, H, W) volume, got shape {img.shape}")
        return int(img.shape[0])
    return volume_depth(path)


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            missing = [k for k in ("img", "label") if k not in data.files]
            if missing:
                raise BadInputError(path, f"npz file has no {missing[0]!r} array (it has {data.files}; "
                                          "expected 'img' and 'label')")
            img, label = data["img"], data["label"]
    except BadInputError:
        raise
    except FileNotFoundError as err:
        raise MissingInputError(path, "npz file not found") from err
    except Exception as err:
        raise BadInputError(path, f"cannot read npz file: it is corrupt or truncated ({err})") from err
    if img.shape != label.shape:
        raise BadInputError(path, f"image shape {img.shape} and label shape {label.shape} differ")
    check_finite(img.astype(np.float32), path)
    return img.astype(np.float32), label.astype(np.float32)


def load_acdc(item: Mapping, normalize_nifti: bool = True) -> tuple[MetaTensor, MetaTensor]:
    """Image and label of one data dict, channel-first: ``(1, H, W)`` slices or ``(1, H, W, D)`` volumes."""
    path, slice_index = item["image"], item.get("slice")
    if isinstance(path, (list, tuple)):  # MT-UNet slices of one volume -> (H, W, D)
        pairs = [_read_npz(p) for p in path]
        shapes = {p[0].shape for p in pairs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise BadInputError(path[0], f"the slices of this volume differ in shape or are not 2D: {shapes}")
        img, label = np.stack([p[0] for p in pairs], -1), np.stack([p[1] for p in pairs], -1)
        meta = {"filename_or_obj": path[0]}
        return (MetaTensor(torch.from_numpy(img)[None], meta=dict(meta)),
                MetaTensor(torch.from_numpy(label)[None], meta=dict(meta)))
    if str(path).endswith(".npz"):
        img, label = _read_npz(path)
        if img.ndim == 3:  # (D, H, W) volume -> (H, W, D)
            img, label = np.moveaxis(img, 0, -1), np.moveaxis(label, 0, -1)
            if slice_index is not None:
                img, label = img[..., slice_index], label[..., slice_index]
        elif img.ndim != 2:
            raise BadInputError(path, f"expected a 2D slice or a 3D volume, got shape {img.shape}")
        meta = {"filename_or_obj": path}
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(img))[None], meta=dict(meta))
        lab = MetaTensor(torch.from_numpy(np.ascontiguousarray(label))[None], meta=dict(meta))
        return image, lab
    image, lab = read_volume(path, "image"), read_volume(item["label"], "label")
    if image.shape != lab.shape:
        raise BadInputError(path, f"image shape {tuple(image.shape[1:])} and label shape {tuple(lab.shape[1:])} "
                                  f"differ (label {item['label']})")
    if normalize_nifti:
        lo, hi = image.min(), image.max()
        image = (image - lo) / (hi - lo) if hi > lo else image * 0
    if slice_index is not None:
        image, lab = image[..., slice_index], lab[..., slice_index]
    return image, lab


class LoadACDCd(MapTransform):
    """Load ``image`` and ``label`` of an ACDC data dict from either layout (see :func:`load_acdc`).

    Label values are checked to be class indices 0..3. Every problem with a file (missing, corrupt,
    2D or 4D, several channels, NaN / infinite voxels, shapes of image and label differ, other label
    values) raises one :class:`~common.guards.BundleError` naming it.
    """

    def __init__(self, keys=("image", "label"), normalize_nifti: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError("LoadACDCd takes exactly two keys: the image key and the label key")
        self.normalize_nifti = normalize_nifti

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, label_key = self.keys
        image, label = load_acdc({"image": d[image_key], "label": d[label_key], "slice": d.get("slice")},
                                 self.normalize_nifti)
        label_path = d[label_key][0] if isinstance(d[label_key], (list, tuple)) else d[label_key]
        check_label_values(label, str(label_path), len(ACDC_CLASSES),
                           "class indices 0..3 of this bundle (" +
                           ", ".join(f"{i} {n}" for i, n in enumerate(ACDC_CLASSES)) + ")")
        d[image_key], d[label_key] = image, label
        return d


# --------------------------------------------------------------------------------------------
# Synthetic sample data
# --------------------------------------------------------------------------------------------


def _phantom(rng: np.random.Generator, size: tuple[int, int], depth: int, es: bool):
    """One cine frame: (H, W, D) float image in [0, 1] and uint8 labels (RV 1, Myo 2, LV 3)."""
    h, w = size
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.zeros((h, w, depth), np.float32)
    lab = np.zeros((h, w, depth), np.uint8)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.45, 0.6)
    lv_r = min(h, w) * rng.uniform(0.10, 0.14) * (0.8 if es else 1.0)
    myo_t = lv_r * rng.uniform(0.35, 0.5) * (1.25 if es else 1.0)
    angle = rng.uniform(-0.5, 0.5)
    body_r = (h * rng.uniform(0.40, 0.46), w * rng.uniform(0.40, 0.46))
    tissue = rng.uniform(0.25, 0.35)
    for k in range(depth):
        scale = 1.0 - 0.55 * (k / max(depth - 1, 1)) ** 1.5  # base to apex
        r = lv_r * scale
        dy, dx = yy - cy, xx - cx
        dist = np.sqrt(dy**2 + (dx * rng.uniform(0.95, 1.05)) ** 2)
        body = ((yy - h / 2) / body_r[0]) ** 2 + ((xx - w / 2) / body_r[1]) ** 2 <= 1
        lv = dist <= r
        myo = (dist > r) & (dist <= r + myo_t * (0.8 + 0.2 * scale))
        # RV: a crescent on the septal side, rotated by `angle`
        ry, rx = cy + 1.6 * r * np.sin(angle + np.pi), cx + 1.6 * r * np.cos(angle + np.pi) - 0.4 * r
        rv_shape = ((yy - ry) / (1.3 * r)) ** 2 + ((xx - rx) / (0.9 * r * (0.7 if es else 1.0))) ** 2 <= 1
        rv = rv_shape & ~myo & ~lv & (scale > 0.55)
        sl = np.where(body, tissue, 0.02).astype(np.float32)
        sl[myo] = rng.uniform(0.38, 0.45)
        sl[lv] = rng.uniform(0.80, 0.90)
        sl[rv] = rng.uniform(0.72, 0.85)
        lab[..., k][rv], lab[..., k][myo], lab[..., k][lv] = 1, 2, 3
        bias = 1 + 0.15 * np.sin(xx / w * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
        img[..., k] = sl * bias
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    img = np.clip(img, 0, None)
    return img / img.max(), lab


def make_acdc_sample(out_dir: str, n_train: int = 6, n_valid: int = 1, n_test: int = 2,
                     size: tuple[int, int] = (96, 96), depth: int = 8, seed: int = 0) -> str:
    """Write a deterministic synthetic ACDC-like set in both layouts and return ``out_dir``.

    ``out_dir/mtunet`` holds the MT-UNet layout (train/valid slices, test volumes, lists_ACDC),
    ``out_dir/nifti`` the raw layout (``training`` = train + valid patients, ``testing`` = test
    patients), with the same phantoms: short-axis stacks of ``depth`` slices, ED and ES frames,
    a bright LV blood pool (3) in a dark myocardial ring (2) and an RV crescent (1), noise and a
    smooth bias field, geometry varying per patient.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    mt, nii = os.path.join(out_dir, "mtunet"), os.path.join(out_dir, "nifti")
    lists: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    splits = ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test
    for d in ("lists_ACDC", "train", "valid", "test"):
        os.makedirs(os.path.join(mt, d), exist_ok=True)
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    for pid, split in enumerate(splits, start=1):
        for frame, tag, es in ((1, "ED", False), (10, "ES", True)):
            img, lab = _phantom(rng, size, depth, es)
            if split == "test":
                name = f"case_{pid:03d}_volume_{tag}.npz"
                np.savez_compressed(os.path.join(mt, "test", name), img=np.moveaxis(img, -1, 0),
                                    label=np.moveaxis(lab, -1, 0).astype(np.float32))
                lists["test"].append(name)
            else:
                for k in range(depth):
                    name = f"case_{pid:03d}_slice{tag}_{k}.npz"
                    np.savez_compressed(os.path.join(mt, split, name), img=img[..., k],
                                        label=lab[..., k].astype(np.float32))
                    lists[split].append(name)
            subset = "testing" if split == "test" else "training"
            pdir = os.path.join(nii, subset, f"patient{pid:03d}")
            os.makedirs(pdir, exist_ok=True)
            raw = np.round(img * 800).astype(np.int16)  # raw ACDC images are integer MR intensities
            nib.save(nib.Nifti1Image(raw, affine), os.path.join(pdir, f"patient{pid:03d}_frame{frame:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(lab, affine), os.path.join(pdir, f"patient{pid:03d}_frame{frame:02d}_gt.nii.gz"))
    for split, names in lists.items():
        with open(os.path.join(mt, "lists_ACDC", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return out_dir


def ensure_acdc_sample(out_dir: str, **kwargs) -> str:
    """Generate the sample set into ``out_dir`` unless it is already there (atomic: temp dir + rename)."""
    return ensure_generated(out_dir, os.path.join("mtunet", "lists_ACDC", "test.txt"),
                            lambda tmp: make_acdc_sample(tmp, **kwargs))
