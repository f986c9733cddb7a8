"""CUDA-graph replay of a network's inference forward (one slice at a time is launch-bound).

A forward pass of these networks launches hundreds of small kernels; for one 224 x 224 slice the
GPU waits on the CPU issuing them (tens of ms on an H100, ``benchmarks/README.md``). PyTorch's CUDA
graphs record the launches once per input shape and replay them with a single call.
:class:`CUDAGraphInference` wraps a module: in eval mode, without autograd, on CUDA inputs, it
captures one graph per (shape, dtype, autocast) key on first sight (after a few warm-up calls on a
side stream, as PyTorch's documentation prescribes) and replays it afterwards; everything else
(the module in training mode, CPU tensors, gradients) runs the module eagerly. The wrapper's ``state_dict`` is the
module's own (no prefix), so checkpoints load either way.

Under autocast, PyTorch casts the float32 weights and biases of every convolution and linear layer
to the autocast dtype at every call (its weight cache must be off while capturing), a few hundred
cast kernels per forward. A graph captured under autocast reads copies of those parameters cast
once instead, with the same rounding (the outputs are the eager autocast forward's, bit for bit);
before each replay the copies of parameters changed in place since (``load_state_dict``, any
in-place update: tracked by the tensors' version counters) are cast again.

Inputs are copied into the graph's static input and the output is cloned out, so callers may keep
results across calls. With ``batch_buckets`` a batch is padded up to the smallest bucket that holds
it (rows are independent in eval mode), so the last, smaller batch of each volume of a
:class:`monai.inferers.SliceInferer` reuses a graph instead of capturing a new one. Parameters must
not be replaced (in-place updates such as loading a state dict are fine: the graph reads the same
memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CUDAGraphInference", "autocast_cast_parameters", "graphed_for_inference"]


# layers whose float32 weight and bias autocast casts to its lower-precision dtype at every call
_AUTOCAST_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d)


class _CastParameter:
    """A parameter, its copy in the autocast dtype, and the parameter's version when it was cast."""

    def __init__(self, param: torch.Tensor, dtype: torch.dtype) -> None:
        self.param = param
        with torch.no_grad():
            self.copy = param.detach().to(dtype)
        self.version = param._version

    def sync(self) -> None:
        if self.param._version != self.version:
            with torch.no_grad():
                self.copy.copy_(self.param)
            self.version = self.param._version


def autocast_cast_parameters(module: nn.Module, dtype: torch.dtype) -> dict[str, _CastParameter]:
    """The float32 weights and biases of ``module``'s linear and convolution layers (what autocast
    casts at every call), by their names in ``module.named_parameters()``, each cast to ``dtype`` once."""
    out = {}
    for prefix, layer in module.named_modules():
        if isinstance(layer, _AUTOCAST_CAST_LAYERS):
            for name, param in layer.named_parameters(recurse=False):
                if name in ("weight", "bias") and param.dtype == torch.float32:
                    out[f"{prefix}.{name}" if prefix else name] = _CastParameter(param, dtype)
    return out


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor,
                 cast: dict[str, _CastParameter]) -> None:
        self.graph, self.static_in, self.static_out, self.cast = graph, static_in, static_out, cast


class CUDAGraphInference(nn.Module):
    """Replays CUDA graphs of ``module``'s forward for inference; eager everywhere else.

    Args:
        module: the network (a single tensor in, a single tensor out).
        warmup: eager calls on a side stream before capturing a new shape (cuDNN/Triton autotuning
            and lazy initialisation must happen outside the capture).
        max_graphs: graphs kept (least recently used dropped first); each holds its own memory pool.
        batch_buckets: batch sizes to capture; a batch is padded up to the smallest bucket that holds
            it (larger batches get a graph of their own). ``None``: one graph per batch size seen.
        cast_weights_once: under autocast, graphs read the conv / linear weights cast once (``False``:
            cast at every replay, as autocast does eagerly; for comparisons).
    """

    def __init__(self, module: nn.Module, warmup: int = 3, max_graphs: int = 8,
                 batch_buckets: Sequence[int] | None = None, cast_weights_once: bool = True) -> None:
        super().__init__()
        self.module = module
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.batch_buckets = sorted({int(b) for b in batch_buckets}) if batch_buckets else []
        if any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive batch sizes, got {list(batch_buckets)}")
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.cast_weights_once = bool(cast_weights_once)
        self.training = module.training  # the wrapper starts in its module's mode

    # the wrapped module's parameters and buffers under their own names (checkpoints load as is)
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if assign:
            self._graphs.clear()  # new tensors: graphs captured on the old ones would read stale memory
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        if mode:
            self._graphs.clear()
        return super().train(mode)

    def _use_graph(self, x: torch.Tensor) -> bool:
        return (not self.module.training and x.is_cuda and not torch.is_grad_enabled()
                and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing())

    def _padded_batch(self, batch: int) -> int:
        return next((b for b in self.batch_buckets if b >= batch), batch)

    def _key(self, x: torch.Tensor) -> tuple:
        amp = torch.is_autocast_enabled("cuda")
        shape = (self._padded_batch(x.shape[0]), *x.shape[1:])
        return (shape, x.dtype, x.device, amp, torch.get_autocast_dtype("cuda") if amp else None)

    def _capture(self, x: torch.Tensor, key: tuple) -> _Graph:
        amp, amp_dtype = key[3], key[4]
        static_in = x.new_zeros(key[0])
        static_in[: x.shape[0]].copy_(x)
        cast_once = amp and amp_dtype != torch.float32 and self.cast_weights_once
        cast = autocast_cast_parameters(self.module, amp_dtype) if cast_once else {}
        replaced = {name: c.copy for name, c in cast.items()}

        def run():
            if not replaced:
                return self.module(static_in)
            return torch.func.functional_call(self.module, replaced, (static_in,), strict=False)

        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        # the autocast weight cache must be off while capturing (its casts would be freed after it)
        with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp, cache_enabled=False):
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    run()
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run()
        if not isinstance(static_out, torch.Tensor):
            raise TypeError(f"CUDAGraphInference needs a module returning one tensor, got {type(static_out).__name__}")
        entry = _Graph(graph, static_in, static_out, cast)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_graph(x):
            return self.module(x)
        key = self._key(x)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x, key)
        else:
            self._graphs.move_to_end(key)
            for c in entry.cast.values():  # parameters updated in place since the cast
                c.sync()
        batch = x.shape[0]
        entry.static_in[:batch].copy_(x)  # rows past the batch keep older inputs: they are not returned
        entry.graph.replay()
        return entry.static_out[:batch].clone()


def graphed_for_inference(module: nn.Module, enabled: bool = True, max_batch: int = 16,
                          input_dtype_norms: bool = False) -> nn.Module:
    """``module`` wrapped in :class:`CUDAGraphInference` when enabled and its parameters are on a GPU.

    The bundles' inference configs call this (``cuda_graphs``: true/false): on CPU, or disabled, the
    module is returned as is. Batch buckets are the powers of two below ``max_batch`` and
    ``max_batch`` itself (the inferer's ``sw_batch_size``), so at most ~log2(max_batch) + 1 graphs.
    ``input_dtype_norms`` (the configs' ``amp_input_dtype_norms``) first makes its layer norms run in
    the autocast dtype (:func:`common.networks.blocks.layers.layer_norms_in_input_dtype`), graphed or not.
    """
    if input_dtype_norms:
        from .blocks.layers import layer_norms_in_input_dtype

        layer_norms_in_input_dtype(module)
    param = next(module.parameters(), None)
    if not enabled or param is None or not param.is_cuda:
        return module
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(int(max_batch))
    return CUDAGraphInference(module, batch_buckets=buckets, max_graphs=max(8, len(buckets)))
