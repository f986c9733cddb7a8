"""Per-volume, per-class segmentation report (CSV + JSON), written at the end of an evaluation.

MONAI's ignite metrics keep per-image, per-class values in ``engine.state.metric_details`` when
created with ``save_details=True`` (the default); this handler pairs them with the case names of
the batches and writes, atomically (temporary file + rename):

- ``<save_dir>/per_volume.csv``: one row per volume, one column per metric and class;
- ``<save_dir>/summary.csv``: per class and metric, mean and standard deviation over volumes,
  and the mean over the foreground classes;
- ``<save_dir>/metrics.json``: both of the above.

Conventions (MONAI's): a class absent from both prediction and label gives Dice NaN and is left
out of means; HD95 is in voxels (the papers' protocol, TransUNet's ``test_single_volume``), NaN
where either mask is empty.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from .guards import atomic_write as _atomic_write
from .guards import ensure_writable_dir

__all__ = ["SegmentationReport", "LesionReport", "lesion_stats", "source_case_name"]


def _case_name(meta) -> str:
    name = meta.get("filename_or_obj", "case") if isinstance(meta, dict) else str(meta)
    if isinstance(name, (list, tuple)):
        name = name[0]
    return _strip_ext(os.path.basename(str(name)))


def source_case_name(src: str, data_root_dir: str | None = None) -> str:
    """Case name of an image file: its path relative to ``data_root_dir`` (``/``-separated) when it lies
    inside that folder, else its file name; image extensions removed."""
    name = os.path.basename(str(src))
    if data_root_dir:
        rel = os.path.relpath(os.path.abspath(str(src)), os.path.abspath(data_root_dir))
        if not rel.startswith(".."):
            name = rel.replace(os.sep, "/")
    return _strip_ext(name)


def _strip_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".npz", ".nrrd", ".mha", ".mhd", ".npy.h5", ".h5"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class SegmentationReport:
    """Write per-volume and summary tables of ``metric_names`` (keys of the evaluator's metrics).

    Args:
        save_dir: output folder (created).
        metric_names: evaluator metric names to report, e.g. ``["val_mean_dice", "val_hd95"]``.
        class_names: foreground class names, in channel order (background excluded).
        case_key: data-dict key with the case name; falls back to the image file name.
        confusion_metrics: for metrics whose details are per-image confusion matrices (MONAI's
            ``ConfusionMatrix`` handler keeps ``(images, classes, 4)`` TP/FP/TN/FN counts), the
            confusion-matrix metric to report, e.g. ``{"val_sensitivity": "sensitivity"}``.
    """

    def __init__(self, save_dir: str, metric_names: Sequence[str], class_names: Sequence[str],
                 case_key: str = "case", confusion_metrics: Mapping[str, str] | None = None) -> None:
        self.save_dir, self.metric_names, self.class_names = save_dir, list(metric_names), list(class_names)
        self.case_key = case_key
        self.confusion_metrics = dict(confusion_metrics or {})
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        ensure_writable_dir(self.save_dir)  # before the evaluation, not after it
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            cases = item.get(self.case_key) if isinstance(item, dict) else None
            if cases is None:
                meta = getattr(item.get("image"), "meta", {}) if isinstance(item, dict) else {}
                cases = meta.get("filename_or_obj", ["case"])
            for c in cases if isinstance(cases, (list, tuple)) else [cases]:
                self._cases.append(_case_name({"filename_or_obj": c}))

    def __call__(self, engine: Engine) -> dict:
        details = getattr(engine.state, "metric_details", {}) or {}
        table: dict[str, np.ndarray] = {}
        for name in self.metric_names:
            if name not in details:
                raise KeyError(f"SegmentationReport: metric {name!r} has no per-image details "
                               f"(available: {sorted(details)})")
            raw = details[name]
            if name in self.confusion_metrics:
                from monai.metrics import compute_confusion_matrix_metric

                raw = compute_confusion_matrix_metric(self.confusion_metrics[name], torch.as_tensor(raw))
            values = np.asarray(raw.detach().cpu().float() if hasattr(raw, "detach") else raw, dtype=np.float64)
            table[name] = values.reshape(values.shape[0], -1)
        n = min(len(v) for v in table.values()) if table else 0
        cases = (self._cases + [f"case_{i}" for i in range(len(self._cases), n)])[:n]
        per_volume = []
        for i in range(n):
            row = {"case": cases[i]}
            for name, values in table.items():
                for c, cls in enumerate(self.class_names[: values.shape[1]]):
                    row[f"{name}_{cls}"] = float(values[i, c])
            per_volume.append(row)
        summary = []
        for name, values in table.items():
            for c, cls in enumerate(self.class_names[: values.shape[1]]):
                col = values[:n, c]
                ok = col[np.isfinite(col)]
                summary.append({"metric": name, "class": cls, "mean": float(ok.mean()) if ok.size else math.nan,
                                "std": float(ok.std()) if ok.size else math.nan, "n": int(ok.size)})
            per_class = [s["mean"] for s in summary if s["metric"] == name and math.isfinite(s["mean"])]
            summary.append({"metric": name, "class": "mean", "mean": float(np.mean(per_class)) if per_class
                            else math.nan, "std": math.nan, "n": n})
        os.makedirs(self.save_dir, exist_ok=True)
        fields = ["case"] + [f"{m}_{c}" for m, v in table.items() for c in self.class_names[: v.shape[1]]]

        def write_rows(f, rows, header):
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)

        _atomic_write(os.path.join(self.save_dir, "per_volume.csv"), lambda f: write_rows(f, per_volume, fields))
        _atomic_write(os.path.join(self.save_dir, "summary.csv"),
                      lambda f: write_rows(f, summary, ["metric", "class", "mean", "std", "n"]))
        report = {"per_volume": per_volume, "summary": summary}
        _atomic_write(os.path.join(self.save_dir, "metrics.json"),
                      lambda f: json.dump(report, f, indent=1, allow_nan=True))
        return report


def lesion_stats(mask, voxel_volume_mm3: float, min_lesion_mm3: float = 0.0) -> dict:
    """Lesion count and volumes of a binary mask (any leading singleton axes are dropped).

    Lesions are 3D connected components with 26-connectivity (8 in 2D); components smaller than
    ``min_lesion_mm3`` are not counted as lesions, but every voxel counts towards the total volume.
    Returns ``lesion_count``, ``lesion_volume_ml`` (total) and ``largest_lesion_ml``.
    """
    from scipy import ndimage

    m = np.squeeze(np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask) > 0)
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, bool))
    sizes_ml = np.bincount(labels.ravel())[1:] * voxel_volume_mm3 / 1000.0 if n else np.zeros(0)
    kept = sizes_ml[sizes_ml * 1000.0 >= min_lesion_mm3]
    return {
        "lesion_count": int(kept.size),
        "lesion_volume_ml": float(m.sum() * voxel_volume_mm3 / 1000.0),
        "largest_lesion_ml": float(kept.max()) if kept.size else 0.0,
    }


def _voxel_volume_mm3(meta: dict) -> float:
    affine = meta.get("affine")
    if affine is None:
        raise ValueError(f"{meta.get('filename_or_obj', 'prediction')}: no affine in the metadata, "
                         "cannot convert voxels to mL")
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    return float(abs(np.linalg.det(a[:3, :3])))


class LesionReport:
    """Per-case lesion count and volume (mL) of predicted lesion masks, for inference workflows.

    After each volume, reads the (inverted, discrete) prediction in the input's geometry, counts
    lesions (:func:`lesion_stats`, voxel size from the affine) and at the end writes, atomically,
    ``<output_dir>/lesions.csv`` and ``lesions.json`` (one row per case, sorted by case).

    Args:
        output_dir: folder for the tables.
        pred_key: key of the label-map prediction (one channel, lesion = ``lesion_label``).
        lesion_label: label value of lesions.
        min_lesion_mm3: components smaller than this are not counted (still included in the volume).
        data_root_dir: case names are source paths relative to this folder (without extension),
            so that patients whose files share a name (MSSEG-2) stay apart; default: file name.
    """

    def __init__(self, output_dir: str, pred_key: str = "pred", lesion_label: int = 1,
                 min_lesion_mm3: float = 0.0, data_root_dir: str | None = None) -> None:
        self.output_dir, self.pred_key, self.lesion_label = output_dir, pred_key, lesion_label
        self.min_lesion_mm3, self.data_root_dir = min_lesion_mm3, data_root_dir
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        ensure_writable_dir(self.output_dir)  # before the inference, not after it
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def case_name(self, src: str) -> str:
        return source_case_name(src, self.data_root_dir)

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for out in outputs:
            pred = out[self.pred_key]
            meta = dict(getattr(pred, "meta", {}))
            src = str(meta.get("filename_or_obj", f"case_{len(self.rows)}"))
            voxel = _voxel_volume_mm3(meta)
            stats = lesion_stats(np.asarray(pred.detach().cpu()) == self.lesion_label, voxel, self.min_lesion_mm3)
            self.rows.append({"case": self.case_name(src), **stats, "voxel_volume_mm3": voxel, "source": src})

    def write(self, engine: Engine | None = None) -> list[dict]:
        rows = sorted(self.rows, key=lambda r: r["case"])
        os.makedirs(self.output_dir, exist_ok=True)
        fields = ["case", "lesion_count", "lesion_volume_ml", "largest_lesion_ml", "voxel_volume_mm3", "source"]

        def write_csv(f):
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

        _atomic_write(os.path.join(self.output_dir, "lesions.csv"), write_csv)
        _atomic_write(os.path.join(self.output_dir, "lesions.json"),
                      lambda f: json.dump({"min_lesion_mm3": self.min_lesion_mm3, "cases": rows}, f, indent=1))
        return rows
