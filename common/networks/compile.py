"""Regional ``torch.compile`` of the networks' blocks for training.

:func:`compile_blocks` marks every compilable block of a network (a :class:`Compilable` module that
calls :func:`maybe_compiled` in its ``forward``: the
:class:`~common.networks.blocks.VSSBlock`, MSVM-UNet's LKPE up-samplers and stem, any
:class:`CompilableSequential`) so that its training forward (``module.training`` and gradients
enabled) runs through one ``torch.compile``-d function per block class (Inductor fuses the
LayerNorms, activations, residual adds, stochastic depth, the cross-scan / merge copies and the
layout copies around the 1x1 convolutions into a few kernels each way). The selective scan itself is
not traced: SS2D calls its scan kernels and chooses its scan path outside the graphs
(``torch.compiler.disable``), so each VSS block is a few graphs around our own scan kernels.
Inference (``eval()`` or ``no_grad``) keeps the eager forward, which takes the fused inference
kernels and is replayed from CUDA graphs by the bundles (one slice is launch-bound; compiling it is
not measured yet, and every new batch size would compile again).

Graphs are specialised on shapes (``dynamic=False``): a network compiles one graph set per block
width and map size, on the first training iterations (34-129 s on an H100 host, measured before the
drop-path probability stopped causing per-block graphs; cached by Inductor on disk afterwards).
The compiled code composes with the trainers' CUDA-graph iteration (``common.engines``): the eager
warm-up iterations compile, the capture records the compiled kernels.

Why regional and not the whole network: blocks of the same shape share their code (a whole-network
compile traces every block again), and stochastic depth gives each block its own probability,
which :class:`~common.networks.blocks.DropPath` keeps a graph input rather than a constant.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

__all__ = ["compile_blocks", "compiled_function", "maybe_compiled", "Compilable", "CompilableSequential",
           "RECOMPILE_LIMIT"]

logger = logging.getLogger(__name__)

#: Dynamo's per-function limit of compiled variants is raised to at least this: one compiled
#: function serves every block, and each (width, map size, drop-path on / off, autocast) is a variant.
RECOMPILE_LIMIT = 64

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

_FAILED: set[tuple] = set()  # (function, mode, backend) whose compilation failed: runs eagerly


@functools.cache
def compiled_function(fn, mode: str = "default", backend="inductor"):
    """``torch.compile(fn, dynamic=False, mode=mode, backend=backend)``, one per (function, mode,
    backend) in the process.

    ``fn`` is an unbound method (``VSSBlock._forward``) called with the module as its first argument,
    so the compiled function holds no module: copies of a network (``copy.deepcopy``) share it safely.
    """
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode, backend=backend)


def maybe_compiled(module: nn.Module, fn, *args):
    """``fn(module, *args)``: compiled (:func:`compiled_function`) where :func:`compile_blocks` set
    ``module.compile_mode`` and the call trains (``module.training``, gradients enabled), else eager.

    Where the compiler backend fails (``BackendCompilerFailed``: for example no C compiler, or a GPU
    Triton cannot generate code for), the call and every later one of ``fn`` run eagerly, with one
    warning: training goes on at eager speed. Graphs of ``fn`` that ran before the failing one, in
    that first call, run again eagerly (a batch norm's running statistics move twice once)."""
    mode = module.compile_mode
    if mode is not None and module.training and torch.is_grad_enabled():
        key = (fn, mode, module.compile_backend)
        if key not in _FAILED:
            try:
                return compiled_function(*key)(module, *args)
            except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no working compiler for the kernels
                _FAILED.add(key)
                logger.warning("compile_blocks: compiling %s failed (%s: %s); it runs eagerly from now on",
                               getattr(fn, "__qualname__", fn), type(err).__name__, str(err).strip()[:500])
    return fn(module, *args)


class Compilable:
    """Mixin of the modules :func:`compile_blocks` marks; their ``forward`` calls :func:`maybe_compiled`.
    ``compile_mode`` ``None``: eager (the default, and how to turn one block off)."""

    compile_mode: str | None = None
    compile_backend = "inductor"


class CompilableSequential(Compilable, nn.Sequential):
    """``nn.Sequential`` (same children, same state dict) whose training forward
    :func:`compile_blocks` can compile. For the layers between the repeated blocks (stems, down-samplers)."""

    def forward(self, x):
        return maybe_compiled(self, nn.Sequential.forward, x)


def compile_blocks(network: nn.Module, enabled: bool = True, mode: str = "default",
                   backend="inductor") -> nn.Module:
    """Compile the training forward of every compilable block in ``network`` (in place); returns it.

    Args:
        network: any module; its compilable blocks (see the module docstring) are marked.
        enabled: ``False`` returns ``network`` untouched (for a config switch).
        mode: ``torch.compile`` mode, ``"default"`` or ``"max-autotune-no-cudagraphs"`` (modes that
            make their own CUDA graphs would nest inside the trainers' capture, so they are refused).
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` traces without generating
            kernels: for finding whether a problem is Inductor's).

    Blocks that use gradient checkpointing stay eager. ``block.compile_mode = None`` turns one off.
    A compilable block inside another one is left to its parent's graph.
    """
    if not enabled:
        return network
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_blocks: mode must be one of {COMPILE_MODES}, got {mode!r}")
    from .blocks.ss2d import exclude_scans_from_compile

    exclude_scans_from_compile()
    blocks = _outermost_compilable(network)
    if not blocks:
        raise ValueError(f"compile_blocks: {type(network).__name__} has no compilable blocks")
    dynamo = torch._dynamo.config
    if getattr(dynamo, "recompile_limit", RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        dynamo.recompile_limit = RECOMPILE_LIMIT
    for block in blocks:
        block.compile_mode, block.compile_backend = mode, backend
    logger.info("compile_blocks: %d blocks compile their training forward (mode %s)", len(blocks), mode)
    return network


def _outermost_compilable(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, Compilable):
        return [module]
    return [b for child in module.children() for b in _outermost_compilable(child)]
