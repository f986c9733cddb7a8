"""Ignite handlers the bundles attach from their configs.

- :class:`FreezeEncoder`: train the decoder alone for the first epochs (MSVM-UNet's recipe).
- :class:`EpochSeed`: every epoch's random streams are a function of ``(seed, epoch)``, so a run
  is reproducible and a resumed run repeats exactly what the uninterrupted run did.
- :class:`TrainingCheckpoint`: one checkpoint with everything needed to resume (network,
  optimizer, scheduler, trainer epoch/iteration, early-stopping and best-metric state), written
  atomically at the end of every epoch and loaded at the start when ``resume`` is set.
- :class:`MLflowExtras`: with ``--tracking mlflow``, adds the bundle's hyper-parameters and its
  best checkpoint to the run MONAI's ``MLFlowHandler`` records.
- :class:`FoldBatchNorms`: for inference, folds the network's batch norms into the convolutions
  before them once its checkpoint is loaded (the bundles' ``fuse_conv_bn``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["FreezeEncoder", "EpochSeed", "TrainingCheckpoint", "MLflowExtras", "FoldBatchNorms", "epoch_seed"]

logger = logging.getLogger(__name__)


class FreezeEncoder:
    """Freeze a network's encoder for the first ``epochs`` epochs of training, then train it.

    The network must have ``freeze_encoder(frozen: bool)`` (``MSVMUNet`` has); a
    ``DistributedDataParallel`` wrapper is looked through. Frozen parameters get no gradient, so
    the optimizer leaves them unchanged.

    Args:
        network: the (possibly wrapped) network.
        epochs: number of epochs, counted from 1, during which the encoder is frozen; 0 disables.
    """

    def __init__(self, network: nn.Module, epochs: int) -> None:
        self.network = network
        self.epochs = int(epochs)
        self._frozen: bool | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        net = getattr(self.network, "module", self.network)
        frozen = engine.state.epoch <= self.epochs
        if frozen != self._frozen:
            net.freeze_encoder(frozen)
            self._frozen = frozen
            logger.info("epoch %d: encoder %s", engine.state.epoch, "frozen" if frozen else "trained")


class FoldBatchNorms:
    """At the start of an inference run, put the network in eval mode and fold its batch norms into
    the convolutions before them (:func:`common.networks.blocks.layers.fuse_conv_bn_for_inference`).

    Attach it after the checkpoint loader (handlers of the same event run in the order they were
    attached), so that the first load checks the checkpoint against the unfolded network; later
    reloads of unfolded checkpoints are folded on the way in. Same outputs up to float rounding,
    fewer kernels.

    Args:
        network: the (possibly CUDA-graph-wrapped) network the evaluator runs.
        enabled: False makes the handler do nothing (the configs' ``fuse_conv_bn`` switch).
        conv_relu: after folding, also run each 3x3 convolution that a ReLU follows as one cuDNN call
            on CUDA (:func:`common.networks.blocks.layers.fuse_conv_relu_for_inference`; the same
            convolution, then ReLU, elsewhere).
        channels_last: after folding, store the network's weights channels-last when they are on a
            CUDA device (cuDNN then runs the convolutions, and returns their outputs, channels-last);
            ignored on other devices.

    MSSMamba's inference config turns both on: one 224 x 224 slice, bf16, folded and replayed from a
    CUDA graph on an H100, 5.01 ms without them, 4.95 ms with ``conv_relu`` and 4.71 ms with both
    (``benchmarks/results/ab_conv_relu_mssmamba_cuda_2026-12-07.json``).
    """

    def __init__(self, network: nn.Module, enabled: bool = True, conv_relu: bool = False,
                 channels_last: bool = False) -> None:
        self.network = network
        self.enabled = bool(enabled)
        self.conv_relu = bool(conv_relu)
        self.channels_last = bool(channels_last)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        from .networks.blocks.layers import fuse_conv_bn_for_inference, fuse_conv_relu_for_inference

        if getattr(self.network, "folded_conv_bn", None) is not None:
            return  # folded already (a second run of the same evaluator)
        self.network.eval()
        fuse_conv_bn_for_inference(self.network)
        logger.info("folded %d batch norms into their convolutions", self.network.folded_conv_bn)
        if self.conv_relu:
            fuse_conv_relu_for_inference(self.network)
            logger.info("fused %d convolution + ReLU pairs", self.network.fused_conv_relu)
        param = next(self.network.parameters(), None)
        if self.channels_last and param is not None and param.is_cuda:
            self.network.to(memory_format=torch.channels_last)
            logger.info("convolution weights stored channels-last")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (counted from 1) of a run seeded with ``seed`` (a 32-bit value)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**32)


class EpochSeed:
    """Reseed every random stream of a training run at the start of each epoch.

    At ``EPOCH_STARTED`` of epoch ``e``: Python's ``random``, NumPy's global generator and torch's
    default generator are seeded with :func:`epoch_seed` ``(seed, e)``; the random transforms of
    ``dataset`` (MONAI ``Randomizable``: used as they are when the data loader has no workers) get
    seeds derived from it (``monai.data.utils.set_rnd``); ``sampler.set_epoch(e)`` is called when
    the sampler has it. The data loader's iterator (its shuffling and its workers' seeds, drawn from
    torch's generator) is created after this event (ignite 0.5), and dropout / drop-path draw from
    torch's generator, so everything an epoch does depends on ``(seed, e)`` only, not on what ran
    before it (validation, a resumed run's start): a run killed in epoch ``e`` and resumed from
    the checkpoint of epoch ``e - 1`` ends with the same weights as the uninterrupted run (on
    CPU, bit for bit).

    Args:
        seed: the run's seed (the bundle's ``seed``).
        dataset: the training dataset whose random transforms to reseed (optional).
        sampler: the training sampler (optional; ``set_epoch`` is called when it has one).
    """

    def __init__(self, seed: int, dataset: Any = None, sampler: Any = None) -> None:
        self.seed = int(seed)
        self.dataset = dataset
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.data.utils import set_rnd

        s = epoch_seed(self.seed, engine.state.epoch)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        if self.dataset is not None:
            set_rnd(self.dataset, s)
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(engine.state.epoch)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class _EarlyStopState:
    """``state_dict`` of a MONAI ``EarlyStopHandler`` (its ignite ``EarlyStopping``: counter, best score)."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def state_dict(self) -> dict:
        inner = getattr(self.handler, "_handler", None)  # created by set_trainer / attach
        return {} if inner is None else {"counter": int(inner.counter), "best_score": inner.best_score}

    def load_state_dict(self, state: Mapping) -> None:
        inner = getattr(self.handler, "_handler", None)
        if inner is not None and state:
            inner.counter, inner.best_score = int(state["counter"]), state["best_score"]


class _BestMetricState:
    """Best validation metric of an evaluator and the ranking of MONAI ``CheckpointSaver``'s best checkpoint."""

    def __init__(self, evaluator: Engine, saver: Any = None) -> None:
        self.evaluator, self.saver = evaluator, saver

    def _ranking(self) -> Any:
        # MONAI's CheckpointSaver.load_state_dict restores this ignite Checkpoint; it has no state_dict
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        st = self.evaluator.state
        out = {"best_metric": float(st.best_metric), "best_metric_epoch": int(st.best_metric_epoch)}
        ranking = self._ranking()
        if ranking is not None:
            out["ranking"] = ranking.state_dict()
        return out

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        ranking = self._ranking()
        if ranking is not None and "ranking" in state:
            ranking.load_state_dict(state["ranking"])


def _stateful(name: str, obj: Any) -> Any:
    from monai.handlers import CheckpointSaver, EarlyStopHandler

    if isinstance(obj, EarlyStopHandler):
        return _EarlyStopState(obj)
    if isinstance(obj, nn.parallel.DistributedDataParallel):  # same keys single- and multi-process
        return obj.module
    if isinstance(obj, Engine) and name != "trainer":  # a validator: its best metric (+ best-checkpoint ranking)
        savers = [h.__self__ for hs in obj._event_handlers.values() for h, *_ in hs
                  if isinstance(getattr(h, "__self__", None), CheckpointSaver)]
        return _BestMetricState(obj, next((s for s in savers if s._key_metric_checkpoint is not None), None))
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"TrainingCheckpoint: '{name}' ({type(obj).__name__}) has no state_dict/load_state_dict")
    return obj


class TrainingCheckpoint:
    """Resumable training: save the whole training state every ``interval`` epochs, load it at start.

    The checkpoint (``path``, a plain ``torch.save`` dict of state dicts: loadable with
    ``weights_only=True``) holds the trainer's ignite state (epoch, iteration) under ``"trainer"``
    and each object of ``save_dict`` under its key: anything with ``state_dict`` /
    ``load_state_dict`` (network, optimizer, LR scheduler, grad scaler), a MONAI
    ``EarlyStopHandler`` (patience counter, best score) and a validation engine (best metric and
    the ranking of its ``CheckpointSaver`` for the best model). An ``EarlyStopHandler`` attached to
    the trainer before this handler is added as ``"early_stop"`` (a config cannot name it here
    without a circular reference when it sits in the same handler list). It is written at
    ``EPOCH_COMPLETED`` (after the handlers attached before this one, so attach it after
    validation and early stopping) and at ``COMPLETED``, atomically (``common.guards.atomic_write``:
    a temporary file, then a rename), by rank 0 only under ``torch.distributed``.

    With ``resume=True`` the checkpoint is loaded at ``STARTED`` on every rank: training goes on
    with epoch ``e + 1`` where the checkpoint was written at the end of epoch ``e``; the configured
    ``max_epochs`` is kept, so a finished run can be extended. A missing checkpoint starts from
    scratch (logged); a checkpoint whose epoch exceeds ``max_epochs`` or that does not match the
    objects raises an error naming the file. Combined with :class:`EpochSeed`, the resumed run
    ends with the uninterrupted run's weights.

    Args:
        path: checkpoint file (e.g. ``<ckpt_dir>/checkpoint_last.pt``).
        save_dict: name -> object to save and restore (the trainer itself is added as ``"trainer"``).
        resume: load ``path`` at start when it exists.
        interval: save every ``interval`` epochs (0: only at the end).
        map_location: where to load tensors (default: where each object lives).
    """

    def __init__(self, path: str, save_dict: Mapping[str, Any], resume: bool = False, interval: int = 1,
                 map_location: Any = None) -> None:
        self.path = str(path)
        self.objects = {k: _stateful(k, v) for k, v in save_dict.items()}
        if "trainer" in self.objects:
            raise ValueError("TrainingCheckpoint: 'trainer' is added by attach(); do not put it in save_dict")
        self.resume = bool(resume)
        self.interval = int(interval)
        self.map_location = map_location
        self.resumed_from: int | None = None

    def attach(self, engine: Engine) -> None:
        from monai.handlers import EarlyStopHandler

        self.objects["trainer"] = engine
        stoppers = [h for hs in engine._event_handlers.values() for h, *_ in hs if isinstance(h, EarlyStopHandler)]
        if stoppers and "early_stop" not in self.objects:
            self.objects["early_stop"] = _EarlyStopState(stoppers[0])
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.objects.items()}

    def save(self, engine: Engine) -> None:
        if _is_rank0():
            from common.guards import atomic_write

            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            state = self.state_dict()
            atomic_write(self.path, lambda f: torch.save(state, f), binary=True)

    def load(self, engine: Engine) -> None:
        if not os.path.isfile(self.path):
            logger.info("resume: no checkpoint at %s, training starts from epoch 1", self.path)
            return
        from common.guards import load_weights

        state = load_weights(self.path, map_location=self.map_location)  # weights only; clear errors
        missing = sorted(set(self.objects) - set(state))
        if missing:
            raise RuntimeError(f"{self.path}: the training checkpoint lacks {missing} (it holds {sorted(state)})")
        trainer = state["trainer"]  # ignite: iteration, epoch_length, max_epochs
        epoch, max_epochs = int(trainer["iteration"]) // max(1, int(trainer["epoch_length"])), engine.state.max_epochs
        if max_epochs is not None and epoch > max_epochs:
            raise RuntimeError(f"{self.path}: the checkpoint ends at epoch {epoch}, after this run's "
                               f"{max_epochs} epochs; set epochs >= {epoch} to resume it")
        for name, obj in self.objects.items():
            if name == "trainer":
                continue
            try:
                obj.load_state_dict(state[name])
            except Exception as err:
                raise RuntimeError(f"{self.path}: '{name}' in the checkpoint does not match this "
                                   f"run's {name} ({err})") from err
        engine.load_state_dict(trainer)
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
        self.resumed_from = epoch
        logger.info("resumed from %s: epoch %d, iteration %d", self.path, epoch, engine.state.iteration)


class MLflowExtras:
    """Add the bundle's hyper-parameters and files to the MLflow run of MONAI's ``MLFlowHandler``.

    ``python -m monai.bundle run training --tracking mlflow`` appends an ``MLFlowHandler`` to the
    trainer's handlers; it logs losses and metrics but, as parameters, only ``max_epochs`` and
    ``epoch_length``, and as artifacts only the executed config. This handler, in the bundle's
    ``train#handlers``, finds that handler when the run starts and gives it ``params`` (logged as
    MLflow parameters) and ``artifacts`` (files logged when training completes, such as the best
    checkpoint). Without tracking it does nothing.

    Args:
        params: name -> value (numbers, strings, short lists).
        artifacts: file or folder paths to log at the end (missing ones are skipped).
    """

    def __init__(self, params: Mapping[str, Any] | None = None, artifacts: Sequence[str] | str | None = None) -> None:
        self.params = dict(params or {})
        self.artifacts = [artifacts] if isinstance(artifacts, str) else list(artifacts or [])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.handlers import MLFlowHandler

        # MLFlowHandler is attached after this handler (MONAI appends it), so it is found here, at STARTED
        trackers = {id(h.__self__): h.__self__ for h, *_ in engine._event_handlers.get(Events.STARTED, [])
                    if isinstance(getattr(h, "__self__", None), MLFlowHandler)}
        for tracker in trackers.values():
            tracker.experiment_param = {**(tracker.experiment_param or {}), **self.params}
            present = {str(a) for a in tracker.artifacts if a is not None}
            tracker.artifacts = tuple(a for a in tracker.artifacts if a is not None) + tuple(
                a for a in self.artifacts if str(a) not in present)
