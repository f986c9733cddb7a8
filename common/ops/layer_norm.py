"""LayerNorm over the channel axis, in the tensor's own layout, differentiable, one kernel each way.

VMamba-family networks normalise over the channels of channel-first maps (VMamba v2's ``ln2d``, all
of MSVM-UNet) and of channels-last tensors. In PyTorch the channel-first case is a permute, a
``.contiguous()`` copy, ``F.layer_norm`` and a permuted view back (whose channels-last strides then
switch the next convolutions' layout), and under autocast the norm also reads a float32 copy of a
bf16 input and writes float32, which the convolution after it casts back to bf16. Its kernel is slow
at these widths too (one row of 96-768 values per block).

:func:`layer_norm_channels` is the same function (float32 statistics, the result rounded once) as one
Triton kernel reading the input where it lies and writing the output in the input's layout and the
dtype asked for, with a Triton backward (:mod:`common.ops.layer_norm_triton`). It runs on CUDA (and
under ``TRITON_INTERPRET=1``, for tests); elsewhere it is :func:`layer_norm_channels_ref`, the
PyTorch composition, with the same arguments and result.

Where the networks use it is :data:`SCOPE` (``COMMON_CHANNEL_NORM``); off by default: timed on an H100,
MSVM-UNet trains 5-6 % slower with it (benchmarks/README.md, "Channel LayerNorm kernels for training"
and the sections after it).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .ss2d_io import fused_io_available

__all__ = ["layer_norm_channels", "layer_norm_channels_ref", "default_out_dtype", "channel_norm_available"]

MAX_CHANNELS = 4096

SCOPE_ENV = "COMMON_CHANNEL_NORM"
SCOPES = ("all", "linear_inference", "off")
# Where the networks take these kernels: "all" (every LayerNorm2d and every norm before a linear layer,
# training included); "linear_inference" (the default: none of them; an nn.LayerNorm before a linear
# layer where no gradient is needed takes common.ops.ss2d_io.layer_norm_cast, the kernel timed on the
# H200), or "off" (PyTorch's norms only). Benchmarks and tests set it; users may choose with the
# COMMON_CHANNEL_NORM environment variable. "all" stays opt-in: on an H100 (2026-12-06) MSVM-UNet trained
# 5-6 % slower with it (benchmarks/gpu/bench_trainer.py --norms both), the depth-wise convolutions after
# the norms then running PyTorch's channel-first kernels.
SCOPE = os.environ.get(SCOPE_ENV, "linear_inference")


def norm_scope() -> str:
    """:data:`SCOPE`, checked."""
    if SCOPE not in SCOPES:
        raise ValueError(f"{SCOPE_ENV}={SCOPE!r}: choose one of {', '.join(SCOPES)}")
    return SCOPE


def channel_norm_available(device: torch.device | str) -> bool:
    """Whether the networks' norms take :func:`layer_norm_channels`'s kernels on ``device``: scope
    ``"all"`` (:data:`SCOPE`) and CUDA with Triton (or ``TRITON_INTERPRET=1``, tests)."""
    return norm_scope() == "all" and fused_io_available(device)


def default_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm`` gives for ``x``: float32 under autocast (a float32 op there), else
    ``x``'s dtype."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype


def layer_norm_channels_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float = 1e-5, dim: int = -1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The PyTorch composition: ``F.layer_norm`` of ``x`` with ``dim`` moved last (float32 inside
    where ``x`` is a low-precision dtype, as autocast runs it), moved back, cast to ``out_dtype``
    (default :func:`default_out_dtype`)."""
    out_dtype = out_dtype or default_out_dtype(x)
    dim = dim % x.dim()
    with torch.autocast(x.device.type, enabled=False):
        xt = x.movedim(dim, -1)
        low = xt.dtype in (torch.float16, torch.bfloat16)
        w = weight.float() if weight is not None and low else weight
        b = bias.float() if bias is not None and low else bias
        y = F.layer_norm(xt.float() if low else xt, xt.shape[-1:], w, b, eps)
        return y.movedim(-1, dim).to(out_dtype)


def _merged(shape, strides) -> tuple[int, int] | None:
    """Size and stride of ``shape``'s axes as one axis, or None where their strides do not merge."""
    dims = [(s, st) for s, st in zip(shape, strides) if s != 1]
    for (_, st0), (s1, st1) in zip(dims, dims[1:]):
        if st0 != st1 * s1:
            return None
    return math.prod(shape), (dims[-1][1] if dims else 1)


def _bcp(t: torch.Tensor, dim: int) -> tuple[int, ...] | None:
    """``(B, C, P, stride_B, stride_C, stride_P)`` of ``t`` around the axis ``dim``, or None."""
    before, after = _merged(t.shape[:dim], t.stride()[:dim]), _merged(t.shape[dim + 1:], t.stride()[dim + 1:])
    if before is None or after is None:
        return None
    return before[0], t.shape[dim], after[0], before[1], t.stride(dim), after[1]


def _addressable(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    spec = _bcp(t, dim)
    if spec is None:
        t = t.contiguous()
        spec = _bcp(t, dim)
    return t, spec


class _LayerNormChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, dim, out_dtype):
        from .layer_norm_triton import layer_norm_fwd

        x, xs = _addressable(x, dim)
        y = torch.empty_like(x, dtype=out_dtype)  # x's layout (dense: x is, or was made, addressable)
        ys = _bcp(y, dim)
        if ys is None:  # empty_like gave another layout (x overlapping or with gaps): a contiguous one
            y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
            ys = _bcp(y, dim)
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        mean, rstd = layer_norm_fwd(x, xs, y, ys[3:], weight, bias, eps, save)
        if save:
            ctx.save_for_backward(x, weight, mean, rstd)
            ctx.dim, ctx.xs = dim, xs
            ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad):
        from .layer_norm_triton import layer_norm_bwd

        x, weight, mean, rstd = ctx.saved_tensors
        grad, gs = _addressable(grad, ctx.dim)
        dx = torch.empty_like(x)
        ds = _bcp(dx, ctx.dim)
        if ds is None:
            dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            ds = _bcp(dx, ctx.dim)
        affine = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dw, db = layer_norm_bwd(x, ctx.xs, grad, gs[3:], dx, ds[3:], weight, mean, rstd, affine)
        dweight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = db.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), dweight, dbias, None, None, None


def layer_norm_channels(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float = 1e-5, dim: int = -1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm of ``x`` over its axis ``dim`` (weight and bias ``(C,)`` or None), in ``out_dtype``
    (default :func:`default_out_dtype`: what ``F.layer_norm`` would give) and ``x``'s layout.

    Float32 statistics and affine whatever ``x``'s dtype; differentiable in ``x``, ``weight`` and
    ``bias``. One Triton kernel each way where :func:`common.ops.ss2d_io.fused_io_available` (CUDA) and
    ``C <= 4096``; else :func:`layer_norm_channels_ref`. Under autocast an ``out_dtype`` equal to the
    autocast dtype gives exactly what a convolution or linear layer after a float32 norm computes
    with (it casts its input), without the float32 tensor.
    """
    dim = dim % x.dim()
    channels = x.shape[dim]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (channels,):
            raise ValueError(f"layer_norm_channels: {name} must be ({channels},) for axis {dim} of "
                             f"{tuple(x.shape)}, got {tuple(p.shape)}")
    out_dtype = out_dtype or default_out_dtype(x)
    if channels > MAX_CHANNELS or not fused_io_available(x.device) or x.dtype == torch.float64:
        return layer_norm_channels_ref(x, weight, bias, eps, dim, out_dtype)
    return _LayerNormChannels.apply(x, weight, bias, float(eps), dim, out_dtype)
