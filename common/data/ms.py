"""Multiple-sclerosis FLAIR lesion data: readers, the Mamba-HUNet pipeline, a synthetic sample set.

Two on-disk layouts are read (class 0 background, 1 lesion):

1. **Muslim et al. 2022** (Data in Brief 42:108139, Mendeley Data ``8bctsm8jz7``: 60 patients,
   consensus lesion masks of three experts)::

       <dataset_dir>/Patient-1/1-Flair.nii            FLAIR volume
       <dataset_dir>/Patient-1/1-LesionSeg-Flair.nii  lesion mask on the FLAIR grid
       (T1/T2 volumes and their masks beside them are ignored; ``.nii.gz`` is accepted too)

2. **MSSEG-2** (MICCAI 2021 new-lesion challenge)::

       <dataset_dir>/<patient>/flair_time01_on_middle_space.nii.gz
       <dataset_dir>/<patient>/flair_time02_on_middle_space.nii.gz
       <dataset_dir>/<patient>/ground_truth.nii.gz    consensus of new lesions (4 experts)

   The second time point is the image (new lesions are visible on it) and the consensus
   ``ground_truth`` the label. A 2D single-FLAIR network cannot tell new from old lesions; the
   paper trains on this data anyway, so do we, and we say so in the bundle README.

Pipeline (the paper's section 3: volumes -> 2D axial slices, resize to 256 x 256, sharpening and
intensity normalisation, 70/15/15 split), with the choices the paper leaves open made here:

- **Split by patient, never by slice** (:func:`split_cases`: seeded permutation of the sorted
  patient ids; 15 % test, 15 % validation, at least one patient each when there are three or more).
  The paper splits images, which puts slices of one patient in both training and test sets.
- **Sharpening**: unsharp masking in the axial plane, ``x + 1.0 * (x - G_sigma=1(x))`` (zero-padded at the
  image border, where FLAIR is background), through
  MONAI's ``GaussianSharpen`` (sigma 0 across slices, so each slice is sharpened on its own, the
  same whether a volume or a slice is processed).
- **Intensity normalisation**: per volume, the 0.5th..99.5th percentile range scaled to [0, 1]
  and clipped (MONAI ``ScaleIntensityRangePercentiles``). Per volume rather than per slice so
  that training slices and the slices of a volume at inference see identical values.
- Masks are binarised (``> 0``). Images must be 3D and finite; mask and image must match in shape.

Everything is returned channel-first: slices ``(1, H, W)``, volumes ``(1, H, W, D)`` (axial slices
along the last axis, as NIfTI stores them), MONAI MetaTensors that keep the NIfTI affine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, GaussianSharpen, MapTransform, ScaleIntensityRangePercentiles

from ..guards import BadInputError, MissingInputError, check_finite, check_label_values, read_volume, volume_depth
from .sample import ensure_generated, expand_slices

__all__ = [
    "MS_CLASSES",
    "find_ms_cases",
    "split_cases",
    "ms_datalist",
    "flair_preprocessing",
    "LoadMSFlaird",
    "PreprocessFlaird",
    "find_flair_images",
    "make_ms_sample",
    "ensure_ms_sample",
]

MS_CLASSES = ("background", "lesion")
_MUSLIM_DIR = re.compile(r"^Patient-(\d+)$")
_NII = (".nii", ".nii.gz")


def _first_existing(paths: Sequence[str]) -> str | None:
    return next((p for p in paths if os.path.isfile(p)), None)


def find_ms_cases(dataset_dir: str) -> list[dict]:
    """Every patient of ``dataset_dir`` in either layout: dicts ``case``, ``image``, ``label``, ``layout``.

    Raises :class:`~common.guards.MissingInputError` / :class:`~common.guards.BadInputError` naming the
    folder when it is missing, holds no patient, or a patient's FLAIR has no mask (or the other way round).
    """
    if not os.path.isdir(dataset_dir):
        raise MissingInputError(dataset_dir, "MS dataset folder does not exist")
    cases = []
    for entry in sorted(os.listdir(dataset_dir)):
        folder = os.path.join(dataset_dir, entry)
        if not os.path.isdir(folder):
            continue
        m = _MUSLIM_DIR.match(entry)
        if m:
            n = m.group(1)
            image = _first_existing([os.path.join(folder, f"{n}-Flair{e}") for e in _NII])
            label = _first_existing([os.path.join(folder, f"{n}-LesionSeg-Flair{e}") for e in _NII])
            layout = "muslim2022"
        else:
            image = _first_existing([os.path.join(folder, f"flair_time02_on_middle_space{e}") for e in _NII])
            label = _first_existing([os.path.join(folder, f"ground_truth{e}") for e in _NII])
            layout = "msseg2"
            if image is None and label is None:
                continue  # not a patient folder
        if image is None or label is None:
            have, miss = (image, "lesion mask") if label is None else (label, "FLAIR image")
            raise MissingInputError(folder, f"found {os.path.basename(have) if have else 'nothing'} but no "
                                            f"{miss} ({layout} layout: see common/data/ms.py)")
        cases.append({"case": entry, "image": image, "label": label, "layout": layout})
    if not cases:
        empty = " (the folder is empty)" if not os.listdir(dataset_dir) else ""
        raise BadInputError(dataset_dir, f"this folder holds no MS patients{empty}: expected Patient-N/N-Flair.nii + "
                                         "N-LesionSeg-Flair.nii (Muslim et al. 2022) or "
                                         "<id>/flair_time02_on_middle_space.nii.gz + ground_truth.nii.gz (MSSEG-2) "
                                         "folders")

    def key(c):  # Patient-2 before Patient-10
        m = _MUSLIM_DIR.match(c["case"])
        return (0, int(m.group(1)), "") if m else (1, 0, c["case"])

    return sorted(cases, key=key)


def split_cases(cases: Sequence[dict], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> dict[str, list[dict]]:
    """Patient-level ``train``/``valid``/``test`` split: a seeded permutation of the patients.

    Validation and test get ``round(fraction * n)`` patients each, at least one when ``n >= 3``;
    training gets the rest. The same cases and seed always give the same split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = (int(round(f * n)) for f in fractions[1:])
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    pick = lambda idx: [cases[i] for i in sorted(idx)]  # noqa: E731
    return {"train": pick(train), "valid": pick(val), "test": pick(test)}


def _depth(path: str) -> int:
    return volume_depth(path, "FLAIR image")


def ms_datalist(dataset_dir: str, split: str, slices: bool | None = None, seed: int = 0,
                fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[dict]:
    """Data dicts of one split (``"train"``, ``"valid"``, ``"test"`` or ``"all"``).

    Args:
        dataset_dir: a folder in either layout (see the module docstring).
        split: which patients; ``"all"`` takes every patient (inference on a whole folder).
        slices: one entry per axial slice (``slice`` = index) or per volume; default: slices for
            ``"train"``, volumes otherwise.
        seed, fractions: the patient split (:func:`split_cases`).
    """
    if split not in ("train", "valid", "test", "all"):
        raise ValueError(f"split must be 'train', 'valid', 'test' or 'all', got {split!r}")
    cases = find_ms_cases(dataset_dir)
    chosen = cases if split == "all" else split_cases(cases, fractions, seed)[split]
    if not chosen:
        raise BadInputError(dataset_dir, f"the {split} split is empty ({len(cases)} patients; "
                                         f"fractions {tuple(fractions)})")
    slices = (split == "train") if slices is None else slices
    return expand_slices(chosen, _depth) if slices else list(chosen)


def flair_preprocessing(sharpen_sigma: float = 1.0, sharpen_amount: float = 1.0,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> Compose:
    """The paper's sharpening + intensity normalisation for a channel-first 2D slice or 3D volume.

    Unsharp masking in the axial plane (MONAI ``GaussianSharpen`` with no pre-blur: ``x + a (x -
    G_sigma(x))``, sigma 0 across slices), then the percentile range of the whole input scaled to
    [0, 1] and clipped. Returns an array transform (use it inside a dictionary transform).
    """
    sigma2 = (sharpen_sigma, sharpen_sigma, 0.0)
    return Compose([
        _InPlaneSharpen(sigma2, sharpen_amount),
        ScaleIntensityRangePercentiles(lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True),
    ])


class PreprocessFlaird(MapTransform):
    """Dictionary form of :func:`flair_preprocessing` (intensity only: nothing for ``Invertd`` to undo)."""

    def __init__(self, keys="image", allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = flair_preprocessing(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite(d[key], getattr(d[key], "meta", {}).get("filename_or_obj", key))
            d[key] = self.transform(d[key])
        return d


_MASK_WORDS = ("lesionseg", "ground_truth", "mask", "label", "seg.", "_seg", "_lesions")


def find_flair_images(folder: str,
                      extensions: Sequence[str] = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) -> list[str]:
    """Image files under ``folder`` (recursive) to segment, sorted.

    Lesion masks (names with ``LesionSeg``, ``ground_truth``, ``mask``, ``label``, ``seg``) and the
    MSSEG-2 first time point (``time01``) are skipped; when some names contain ``flair``, only those
    are taken (so the T1/T2 volumes of the Muslim et al. layout are left alone).
    """
    if not os.path.isdir(folder):
        raise MissingInputError(folder, "input folder does not exist")
    files = []
    for base, _, names in os.walk(folder):
        for name in names:
            low = name.lower()
            if low.endswith(tuple(extensions)) and not any(w in low for w in _MASK_WORDS) and "time01" not in low:
                files.append(os.path.join(base, name))
    flair = [f for f in files if "flair" in os.path.basename(f).lower()]
    return sorted(flair or files)


class _InPlaneSharpen:
    """``GaussianSharpen`` restricted to the first two spatial axes of 2D or 3D input (no pre-blur)."""

    def __init__(self, sigma2: tuple[float, float, float], alpha: float) -> None:
        self.sigma2, self.alpha = sigma2, alpha

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        spatial = img.ndim - 1
        sigma2 = self.sigma2[:spatial]
        return GaussianSharpen(sigma1=(0.0,) * spatial, sigma2=sigma2, alpha=self.alpha)(img)


class LoadMSFlaird(MapTransform):
    """Load a FLAIR volume and its lesion mask (either layout), preprocess, optionally pick a slice.

    The whole volume is read and normalised (:func:`flair_preprocessing`) before the ``slice``
    index of the data dict (if any) is taken, so slices and volumes see the same intensities.

    Raises one :class:`~common.guards.BundleError` naming the file for: missing or unreadable
    (corrupt, truncated) files, 2D or 4D images, several channels, NaN / infinite voxels, image and
    mask shapes that differ, and mask values that are not labels (negative, fractional: any positive
    whole number is lesion).
    """

    def __init__(self, keys=("image", "label"), preprocess: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError("LoadMSFlaird takes exactly two keys: the image key and the label key")
        self.preprocess = flair_preprocessing() if preprocess else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ik, lk = self.keys
        path, label_path = str(d[ik]), str(d[lk])
        image, label = read_volume(path, "FLAIR image"), read_volume(label_path, "lesion mask")
        if image.shape != label.shape:
            raise BadInputError(path, f"image shape {tuple(image.shape[1:])} and mask shape "
                                      f"{tuple(label.shape[1:])} differ (mask {label_path})")
        check_label_values(label, label_path, None, "mask labels (0 background, any positive whole number "
                                                    "lesion)", what="lesion mask")
        if self.preprocess is not None:
            image = self.preprocess(image)
        label = (label > 0).to(torch.float32)
        index = d.get("slice")
        if index is not None:
            image, label = image[..., index], label[..., index]
        d[ik], d[lk] = image, label
        return d


# --------------------------------------------------------------------------------------------
# Synthetic sample data
# --------------------------------------------------------------------------------------------

SAMPLE_SPACING = (0.9, 0.9, 3.0)  # mm: in-plane and slice spacing typical of clinical 2D FLAIR


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return ((c * dy + s * dx) / ry) ** 2 + ((-s * dy + c * dx) / rx) ** 2


def _flair_phantom(rng: np.random.Generator, size: int, depth: int, n_lesions: int):
    """One FLAIR-like head: (H, W, D) int16 scanner values and a uint8 lesion mask."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    img = np.zeros((size, size, depth), np.float32)
    mask = np.zeros((size, size, depth), np.uint8)
    ry, rx = 0.86 * rng.uniform(0.95, 1.05), 0.72 * rng.uniform(0.95, 1.05)
    wm_all = np.zeros_like(img, bool)
    zs = np.linspace(-0.85, 0.85, depth)
    for k, z in enumerate(zs):
        shrink = np.sqrt(max(1.0 - z * z, 0.05))
        head = _ellipse(yy, xx, 0.0, 0.0, ry * shrink, rx * shrink)
        scalp = (head <= 1.0) & (head > 0.84)
        skull = (head <= 0.84) & (head > 0.72)
        brain = head <= 0.72
        cortex = brain & (head > 0.5)
        sl = np.zeros((size, size), np.float32)
        sl[scalp] = 0.45
        sl[skull] = 0.04
        sl[brain] = 0.50  # white matter
        sl[cortex] = 0.62  # grey matter is brighter than white matter on FLAIR
        vent = np.zeros_like(brain)
        if abs(z) < 0.55:  # lateral ventricles: two dark crescents either side of the midline
            for side in (-1, 1):
                vent |= _ellipse(yy, xx, -0.05, side * 0.12 * shrink, 0.32 * shrink, 0.07 * shrink, side * 0.25) <= 1
            sl[vent] = 0.10
        img[..., k] = sl
        wm_all[..., k] = brain & ~cortex & ~vent
    # lesions: hyperintense ovoids in white matter, many periventricular, varied size
    zz_idx = np.arange(depth)
    placed = 0
    for _ in range(n_lesions * 20):
        if placed == n_lesions:
            break
        k = int(rng.integers(1, depth - 1))
        cand = np.argwhere(wm_all[..., k])
        if len(cand) == 0:
            continue
        cy, cx = cand[rng.integers(len(cand))]
        r_in = rng.uniform(2.5, 6.0)  # voxels (2.3-5.4 mm)
        r_z = rng.uniform(0.7, 1.6)  # slices
        ang = rng.uniform(0, np.pi)
        yi, xi = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        d2 = _ellipse(yi[..., None], xi[..., None], cy, cx, r_in * rng.uniform(1.1, 1.8), r_in, ang)
        d2 = d2 + ((zz_idx[None, None, :] - k) / r_z) ** 2
        blob = (d2 <= 1.0) & wm_all
        if blob.sum() < 6:
            continue
        mask[blob] = 1
        img[blob] = rng.uniform(0.88, 1.0)
        placed += 1
    # smooth edges, bias field, noise, scanner scaling
    from scipy import ndimage

    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0.0))
    bias = 1.0 + 0.08 * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
    img = img * bias[..., None] + rng.normal(0.0, 0.025, img.shape).astype(np.float32)
    scanner = np.clip(img, 0, None) * rng.uniform(700, 1200)
    return scanner.astype(np.int16), mask


def make_ms_sample(out_dir: str, n_patients: int = 10, size: int = 96, depth: int = 14, seed: int = 0,
                   layout: str = "muslim2022") -> str:
    """Write a deterministic synthetic MS FLAIR set in the ``muslim2022`` or ``msseg2`` layout; returns ``out_dir``.

    Each patient gets 3-9 hyperintense ovoid white-matter lesions of 2.5-6 voxels radius, on a head
    phantom with scalp, skull, cortex, white matter and dark lateral ventricles, a bias field and
    noise, stored as int16 NIfTI with ``SAMPLE_SPACING`` voxels.
    """
    import nibabel as nib

    if layout not in ("muslim2022", "msseg2"):
        raise ValueError(f"layout must be 'muslim2022' or 'msseg2', got {layout!r}")
    rng = np.random.default_rng(seed)
    affine = np.diag([*SAMPLE_SPACING, 1.0])
    for p in range(1, n_patients + 1):
        flair, mask = _flair_phantom(rng, size, depth, int(rng.integers(3, 10)))
        if layout == "muslim2022":
            folder = os.path.join(out_dir, f"Patient-{p}")
            names = (f"{p}-Flair.nii.gz", f"{p}-LesionSeg-Flair.nii.gz")
        else:
            folder = os.path.join(out_dir, f"{p:03d}")
            names = ("flair_time02_on_middle_space.nii.gz", "ground_truth.nii.gz")
        os.makedirs(folder, exist_ok=True)
        nib.save(nib.Nifti1Image(flair, affine), os.path.join(folder, names[0]))
        nib.save(nib.Nifti1Image(mask, affine), os.path.join(folder, names[1]))
    return out_dir


def ensure_ms_sample(out_dir: str, **kwargs) -> str:
    """Generate the sample set into ``out_dir`` unless it is there (temporary folder, then rename)."""
    n = kwargs.get("n_patients", 10)
    marker = os.path.join(f"Patient-{n}", f"{n}-LesionSeg-Flair.nii.gz")
    if kwargs.get("layout") == "msseg2":
        marker = os.path.join(f"{n:03d}", "ground_truth.nii.gz")
    return ensure_generated(out_dir, marker, lambda tmp: make_ms_sample(tmp, **kwargs))
