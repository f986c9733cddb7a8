"""A CUDA-graph training iteration for MONAI's :class:`~monai.engines.SupervisedTrainer`.

A training step of these networks launches a few thousand small kernels (MSVM-UNet: ~2600); at
the paper batches the GPU waits a fifth of the step on the CPU issuing them
(``benchmarks/README.md``). :class:`CUDAGraphTrainIteration` is an ``iteration_update`` for
``SupervisedTrainer`` that records the forward pass, the loss and the backward pass once in a CUDA
graph and replays them with one call per iteration, following PyTorch's partial-network capture
recipe (https://pytorch.org/docs/stable/notes/cuda.html#partial-network-capture):

- warm-up iterations (real training steps) run eagerly on a side stream, then the graph is
  captured with the gradients set to ``None``, so that the backward writes them into the graph's
  memory; every replay overwrites them (no zeroing needed) and they are bound to the parameters'
  ``.grad`` again after each replay, in case a handler set them to ``None``;
- the optimizer step (and ``GradScaler.step`` / ``update`` under ``amp``) runs eagerly after the
  replay, so any optimizer, learning-rate scheduler or checkpoint reload works unchanged; the loss
  scale is a tensor updated in place, which the captured backward reads;
- the events of MONAI's own iteration fire in the same order (``FORWARD_COMPLETED``,
  ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``), the first three after the replay;
  a handler at ``LOSS_COMPLETED`` that raises (the bundles' non-finite-loss guard) still stops the
  run before the optimizer step;
- the iteration's outputs (``pred``, ``loss``) are cloned out of the graph's memory.

One graph is kept, for one ``(input shape, dtype, target shape, dtype, which parameters need
gradients)`` key. A key is captured after it was seen ``warmup`` iterations in a row, so the last,
smaller batch of an epoch runs eagerly instead of replacing the graph; a change of which
parameters train (:class:`common.handlers.FreezeEncoder` unfreezing the encoder) drops the graph
and captures again after the warm-up. Everything the graph cannot take runs MONAI's own iteration,
with the reason logged once: CPU devices, ``DistributedDataParallel`` networks, gradient
accumulation, ``compile``, prepared batches with extra arguments, a step that synchronises with
the CPU (``.item()`` or boolean indexing in a loss: every eager iteration here runs under PyTorch's
sync debug mode, so it is seen before a capture is tried), and a capture that fails for another
reason (an explicit ``torch.cuda.synchronize()``, say: the error is logged, CUDA's random generator,
which a failed capture leaves unusable, is reset to its state, and training goes on eagerly).

Gradients after the graph is dropped or its capture fails are what MONAI's eager iteration would
leave (zeros for parameters that had one, with ``optim_set_to_none`` false, so a momentum optimizer
steps frozen parameters as it does eagerly); a frozen parameter keeps a zero gradient beside the
graph's, for the same reason.

Memory: the graph's private pool holds one step's activations and the gradients; an eager
iteration (warm-up, last batch of an epoch) or a validation run allocates outside it, so the
memory reserved can exceed the eager trainer's by up to that iteration's activations.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["CUDAGraphTrainIteration", "CapturePolicy", "graphed_train_iteration"]

logger = logging.getLogger(__name__)


class CapturePolicy:
    """When to replay, capture or run eagerly, from the keys of the iterations seen so far.

    A key is captured once it was seen ``warmup`` times in a row (the capture iteration is the
    ``warmup + 1``-th); the captured key replays; any other key runs eagerly. Pure bookkeeping, no
    CUDA: :class:`CUDAGraphTrainIteration` asks it at every iteration.
    """

    REPLAY, CAPTURE, EAGER, WARMUP = "replay", "capture", "eager", "warmup"

    def __init__(self, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (CUDA graphs need warm-up iterations), got {warmup}")
        self.warmup = int(warmup)
        self.captured: Any = None
        self._last: Any = None
        self._streak = 0

    def decide(self, key: Any) -> str:
        """What to do with an iteration of ``key``: ``replay``, ``capture``, ``warmup`` (eager, and the
        key may be captured soon) or ``eager``."""
        self._streak = self._streak + 1 if key == self._last else 1
        self._last = key
        if self.captured is not None and key == self.captured:
            return self.REPLAY
        if self._streak > self.warmup:
            return self.CAPTURE
        return self.WARMUP if self._streak > 1 or self.captured is None else self.EAGER

    def captured_as(self, key: Any) -> None:
        self.captured = key

    def drop(self) -> None:
        self.captured = None


class _TrainGraph:
    """One captured forward + loss + backward and its static tensors."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_target: torch.Tensor,
                 pred: Any, loss: torch.Tensor, grads: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.graph, self.static_in, self.static_target = graph, static_in, static_target
        self.pred, self.loss, self.grads = pred, loss, grads

    def replay(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.static_in.copy_(inputs)
        self.static_target.copy_(targets)
        self.graph.replay()
        for param, grad in self.grads:
            if param.grad is not grad:
                param.grad = grad


def _plain(x: torch.Tensor) -> torch.Tensor:
    as_tensor = getattr(x, "as_tensor", None)  # MetaTensor -> torch.Tensor, same memory
    return as_tensor() if callable(as_tensor) else x


def _clone(x: Any) -> Any:
    """A copy of a (nested) network output, out of the graph's memory."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


@contextlib.contextmanager
def _sync_watch(found: list[str]):
    """Add to ``found`` the warnings of CUDA operations that synchronise with the CPU (``.item()``,
    boolean indexing, ``nonzero``) in the block, through PyTorch's sync debug mode."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text.lower():
            found.append(text.splitlines()[0][:200])
        else:  # not ours: show it as it would have been shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _reset_random_generator(device: torch.device) -> None:
    """After a failed capture CUDA's default generator still believes it is capturing, and every
    random operation raises "Offset increment outside graph capture"; a clone of its state (same
    seed and offset, no capture) set in its place makes it usable again."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    try:
        generator.graphsafe_set_state(generator.clone_state())
    except RuntimeError as err:  # pragma: no cover - older PyTorch without graph-safe states
        logger.warning("could not reset CUDA's random generator after the failed capture: %s", err)


def _is_ddp(network: nn.Module) -> bool:
    return isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel))


class CUDAGraphTrainIteration:
    """``iteration_update`` for :class:`monai.engines.SupervisedTrainer`: forward, loss and backward
    replayed from a CUDA graph, the optimizer step eager (module docstring for the details).

    Args:
        warmup: eager iterations of a key, in a row, before it is captured (at least 1; PyTorch
            recommends a few, for cuDNN's algorithm search, Triton's compilation and lazy state).
    """

    def __init__(self, warmup: int = 2) -> None:
        self.policy = CapturePolicy(warmup)
        self._graph: _TrainGraph | None = None
        self._side: torch.cuda.Stream | None = None
        self._disabled: str | None = None
        self._logged: set[str] = set()
        self._sync: str | None = None  # a CPU synchronisation seen in the last eager step
        self.counts = {"replay": 0, "capture": 0, "eager": 0}

    # -- helpers ----------------------------------------------------------------------------------
    def _log_once(self, message: str, level: int = logging.INFO) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.log(level, message)

    def _unsupported(self, engine: Any) -> str | None:
        if self._disabled:
            return self._disabled
        if not torch.cuda.is_available() or torch.device(engine.state.device).type != "cuda":
            return "the trainer's device is not CUDA"
        if _is_ddp(engine.network):
            return "the network is wrapped for data parallelism (DistributedDataParallel / DataParallel)"
        if getattr(engine, "accumulation_steps", 1) != 1:
            return "gradient accumulation is on (accumulation_steps > 1)"
        if getattr(engine, "compile", False):
            return "the trainer compiles the network (compile=True)"
        return None

    def _autocast(self, engine: Any) -> contextlib.AbstractContextManager:
        if not engine.amp:
            return contextlib.nullcontext()
        kwargs = dict(getattr(engine, "amp_kwargs", None) or {})
        # autocast's weight cache must be off while capturing; the eager iterations turn it off too, so
        # that torch.compile-d parts of the network (common.networks.compile_blocks), which guard on
        # that flag, compile in the warm-up what the capture records instead of compiling inside it
        kwargs["cache_enabled"] = False
        return torch.autocast("cuda", **kwargs)

    @staticmethod
    def _key(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (tuple(inputs.shape), inputs.dtype, inputs.device, tuple(targets.shape), targets.dtype,
                tuple(p.requires_grad for p in network.parameters()))

    @staticmethod
    def _grads_out_of_pool(engine: Any, had_grad: Sequence[nn.Parameter]) -> None:
        """Gradients as MONAI's eager iteration leaves them, none in a graph's pool: with
        ``optim_set_to_none`` false (MONAI's default) a parameter that had a gradient keeps a zero one
        (which the optimizer still steps with: momentum), else ``None``."""
        keep = set() if engine.optim_set_to_none else {id(p) for p in had_grad}
        for p in engine.network.parameters():
            p.grad = torch.zeros_like(p) if id(p) in keep else None

    def _drop_graph(self, engine: Any) -> None:
        if self._graph is not None:
            self._graph = None
            self.policy.drop()
            # release the gradients held in the graph's pool
            self._grads_out_of_pool(engine, [p for p in engine.network.parameters() if p.grad is not None])

    # -- the iteration paths ------------------------------------------------------------------------
    def _eager(self, engine: Any, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """MONAI's own iteration (``SupervisedTrainer._iteration`` without accumulation) on a prepared
        batch; a CPU synchronisation in the forward, loss or backward is noted in ``self._sync`` (it
        would break the capture)."""
        from monai.engines.utils import IterationEvents
        from monai.utils import CommonKeys as Keys

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        syncs: list[str] = []  # the handlers of the events below run outside a graph too: not watched
        with _sync_watch(syncs), self._autocast(engine):
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        with _sync_watch(syncs), self._autocast(engine):
            engine.state.output[Keys.LOSS] = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]
        scaler = engine.scaler if engine.amp else None
        with _sync_watch(syncs):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        self._sync = syncs[0] if syncs else None
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._optimizer_step(engine)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        self.counts["eager"] += 1
        return engine.state.output

    @staticmethod
    def _optimizer_step(engine: Any) -> None:
        scaler = engine.scaler if engine.amp else None
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device=device)
        return self._side

    def _warmup(self, engine: Any, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """An eager iteration on a side stream (PyTorch's recipe before a capture)."""
        engine.state.output = None  # the last iteration's gradient accumulators belong to another stream
        side = self._side_stream(inputs.device)
        current = torch.cuda.current_stream(inputs.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self._eager(engine, inputs, targets)
        current.wait_stream(side)
        return out

    def _capture(self, engine: Any, inputs: torch.Tensor, targets: torch.Tensor,
                 had_grad: Sequence[nn.Parameter]) -> _TrainGraph:
        """Capture forward, loss and backward; ``had_grad``: the parameters with a gradient before."""
        engine.state.output = None  # frees the last iteration's autograd graph (its gradient accumulators)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
        static_in = _plain(inputs).detach().clone()
        static_target = _plain(targets).detach().clone()
        scaler = engine.scaler if engine.amp else None
        torch.cuda.synchronize(inputs.device)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph does not restore the current stream when ending the capture raises (a
        # step that synchronises): the outer stream context does, so a failed capture leaves the
        # process on its own stream
        side = self._side_stream(inputs.device)
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                with self._autocast(engine):
                    pred = engine.inferer(static_in, engine.network)
                    loss = engine.loss_function(pred, static_target).mean()
                (scaler.scale(loss) if scaler is not None else loss).backward()
        grads = [(p, p.grad) for p in engine.network.parameters() if p.grad is not None]
        if not engine.optim_set_to_none:  # the frozen parameters keep the zero gradients eager training gives them
            for p in had_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        return _TrainGraph(graph, static_in, static_target, pred, loss, grads)

    def _replay(self, engine: Any, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        from monai.engines.utils import IterationEvents
        from monai.utils import CommonKeys as Keys

        graph = self._graph
        engine.network.train()
        graph.replay(_plain(inputs), _plain(targets))
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: _clone(graph.pred)}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = graph.loss.detach().clone()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._optimizer_step(engine)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        self.counts["replay"] += 1
        return engine.state.output

    def _monai_iteration(self, engine: Any, batchdata: Any, reason: str) -> dict:
        self._log_once(f"CUDA-graph training iteration off ({reason}): MONAI's eager iteration runs")
        self.counts["eager"] += 1
        return engine._iteration(engine, batchdata)

    # -- the iteration ------------------------------------------------------------------------------
    def __call__(self, engine: Any, batchdata: Any) -> dict:
        reason = self._unsupported(engine)
        if reason is None and batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if reason is not None:
            return self._monai_iteration(engine, batchdata, reason)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                     **(getattr(engine, "to_kwargs", None) or {}))
        if len(batch) != 2 or not all(isinstance(t, torch.Tensor) for t in batch):
            self._disabled = "the prepared batch is not one (inputs, targets) pair of tensors"
            return self._monai_iteration(engine, batchdata, self._disabled)
        inputs, targets = batch
        key = self._key(engine.network, inputs, targets)
        if self._graph is not None and key[-1] != self.policy.captured[-1]:
            self._drop_graph(engine)  # the trained parameters changed: the graph's backward is stale
        action = self.policy.decide(key)
        if action == CapturePolicy.REPLAY:
            return self._replay(engine, inputs, targets)
        if action == CapturePolicy.CAPTURE and self._sync is not None:
            # a failed capture would leave CUDA's random generator unusable: never attempt one
            self._disabled = ("the training step synchronises with the CPU, which a CUDA graph cannot hold "
                              f"({self._sync})")
            self._log_once(f"CUDA-graph training iteration off ({self._disabled}): training continues eagerly",
                           logging.WARNING)
            return self._eager(engine, inputs, targets)
        if action == CapturePolicy.CAPTURE:
            self._drop_graph(engine)
            had_grad = [p for p in engine.network.parameters() if p.grad is not None]
            try:
                self._graph = self._capture(engine, inputs, targets, had_grad)
            except Exception as err:  # noqa: BLE001 - any capture failure: keep training eagerly
                self._graph = None
                torch.cuda.synchronize(inputs.device)
                _reset_random_generator(inputs.device)
                self._grads_out_of_pool(engine, had_grad)
                self._disabled = f"capturing the training step failed: {type(err).__name__}: {err}"
                self._log_once(f"CUDA-graph training iteration off ({self._disabled}): training continues eagerly",
                               logging.WARNING)
                return self._eager(engine, inputs, targets)
            self.policy.captured_as(key)
            self.counts["capture"] += 1
            logger.info("captured the training step in a CUDA graph for inputs %s", tuple(inputs.shape))
            return self._replay(engine, inputs, targets)
        if action == CapturePolicy.WARMUP:
            return self._warmup(engine, inputs, targets)
        return self._eager(engine, inputs, targets)


def graphed_train_iteration(enabled: bool = True, warmup: int = 2) -> CUDAGraphTrainIteration | None:
    """The ``iteration_update`` the training configs pass to ``SupervisedTrainer``: a
    :class:`CUDAGraphTrainIteration` when ``enabled`` (it runs eagerly off CUDA), else ``None``
    (MONAI's own iteration)."""
    return CUDAGraphTrainIteration(warmup=warmup) if enabled else None
