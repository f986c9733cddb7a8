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
from collections.abc import Sequence

import numpy as np
from ignite.engine import Engine, Events

__all__ = ["SegmentationReport"]


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def _case_name(meta) -> str:
    name = meta.get("filename_or_obj", "case") if isinstance(meta, dict) else str(meta)
    if isinstance(name, (list, tuple)):
        name = name[0]
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".npz", ".nrrd", ".mha"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


class SegmentationReport:
    """Write per-volume and summary tables of ``metric_names`` (keys of the evaluator's metrics).

    Args:
        save_dir: output folder (created).
        metric_names: evaluator metric names to report, e.g. ``["val_mean_dice", "val_hd95"]``.
        class_names: foreground class names, in channel order (background excluded).
        case_key: data-dict key with the case name; falls back to the image file name.
    """

    def __init__(self, save_dir: str, metric_names: Sequence[str], class_names: Sequence[str],
                 case_key: str = "case") -> None:
        self.save_dir, self.metric_names, self.class_names = save_dir, list(metric_names), list(class_names)
        self.case_key = case_key
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
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
            values = np.asarray(details[name].detach().cpu().float() if hasattr(details[name], "detach")
                                else details[name], dtype=np.float64)
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
