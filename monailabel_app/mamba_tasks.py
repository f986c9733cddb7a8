"""MONAI Label infer and train tasks for this repository's three bundles.

The stock ``monailabel.tasks.infer.bundle.BundleInferTask`` serves our inference configs almost as
they are; what this module adds:

* config overrides from the server's ``--conf`` (``image_size`` and friends, see
  :func:`bundle_overrides`), applied before the network is built;
* ``dimension`` 3 in ``/info``: the bundles take a 3D volume and run slice by slice inside
  (their metadata gives the 2D slice shape, which MONAI Label would read as a 2D model);
* training: our bundles train on 2D slices through their own loaders, so the studies' labelled
  volumes are expanded into slice data lists (``train#datalist``), the study volumes become the
  validation list (``validate#datalist``), the epoch count drives the learning-rate schedules, and
  validation runs at least once (it writes ``models/model.pt``). Synapse studies carry labels in
  the model's own organ values (0..8, the ``channel_def`` of the metadata), so they are read by
  :class:`LoadSynapseStudyd` instead of the bundle's BTCV NIfTI reader (which remaps BTCV's 13
  labels).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImage, MapTransform
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

# bundle folder name -> kind of data; the kind picks the training loader
KNOWN_BUNDLES = {
    "msvmunet_acdc": "acdc",
    "mssmamba_synapse": "synapse",
    "mambahunet_ms": "ms",
}
# keys a server's --conf may override (globally: ``image_size 96``; per bundle: ``msvmunet_acdc.image_size 96``)
INFER_KEYS = ("image_size",)
TRAIN_KEYS = ("image_size", "num_workers", "batch_size", "train_filter", "max_epochs", "val_split")


def _parse(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def bundle_overrides(conf: Mapping[str, Any], name: str, keys=TRAIN_KEYS) -> dict:
    """Overrides of bundle ``name`` from the server conf: ``key`` for every bundle, ``name.key`` for one."""
    out = {k: _parse(conf[k]) for k in keys if k in conf}
    out.update({k: _parse(conf[f"{name}.{k}"]) for k in keys if f"{name}.{k}" in conf})
    return out


def channel_names(bundle_path: str) -> dict[int, str]:
    """``{index: name}`` of the bundle's output channels (metadata ``network_data_format``)."""
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as f:
        meta = json.load(f)
    pred = next(iter(meta["network_data_format"]["outputs"].values()))
    return {int(k): v for k, v in pred.get("channel_def", {}).items()}


class MambaBundleInferTask(BundleInferTask):
    """``BundleInferTask`` with server overrides and a 3D (volume in, volume out) interface."""

    def __init__(self, path: str, conf: dict, overrides: Mapping[str, Any] | None = None, **kwargs):
        self._overrides = {k: v for k, v in (overrides or {}).items() if k in INFER_KEYS}
        super().__init__(path, conf, **kwargs)
        if self.valid:
            self.dimension = 3  # a 3D study in, a 3D label out (slice-wise inside)
            self.description = (self.description or "") + (
                f" [served with {self._overrides}]" if self._overrides else "")

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        for key, value in self._overrides.items():
            parser[key] = value
        return parser


class LoadSynapseStudyd(MapTransform):
    """Image (CT in HU) and label (organ indices 0..8 as in the model's ``channel_def``) of a study.

    The same intensity preprocessing as the bundle's (HU clipped to [-125, 275], scaled to [0, 1]),
    without the BTCV -> Synapse label mapping of ``common.data.LoadSynapsed`` (MONAI Label labels
    are saved in the model's own values). ``slice`` picks one axial slice.
    """

    def __init__(self, keys=("image", "label"), num_classes: int = 9, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from common.data.synapse import HU_RANGE

        d = dict(data)
        ik, lk = self.keys
        loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
        image, label = loader(str(d[ik])), loader(str(d[lk]))
        if image.shape != label.shape:
            raise ValueError(f"{d[ik]}: image shape {tuple(image.shape[1:])} != label shape {tuple(label.shape[1:])}")
        lo, hi = HU_RANGE
        image = (image.clamp(lo, hi) - lo) / (hi - lo)
        values = torch.unique(label)
        if values.min() < 0 or values.max() > self.num_classes - 1 or not torch.all(values == values.round()):
            raise ValueError(f"{d[lk]}: label values {values.tolist()} are not organ indices 0..{self.num_classes - 1}")
        index = d.get("slice")
        if index is not None:
            image, label = image[..., index], label[..., index]
        d[ik], d[lk] = image, label
        return d


def _volume_depth(path: str) -> int:
    import nibabel as nib

    shape = nib.load(path).shape
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}")
    return int(shape[2])


def _label_values(path: str) -> list[float]:
    import nibabel as nib

    return np.unique(np.asarray(nib.load(path).dataobj)).tolist()


class MambaBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` that feeds the studies to our slice-wise training configs."""

    def __init__(self, path: str, conf: dict, name: str, overrides: Mapping[str, Any] | None = None):
        if name not in KNOWN_BUNDLES:
            raise ValueError(f"unknown bundle {name!r}: this app serves {', '.join(KNOWN_BUNDLES)}")
        self.name, self.kind = name, KNOWN_BUNDLES[name]
        self._overrides = {k: v for k, v in (overrides or {}).items() if k in TRAIN_KEYS}
        self.classes = channel_names(path)
        self._request: dict = {}
        super().__init__(path, conf)

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        if "image_size" in self._overrides:
            parser["image_size"] = self._overrides["image_size"]
        return parser

    def _default(self, key: str):
        if key in self._overrides:
            return self._overrides[key]
        return self.bundle_config.get(key)

    def config(self):
        options = super().config()
        options.update({
            "max_epochs": int(self._overrides.get("max_epochs", 50)),
            "val_split": float(self._overrides.get("val_split", 0.2)),
            "batch_size": int(self._default("batch_size")),
            "num_workers": int(self._default("num_workers")),
            "train_filter": str(self._overrides.get("train_filter", "")),
        })
        return options

    def __call__(self, request, datastore):
        request = dict(request)
        # one process: our overrides hold Python objects, which the torchrun (multi-GPU) path cannot export
        request["multi_gpu"], request["force_multi_gpu"] = False, False
        self._request = request
        return super().__call__(request, datastore)

    def _fetch_datalist(self, request, datastore):
        items = super()._fetch_datalist(request, datastore)
        pattern = request.get("train_filter") or self._overrides.get("train_filter")
        if pattern:
            items = [d for d in items if fnmatch.fnmatch(os.path.basename(d["image"]), pattern)]
        if not items:
            raise ValueError(f"{self.name}: no labelled studies to train on"
                             + (f" (train_filter {pattern!r})" if pattern else "")
                             + ": save final labels of some studies first")
        top = max(self.classes)
        for d in items:
            values = _label_values(d["label"])
            if min(values) < 0 or max(values) > top or any(v != round(v) for v in values):
                raise ValueError(
                    f"{self.name}: label {d['label']} has values {values[:12]}, but this model's classes are "
                    f"0..{top} ({', '.join(self.classes.values())}). Train each model on a studies folder of its own "
                    "kind of images, or pick the studies with train_filter (a file-name pattern).")
        logger.info(f"{self.name}: training on {len(items)} labelled studies")
        return items

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Start from ``models/model.pt``: a ``CheckpointLoader`` *appended* to ``train#handlers``.

        The stock task inserts it in front, which shifts the list: a config that refers to a
        handler by its position (``"early_stop": "@train#handlers#3"``) then gets the wrong one
        (``'ValidationHandler' object has no attribute 'set_trainer'``). The stock task also
        crashed with ``pretrained`` false (``os.path.exists(None)``).
        """
        if not (pretrained and model_pytorch and os.path.exists(model_pytorch)):
            return
        if any(isinstance(h, dict) and h.get("_target_") == "CheckpointLoader" for h in train_handlers):
            return
        logger.info(f"{self.name}: training starts from {model_pytorch}")
        train_handlers.append({"_target_": "CheckpointLoader", "load_path": model_pytorch,
                               "load_dict": {self.model_dict_key: f"$@{self.const.key_network()}"},
                               "strict": self.load_strict})

    def _update_overrides(self, overrides):
        from common.data.sample import expand_slices

        request = self._request
        train_vols = overrides.pop(self.const.key_train_dataset_data())
        val_vols = overrides.pop(self.const.key_validate_dataset_data(), None)
        if not val_vols:
            logger.warning(f"{self.name}: no validation studies (too few labelled studies for the split); "
                           "validating on the training studies")
            val_vols = train_vols
        epochs = int(request.get("max_epochs", 50))
        overrides["train#datalist"] = expand_slices(train_vols, _volume_depth)
        overrides["validate#datalist"] = list(val_vols)
        # a dataset folder outside the bundle's sample_data: the configs then generate no sample data
        overrides["dataset_dir"] = os.path.dirname(os.path.abspath(train_vols[0]["image"]))
        overrides["epochs"] = epochs
        if self.kind == "ms":  # its epochs come from max_iterations; here the epoch count rules
            overrides["max_iterations"] = "$@epochs * len(@train#dataloader)"
        val_interval = int(self.bundle_config.get("val_interval") or 1)
        overrides["val_interval"] = max(1, min(val_interval, epochs))  # validation writes models/model.pt
        overrides["show_progress"] = False
        for key in ("batch_size", "num_workers", "image_size"):
            value = request.get(key, self._overrides.get(key))
            if value is not None and value != "":
                overrides[key] = int(value)
        if self.kind == "synapse":
            n = len(self.classes)
            overrides["train#preprocessing#transforms#0"] = LoadSynapseStudyd(("image", "label"), n)
            overrides["validate#preprocessing#transforms#0"] = LoadSynapseStudyd(("image", "label"), n)
        logger.info(f"{self.name}: {len(train_vols)} training studies "
                    f"({len(overrides['train#datalist'])} slices), {len(val_vols)} validation studies, "
                    f"{epochs} epochs")
        return overrides
