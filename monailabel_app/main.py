"""MONAI Label app serving this repository's bundles (MSVM-UNet ACDC, MSSMamba Synapse, Mamba-HUNet MS).

Start it with the MONAI Label CLI (see README.md beside this file)::

    monailabel start_server --app monailabel_app --studies /path/to/studies \\
        --conf models msvmunet_acdc,mssmamba_synapse,mambahunet_ms

``--conf`` keys (all optional):

``models``
    comma-separated bundle folder names (default: all three).
``bundles_dir``
    folder holding the bundle folders (default: the repository, the parent of this app folder).
``image_size``, ``<bundle>.image_size``
    the in-plane size the network runs at; must be the size its ``models/model.pt`` was trained at.
``max_epochs``, ``val_split``, ``batch_size``, ``num_workers``, ``train_filter`` (also per bundle)
    training defaults shown to the client; ``train_filter`` is a file-name pattern picking the
    labelled studies a model trains on (for a studies folder with several kinds of images).
``skip_trainers``
    ``true`` serves inference only.
``preload``
    ``true`` loads the networks at start.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

APP_DIR = os.path.dirname(os.path.abspath(__file__))
if APP_DIR not in sys.path:
    sys.path.insert(0, APP_DIR)


def _ensure_common(bundles_dir: str) -> None:
    """Make the repository's ``common`` package importable (the bundle configs ``$import common``)."""
    try:
        importlib.import_module("common.data")
        return
    except ImportError:
        pass
    for candidate in (bundles_dir, os.path.dirname(APP_DIR)):
        if os.path.isdir(os.path.join(candidate, "common")) and candidate not in sys.path:
            sys.path.insert(0, candidate)
            # the training subprocess inherits PYTHONPATH
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [candidate, os.environ.get("PYTHONPATH", "")]))
    importlib.import_module("common.data")  # raises with the reason when still missing


def _torchvision_stand_in() -> None:
    """Let the server run without a working torchvision.

    ``monailabel.transform.post`` (imported by the stock bundle infer task) runs ``from torchvision.utils
    import make_grid, save_image`` at import, for its 2D pathology debug transform ``DumpImagePrediction2Dd``
    only; nothing this app runs calls them, and nothing else on its path imports torchvision. Where
    torchvision is missing, or does not import next to this torch (PyPI's torchvision is a CUDA build:
    next to the CPU build of torch it fails with "operator torchvision::nms does not exist"), a stand-in
    ``torchvision.utils`` whose two functions raise takes its place. ``import torchvision`` itself still
    fails, so MONAI's optional imports keep seeing torchvision as absent.
    """
    try:
        importlib.import_module("torchvision.utils")
        return
    except Exception as err:  # ImportError, or RuntimeError from a torchvision built for another torch
        reason = f"{type(err).__name__}: {err}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # a half-imported torchvision

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision is not available here ({reason})")

    utils = type(sys)("torchvision.utils", "stand-in of monailabel_app/main.py: torchvision does not import")
    utils.make_grid = utils.save_image = unavailable
    sys.modules["torchvision.utils"] = utils
    logger.info(f"torchvision does not import ({reason}); serving without it")


logger = logging.getLogger(__name__)
_torchvision_stand_in()

import monailabel  # noqa: E402
from mamba_tasks import (  # noqa: E402  (beside this file: MONAI Label puts the app folder on sys.path while loading it)
    INFER_KEYS,
    KNOWN_BUNDLES,
    MambaBundleInferTask,
    MambaBundleTrainTask,
    bundle_overrides,
)
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402


class MambaSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        self.bundles_dir = os.path.abspath(conf.get("bundles_dir") or os.path.dirname(APP_DIR))
        _ensure_common(self.bundles_dir)
        names = [n.strip() for n in conf.get("models", ",".join(KNOWN_BUNDLES)).split(",") if n.strip()]
        unknown = [n for n in names if n not in KNOWN_BUNDLES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}: this app serves {', '.join(KNOWN_BUNDLES)}")
        self.models = {}
        for name in names:
            path = os.path.join(self.bundles_dir, name)
            if not os.path.isfile(os.path.join(path, "configs", "inference.json")):
                raise FileNotFoundError(f"bundle {name} not found: no {path}/configs/inference.json "
                                        "(set --conf bundles_dir to the folder holding the bundles)")
            self.models[name] = path
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Mamba segmentation bundles",
            description="MSVM-UNet (cardiac MRI), MSSMamba (abdominal CT), Mamba-HUNet (MS lesions in FLAIR): "
                        "research use only",
            version=monailabel.__version__,
        )

    def init_infers(self):
        infers = {}
        for name, path in self.models.items():
            task = MambaBundleInferTask(path, self.conf, overrides=bundle_overrides(self.conf, name, INFER_KEYS))
            if task.is_valid():
                logger.info(f"+++ Adding Inferer:: {name} => {path}")
                infers[name] = task
            else:
                logger.warning(f"--- {name}: no weights ({path}/models/model.pt); inference is off for it until "
                               "the model is trained (MONAI Label training or the bundle's training workflow) "
                               "and the server restarted")
        return infers

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers = {}
        for name, path in self.models.items():
            task = MambaBundleTrainTask(path, self.conf, name, overrides=bundle_overrides(self.conf, name))
            if task.is_valid():
                logger.info(f"+++ Adding Trainer:: {name} => {path}")
                trainers[name] = task
        return trainers

    def init_strategies(self):
        return {"random": Random(), "first": First()}
