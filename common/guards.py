"""Checks of what the bundles are given, and safe writing of what they produce.

Every problem with a bundle's input or output ends in one exception whose message names the file
(or folder) and says what is wrong with it in plain words, for example::

    /data/acdc/training/patient003/patient003_frame01_gt.nii.gz: label has values 7, 9 that are not
    class indices 0..3 of this bundle (0 background, 1 RV, 2 Myo, 3 LV)

The pieces, each used by the data readers of :mod:`common.data` or referenced from the configs:

- errors: :class:`BundleError` and its kinds :class:`BadInputError` (a ``ValueError``),
  :class:`MissingInputError` (a ``FileNotFoundError``), :class:`OutputNotWritableError` (a
  ``PermissionError``) and :class:`NonFiniteLossError` (a ``RuntimeError``);
- volumes: :func:`read_volume` (read + shape, channel and finiteness checks), :func:`volume_depth`
  (the same shape check from the header alone), :func:`check_finite`, :func:`check_label_values`,
  :func:`require_inputs`, and :class:`LoadVolumed`, MONAI's ``LoadImaged`` with those checks, for the
  inference configs;
- outputs: :func:`ensure_writable_dir` (checked up front), :func:`atomic_write`, and
  :class:`AtomicSaveImaged`, MONAI's ``SaveImaged`` writing each file under a temporary name and
  renaming it when complete, so that a failure never leaves a half-written segmentation;
- checkpoints: :func:`load_weights` (``torch.load(weights_only=True)``: a checkpoint that needs
  code to be unpickled is refused, never executed), :func:`check_state_dict_fits` (a short list
  of what does not match instead of PyTorch's full key dump) and :class:`SafeCheckpointLoader`,
  MONAI's ``CheckpointLoader`` with both;
- training: :class:`TrainingGuard`, a handler that checks the output folders when it is built and
  stops training on a NaN or infinite loss before the optimizer step uses it.

MONAI and ignite wrap exceptions raised inside transforms and config components, so a plain
traceback shows the message in the middle of three chained tracebacks. Under
``python -m monai.bundle`` an excepthook (installed when this module is imported there) prints a
:class:`BundleError` as its one line instead; ``MONAI_DEBUG=1`` restores the full traceback.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import tempfile
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import IO, Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader
from monai.transforms import LoadImage, LoadImaged, SaveImage, SaveImaged
from monai.utils import MetaKeys
from torch import nn

__all__ = [
    "BundleError",
    "BadInputError",
    "MissingInputError",
    "OutputNotWritableError",
    "NonFiniteLossError",
    "bundle_error_message",
    "install_cli_excepthook",
    "read_volume",
    "volume_depth",
    "check_volume_shape",
    "check_finite",
    "check_label_values",
    "require_inputs",
    "LoadVolumed",
    "ensure_writable_dir",
    "atomic_write",
    "AtomicSaveImage",
    "AtomicSaveImaged",
    "load_weights",
    "check_state_dict_fits",
    "SafeCheckpointLoader",
    "TrainingGuard",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class BundleError(Exception):
    """Base of the bundles' input, output, checkpoint and training errors.

    Args:
        path: the file or folder concerned (``None`` when there is none); the message starts with it.
        problem: what is wrong, in plain words. Called with one argument, that argument is the whole
            message (so that the error survives pickling and re-raising from worker processes).
    """

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None) -> None:
        if problem is None:
            path, problem = None, str(path)
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class BadInputError(BundleError, ValueError):
    """An input file or folder (image, label, data folder, checkpoint) exists but cannot be used."""


class MissingInputError(BundleError, FileNotFoundError):
    """An input file or folder does not exist, or a folder holds nothing to work on."""


class OutputNotWritableError(BundleError, PermissionError):
    """An output folder cannot be created or written to."""


class NonFiniteLossError(BundleError, RuntimeError):
    """The training loss became NaN or infinite."""


def _error_classes() -> list[type]:
    out, todo = [], [BundleError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def bundle_error_message(exc: BaseException) -> str | None:
    """``"<ErrorClass>: <message>"`` of the :class:`BundleError` behind ``exc``, or ``None``.

    Follows the ``__cause__`` / ``__context__`` chain (MONAI wraps transform and config errors in
    ``RuntimeError``); an error re-raised from a ``DataLoader`` worker arrives as text only, which
    is searched for a ``BundleError`` line too.
    """
    seen: set[int] = set()
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, BundleError):
            return f"{type(e).__name__}: {e}"
    names = "|".join(sorted(c.__name__ for c in _error_classes()))
    pattern = re.compile(rf"^(?:[\w.]+\.)?({names}): (.+)$", re.MULTILINE)
    for e in chain:
        found = pattern.findall(str(e))
        if found:
            return f"{found[-1][0]}: {found[-1][1]}"
    return None


def install_cli_excepthook() -> None:
    """Print an uncaught :class:`BundleError` as one line (``MONAI_DEBUG=1``: the full traceback).

    Other exceptions keep Python's traceback. Installed once per process; the bundles' CLI runs
    (``python -m monai.bundle``) get it when their configs import :mod:`common.data`.
    """
    previous = sys.excepthook
    if getattr(previous, "_bundle_guard", False):
        return

    def hook(exc_type, exc, tb):
        from monai.utils.misc import MONAIEnvVars

        message = None if MONAIEnvVars.debug() else bundle_error_message(exc)
        if message is None:
            previous(exc_type, exc, tb)
        else:
            sys.stderr.write(f"\n{message}\n(set MONAI_DEBUG=1 for the full traceback)\n")
        _join_pool_threads()

    hook._bundle_guard = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _join_pool_threads(timeout: float = 30.0) -> None:
    """Wait for thread-pool workers still running a task (MONAI ``CacheDataset`` fills its cache with
    a ``ThreadPool``; after one item fails, the others are still being read): the interpreter must
    not exit under a thread that is inside native code (the C++ runtime aborts the process)."""
    import threading
    import time
    from multiprocessing.dummy import DummyProcess

    end = time.monotonic() + timeout
    for t in threading.enumerate():
        if isinstance(t, DummyProcess) and t is not threading.current_thread():
            t.join(max(0.0, end - time.monotonic()))


def _running_bundle_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monai.bundle.__main__"


def _root_cause(err: BaseException) -> str:
    """One line from the innermost cause of ``err`` (readers nest their errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def _shape_problem(shape: Sequence[int], channels: int, what: str, from_header: bool) -> str | None:
    """What is wrong with a file of array ``shape`` for a bundle that takes 3D volumes of ``channels``.

    ``from_header``: ``shape`` is the file's own (NIfTI: x, y, z, t, channels); otherwise it is
    ``(*spatial, channels)`` of a loaded image (channels left out when 1).
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    if n < 3:
        return (f"{what} is 2D (shape {shape}): expected a 3D volume (this bundle segments the slices along "
                "its last axis)")
    if n == 3:
        found = 1
    elif from_header and n == 4:
        if shape[3] != 1:
            return (f"{what} is 4D (shape {shape}): expected a 3D volume, one per file (this file holds a time "
                    "series or several volumes; save the frame or volume you want on its own)")
        found = 1
    elif n == 4 and not from_header:
        found = shape[3]
    elif from_header and n == 5 and shape[3] == 1:
        found = shape[4]
    else:
        return f"{what} has shape {shape}: expected a 3D volume with {channels} channel(s)"
    if found != channels:
        return (f"{what} has {found} channels (shape {shape}): the network takes {channels} (in_channels), "
                f"so give one {'single-channel ' if channels == 1 else ''}3D volume per file")
    return None


def check_volume_shape(image: torch.Tensor, path: str, channels: int = 1, what: str = "image") -> None:
    """Raise :class:`BadInputError` unless channel-first ``image`` is ``(channels, H, W, D)``.

    The message describes the file's own shape when the metadata has it (NIfTI ``dim``), so that a
    4D series is told apart from a multi-channel image.
    """
    dim = getattr(image, "meta", {}).get("dim") if isinstance(image, MetaTensor) else None
    if dim is not None:
        d = [int(x) for x in np.asarray(dim).ravel()]
        problem = _shape_problem(d[1:d[0] + 1], channels, what, from_header=True)
    else:
        c, spatial = int(image.shape[0]), tuple(image.shape[1:])
        problem = _shape_problem(spatial + ((c,) if c != 1 else ()), channels, what, from_header=False)
    if problem is None and (image.ndim != 4 or image.shape[0] != channels):
        problem = (f"{what} has shape {tuple(image.shape[1:])} with {image.shape[0]} channel(s) after loading: "
                   f"expected a 3D volume with {channels}")
    if problem is not None:
        raise BadInputError(path, problem)


def check_finite(array: Any, path: str, what: str = "image") -> None:
    """Raise :class:`BadInputError` naming ``path`` when ``array`` has NaN or infinite values."""
    t = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if t.is_floating_point() and not torch.isfinite(t).all():
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise BadInputError(path, f"{what} has NaN or infinite voxels ({n_nan} NaN, {n_inf} infinite); every "
                                  "voxel must be a finite number")


def _unreadable(path: str, what: str, err: BaseException) -> BundleError:
    if not os.path.exists(path):
        return MissingInputError(path, f"{what} file not found")
    return BadInputError(path, f"cannot read this {what} file: it is corrupt, truncated or not an image "
                               f"({_root_cause(err)})")


def read_volume(path: str, what: str = "image", channels: int = 1, finite: bool = True) -> MetaTensor:
    """A 3D volume as a float32, channel-first MetaTensor ``(channels, H, W, D)``, checked.

    Read with MONAI ``LoadImage`` (every format it takes); raises :class:`MissingInputError` or
    :class:`BadInputError` naming ``path`` for a missing, unreadable (corrupt, truncated) file, a 2D
    or 4D image, another number of channels, or (``finite``) NaN / infinite voxels.
    """
    try:
        image = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as err:
        raise _unreadable(str(path), what, err) from err
    check_volume_shape(image, str(path), channels, what)
    if finite:
        check_finite(image, str(path), what)
    return image


def volume_depth(path: str, what: str = "image") -> int:
    """Number of slices (last axis) of a 3D NIfTI volume, from its header only; checked like :func:`read_volume`."""
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as err:  # nibabel raises several types for broken headers
        raise _unreadable(str(path), what, err) from err
    problem = _shape_problem(shape, 1, what, from_header=True)
    if problem is not None:
        raise BadInputError(path, problem)
    return int(shape[2])


def _values_text(values: Sequence[float], limit: int = 8) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values[:limit]]
    return ", ".join(shown) + (f" and {len(values) - limit} more" if len(values) > limit else "")


def check_label_values(label: Any, path: str, num_classes: int | None, classes: str, what: str = "label") -> None:
    """Raise :class:`BadInputError` unless ``label`` holds whole numbers in ``0..num_classes - 1``.

    Args:
        label: array or tensor of label values.
        path: the label file, for the message.
        num_classes: number of classes; ``None``: any non-negative whole number (binary masks that
            are binarised afterwards).
        classes: how the valid values read in the message, e.g. ``"class indices 0..3 of this bundle
            (0 background, 1 RV, 2 Myo, 3 LV)"``.
        what: the kind of file, for the message.
    """
    t = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadInputError(path, f"{what} has NaN or infinite values; expected {classes}")
    values = torch.unique(t).double()
    bad = values[(values < 0) | (values != values.round())]
    if num_classes is not None:
        bad = torch.unique(torch.cat([bad, values[values > num_classes - 1]]))
    if bad.numel():
        raise BadInputError(path, f"{what} has values {_values_text(bad.tolist())} that are not {classes}")


def require_inputs(files: Sequence[str], folder: str, what: str = "images") -> list[str]:
    """``files`` when there are any; :class:`MissingInputError` naming ``folder`` when it is missing or empty."""
    if not os.path.isdir(folder):
        raise MissingInputError(folder, "input folder does not exist")
    if not files:
        raise MissingInputError(folder, f"no {what} in this folder or below")
    return list(files)


class LoadVolumed(LoadImaged):
    """MONAI ``LoadImaged`` (channel first, image only by default) that checks each loaded volume.

    A missing, unreadable (corrupt, truncated), 2D or 4D file, another number of channels than
    ``channels`` and NaN / infinite voxels raise :class:`BadInputError` (or :class:`MissingInputError`)
    naming the file. Otherwise the output is ``LoadImaged``'s.

    Args:
        keys: keys of the file names to load.
        channels: number of channels the network takes (``in_channels``).
        finite: reject NaN and infinite voxels.
        what: the kind of image, for the messages.
        kwargs: ``LoadImaged`` arguments (``image_only`` and ``ensure_channel_first`` default to True).
    """

    def __init__(self, keys, channels: int = 1, finite: bool = True, what: str = "image", **kwargs) -> None:
        kwargs.setdefault("image_only", True)
        kwargs.setdefault("ensure_channel_first", True)
        super().__init__(keys, **kwargs)
        self.channels, self.finite, self.what = int(channels), finite, what

    def __call__(self, data: Mapping[Hashable, Any], reader=None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):  # already an array: nothing to read
                continue
            try:
                d.update(super().__call__({key: path}, reader))
            except Exception as err:
                raise _unreadable(str(path), self.what, err) from err
            check_volume_shape(d[key], str(path), self.channels, self.what)
            if self.finite:
                check_finite(d[key], str(path), self.what)
        return d


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Create ``path`` if needed and check that a file can be written in it; returns ``path``.

    Writes and removes a probe file (``os.access`` is not enough: read-only mounts, ACLs, root),
    and raises :class:`OutputNotWritableError` naming the folder otherwise. Call it before any work
    whose result would go there.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise OutputNotWritableError(path, f"cannot create this {what} ({err.strerror or err})") from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputNotWritableError(path, f"cannot write to this {what} ({err.strerror or err})") from err
    return path


def _os_error(err: BaseException) -> str | None:
    """The operating-system error behind ``err``, or None: ``SaveImage`` reports its writers' errors
    as text inside a ``RuntimeError``, so that text is searched too."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError):
            return " ".join(str(e).split())
        e = e.__cause__
    names = {"OSError"}
    todo = [OSError]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    found = [m for m in re.findall(r"^(\w+): (.+)$", str(err), re.MULTILINE) if m[0] in names]
    return found[-1][1].strip() if found else None


def _temporary_name(path: str, suffix: str = "") -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial{suffix}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it to ``path``.

    Readers see the old file or the complete new one, never a part; on any error the temporary
    file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


class AtomicSaveImage(SaveImage):
    """MONAI ``SaveImage`` that writes each file under a temporary name in the output folder and
    renames it when complete: an error or an interruption leaves no half-written image."""

    def __call__(self, img: torch.Tensor | np.ndarray, meta_data: dict | None = None, filename: str | None = None):
        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        if filename is not None:
            final = f"{filename}{self.output_ext}"
        else:
            final = os.fspath(self.folder_layout.filename(**self.fname_formatter(meta, self)))
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        stem = _temporary_name(final)
        verbose = self.write_kwargs.get("verbose", False)
        self.write_kwargs["verbose"] = False
        try:
            out = super().__call__(img, meta_data, filename=stem)
            os.replace(stem + self.output_ext, final)
        except BaseException as err:
            _remove_quietly(stem + self.output_ext)
            reason = _os_error(err) if isinstance(err, Exception) else None
            if reason is not None:
                raise OutputNotWritableError(final, f"cannot write this file ({reason})") from err
            raise
        finally:
            self.write_kwargs["verbose"] = verbose
        if self.savepath_in_metadict and meta is not None:
            meta[MetaKeys.SAVED_TO] = final
        if verbose:
            logger.info(f"writing: {final}")
        return out


class AtomicSaveImaged(SaveImaged):
    """MONAI ``SaveImaged`` that checks ``output_dir`` is writable when it is built (before any
    image is read) and writes each file atomically (:class:`AtomicSaveImage`).

    Takes ``SaveImaged``'s arguments, by keyword.
    """

    def __init__(self, keys, **kwargs) -> None:
        ensure_writable_dir(kwargs.get("output_dir", "./"))
        super().__init__(keys, **kwargs)
        # SaveImaged builds a SaveImage in __init__; AtomicSaveImage has the same state and only
        # changes how a file is written, so the instance is switched to it.
        self.saver.__class__ = AtomicSaveImage


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def load_weights(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per way it can fail.

    A checkpoint that needs code to be unpickled (classes or functions besides tensors and plain
    containers) is refused, never executed: :class:`BadInputError` naming the object it asked for.
    A missing file raises :class:`MissingInputError`; a corrupt or truncated one :class:`BadInputError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(path, "checkpoint not found (train the bundle first, or pass the checkpoint "
                                      "file's path)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise BadInputError(path, f"refused to load this checkpoint: it needs code to be unpickled "
                                      f"({found.group(1)}), and checkpoints are only read as plain tensors "
                                      "(torch.load weights_only=True) so that a file cannot run code. If you "
                                      "trust it, load it yourself and save only the weights: "
                                      "torch.save(model.state_dict(), path)") from err
        raise BadInputError(path, f"not a readable PyTorch checkpoint ({_root_cause(err)[:120]})") from err
    except Exception as err:
        raise BadInputError(path, f"cannot read this checkpoint: it is corrupt, truncated or not a PyTorch "
                                  f"file ({_root_cause(err)[:160]})") from err


def _examples(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def check_state_dict_fits(network: nn.Module, state: Any, path: str, strict: bool = True) -> None:
    """Raise :class:`BadInputError` with a short summary when ``state`` does not fit ``network``.

    Counts the network's tensors missing from ``state``, the tensors of ``state`` the network does
    not have (only with ``strict``) and those of another shape, with a few names of each.
    """
    net = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
    kind = type(net).__name__
    if not isinstance(state, Mapping):
        raise BadInputError(path, f"checkpoint holds a {type(state).__name__} where the weights of {kind} "
                                  "(a dict of tensors) should be")
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own] if strict else []
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the network's {len(own)} tensors are missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors are not in the network ({_examples(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape (checkpoint vs network: {_examples(reshaped, 2)})")
    raise BadInputError(path, f"checkpoint does not fit {kind}: {'; '.join(parts)}. It was saved from another "
                              "network or bundle, or with other settings (num_classes, in_channels, ...)")


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` with :func:`load_weights` and :func:`check_state_dict_fits`.

    Same arguments and behaviour, but a missing, corrupt or code-carrying checkpoint, and one of
    another network, raise one clear error naming the file instead of PyTorch's long messages.
    """

    def __call__(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint
        from monai.networks.utils import copy_model_state

        from .networks.blocks.layers import folded_state_dict

        checkpoint = load_weights(self.load_path, map_location=self.map_location)
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and (not isinstance(checkpoint, Mapping) or first not in checkpoint):
            checkpoint = {first: checkpoint}
        for key, obj in self.load_dict.items():
            if isinstance(obj, nn.Module):
                if key not in checkpoint:
                    raise BadInputError(self.load_path, f"checkpoint has no {key!r} entry (it has "
                                                        f"{_examples(sorted(map(str, checkpoint)), 5)})")
                if isinstance(checkpoint[key], Mapping):
                    # a no-op unless the network's batch norms were folded for inference (a reload)
                    checkpoint[key] = folded_state_dict(obj, checkpoint[key])
                if self.strict_shape:
                    check_state_dict_fits(obj, checkpoint[key], self.load_path, strict=self.strict)
        if not self.strict_shape:
            for key in list(self.load_dict):
                obj = self.load_dict[key]
                if isinstance(obj, nn.Module):
                    checkpoint[key] = copy_model_state(obj, checkpoint, inplace=False)[0]
                else:
                    self.load_dict.pop(key)
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise BadInputError(self.load_path, f"checkpoint was saved at epoch {engine.state.epoch}, beyond "
                                                f"this run's max_epochs {prior_max_epochs}")
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class TrainingGuard:
    """Checks for a training run: writable output folders up front, and a finite loss at every iteration.

    - When built (the configs build it before the other training handlers), each of
      ``writable_dirs`` is checked with :func:`ensure_writable_dir`.
    - On MONAI trainers the loss is checked at ``IterationEvents.LOSS_COMPLETED``, after the forward
      pass and before ``backward`` and the optimizer step: a NaN or infinite loss raises
      :class:`NonFiniteLossError` naming the epoch, the iteration and the cases of the batch, and
      the weights are not updated with it. Checkpoints already written (``model.pt`` of the last
      validation) stay as they are. Engines without that event are checked at ``ITERATION_COMPLETED``.
    - Under ``torch.distributed`` the ranks agree (one all-reduce per iteration), so all of them stop.

    Args:
        writable_dirs: output folders (checkpoints, logs) to check when the guard is built.
        loss_key: key of the loss in the engine's iteration output.
        case_keys: data-dict keys naming the samples of a batch, for the message.
    """

    def __init__(self, writable_dirs: Iterable[str] = (), loss_key: str = "loss",
                 case_keys: Sequence[str] = ("case", "slice")) -> None:
        for folder in writable_dirs:
            ensure_writable_dir(folder)
        self.loss_key, self.case_keys = loss_key, tuple(case_keys)
        self._before_step = True

    def attach(self, engine: Engine) -> None:
        from monai.engines import Workflow
        from monai.engines.utils import IterationEvents

        self._before_step = isinstance(engine, Workflow)  # MONAI engines register IterationEvents
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED if self._before_step else Events.ITERATION_COMPLETED,
                                 self)

    def _cases(self, batch: Any) -> str:
        if not isinstance(batch, Mapping):
            return ""
        cols = [batch[k] for k in self.case_keys if k in batch]
        if not cols:
            return ""
        values = [[v.tolist() if isinstance(v, torch.Tensor) else v for v in col] for col in cols]
        names = [" slice ".join(str(x) for x in row) for row in zip(*values)]
        return f"; its samples: {_examples(names, 4)}"

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, (list, tuple)):  # decollated (ITERATION_COMPLETED)
            output = output[0] if output else {}
        loss = output.get(self.loss_key) if isinstance(output, Mapping) else None
        if loss is None:
            return
        loss = torch.as_tensor(loss).detach()
        ok = torch.isfinite(loss).all()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = ok.to(dtype=torch.int32, device=loss.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag.bool()
        if bool(ok):
            return
        state = engine.state
        length = state.epoch_length or 0
        step = (state.iteration - 1) % length + 1 if length else state.iteration
        if torch.isnan(loss).any():
            value = "NaN"
        elif not torch.isfinite(loss).all():
            value = "infinite"
        else:
            value = "NaN or infinite on another process"
        raise NonFiniteLossError(
            None,
            f"training stopped: the loss is {value} at epoch {state.epoch}, iteration {state.iteration} "
            f"(batch {step} of {length or '?'} in this epoch{self._cases(state.batch)}). "
            + ("The optimizer step was not taken, so the weights are not updated with it. " if self._before_step
               else "")
            + "Checkpoints already written are kept. Common causes: a learning rate too high for the batch size, "
            "or overflow with amp; lower learning_rate or turn amp off, and check the images of these samples",
        )


if _running_bundle_cli():
    install_cli_excepthook()
