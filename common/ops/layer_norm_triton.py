"""Triton kernels of :func:`common.ops.layer_norm.layer_norm_channels`: a LayerNorm over one axis
(the channels) of a tensor in any layout, forward and backward.

The tensor is addressed as ``(B, C, P)``: ``B`` the merged axes before the channels, ``P`` the merged
axes after them, each with one stride. A channel-first map ``(B, C, H, W)`` is ``(B, C, H*W)`` with
the positions contiguous; a channels-last one, or any ``(..., C)`` tensor normalised over its last
axis, has the channels contiguous. Each program normalises a ``(BLOCK_C, BLOCK_P)`` tile (all the
channels of ``BLOCK_P`` positions), so memory is read along whichever axis is contiguous, in the
tensor's own layout: no permuting copy before or after, and the result is written in ``out_dtype``
directly (no float32 tensor and cast kernel where a bf16 convolution reads it next).

Forward: float32 statistics (mean, then the variance of the deviations: no ``E[x^2] - E[x]^2``
cancellation), the affine, one rounding; the mean and ``1 / std`` per position are kept for the
backward. Backward: ``dx = rstd (g w - mean_c(g w) - x_hat mean_c(g w x_hat))``, and the affine's
gradients as per-program partial sums over positions (a ``(programs, C)`` float32 buffer summed by
one ``torch.sum``: deterministic, no atomics). On CPU tensors the kernels run under Triton's
interpreter (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._twin import interpreted_twin

__all__ = ["layer_norm_fwd", "layer_norm_bwd", "pick_tile", "TILE_OVERRIDE"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TWIN_NAME = "common.ops._layer_norm_triton_interpreted"

# Benchmarks may force the tile: (BLOCK_P, num_warps).
TILE_OVERRIDE: dict[str, tuple[int, int]] = {}


@triton.jit
def _sum(x, axis: tl.constexpr):
    # triton.language's own sum combine (what tl.sum reduces with) passed to tl.reduce, not tl.sum: the
    # interpreter twin cannot call triton.language's jit helpers (tl.sum, tl.zeros), but it recognises this
    # combine and sums with NumPy; any other combine it applies element by element in Python
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, P, eps, tiles_p,
                   sxb, sxc, sxp, syb, syc, syp,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAVE: tl.constexpr,
                   BC: tl.constexpr, BP: tl.constexpr):
    # a 1-D grid over (B, tiles of P): B alone can exceed CUDA's 65535 programs of a second grid axis
    # (a channels-last (24, 64, 64, C) map normalised over its last axis is B = 98304 rows of P = 1)
    tile = tl.program_id(0)
    bi = (tile // tiles_p).to(tl.int64)
    tp = (tile % tiles_p).to(tl.int64)
    p = tp * BP + tl.arange(0, BP)[None, :]
    c = tl.arange(0, BC)[:, None]
    m = (c < C) & (p < P)
    x = tl.load(x_ptr + bi * sxb + c * sxc + p * sxp, mask=m, other=0.0).to(tl.float32)
    mean = _sum(x, 0) / C
    dev = tl.where(m, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(dev * dev, 0) / C + eps)
    y = dev * rstd[None, :]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    tl.store(y_ptr + bi * syb + c * syc + p * syp, y.to(y_ptr.dtype.element_ty), mask=m)
    if SAVE:
        ps = tp * BP + tl.arange(0, BP)
        tl.store(mean_ptr + bi * P + ps, mean, mask=ps < P)
        tl.store(rstd_ptr + bi * P + ps, rstd, mask=ps < P)


@triton.jit
def _ln_bwd_kernel(x_ptr, w_ptr, g_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, C, P, tiles_p, tiles,
                   sxb, sxc, sxp, sgb, sgc, sgp, sdb, sdc, sdp,
                   HAS_W: tl.constexpr, AFFINE_GRAD: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c = tl.arange(0, BC)[:, None]
    cm = c < C
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    acc_w = tl.full((BC,), 0.0, tl.float32)  # not tl.zeros: a jit helper the twin cannot call
    acc_b = tl.full((BC,), 0.0, tl.float32)  # not tl.zeros: a jit helper the twin cannot call
    for t in range(pid, tiles, nprog):
        bi = (t // tiles_p).to(tl.int64)
        ps = (t % tiles_p).to(tl.int64) * BP + tl.arange(0, BP)
        p = ps[None, :]
        m = cm & (p < P)
        x = tl.load(x_ptr + bi * sxb + c * sxc + p * sxp, mask=m, other=0.0).to(tl.float32)
        # zeroed explicitly where masked: on an H100 (Triton 3.6) the masked elements of this load came
        # back non-zero with the channels contiguous and a tile wider than the positions left (a norm
        # over the last axis), which made the bias gradient (a sum of g over positions) wrong
        g = tl.where(m, tl.load(g_ptr + bi * sgb + c * sgc + p * sgp, mask=m, other=0.0).to(tl.float32), 0.0)
        mean = tl.load(mean_ptr + bi * P + ps, mask=ps < P, other=0.0)
        rstd = tl.load(rstd_ptr + bi * P + ps, mask=ps < P, other=0.0)
        xhat = tl.where(m, (x - mean[None, :]) * rstd[None, :], 0.0)
        if HAS_W:
            wg = g * w
        else:
            wg = g
        c1 = _sum(xhat * wg, 0) / C
        c2 = _sum(wg, 0) / C
        dx = (wg - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
        tl.store(dx_ptr + bi * sdb + c * sdc + p * sdp, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if AFFINE_GRAD:
            acc_w += _sum(g * xhat, 1)
            acc_b += _sum(g, 1)
    if AFFINE_GRAD:
        cs = tl.arange(0, BC)
        tl.store(dw_ptr + pid * C + cs, acc_w, mask=cs < C)
        tl.store(db_ptr + pid * C + cs, acc_b, mask=cs < C)


def pick_tile(channels: int, interpreted: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_P, num_warps)``: all the channels (up to 4096) and enough positions for a
    4096-value tile, 8 warps from 1024 channels; at most 8 positions under the interpreter (CPU
    tests), whose reductions slow down with the tile's width."""
    bc = triton.next_power_of_2(max(channels, 1))
    forced = TILE_OVERRIDE.get("ln")
    if forced is not None:
        return bc, forced[0], forced[1]
    bp = max(1, min(8 if interpreted else 128, 4096 // bc))
    return bc, bp, 8 if bc >= 1024 else 4


def _twin():
    return interpreted_twin(_TWIN_NAME, __file__, __package__)


def _programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        return max(1, min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 4))


def layer_norm_fwd(x: torch.Tensor, xs: tuple[int, int, int, int, int, int], y: torch.Tensor,
                   ys: tuple[int, int, int], weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, save: bool) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Normalise ``x`` (``xs`` = sizes ``B, C, P`` and strides ``b, c, p``) into ``y`` (strides ``ys``),
    returning the float32 ``(B, P)`` mean and ``1 / std`` when ``save``."""
    if x.device.type != "cuda" and not INTERPRETED:
        return _twin().layer_norm_fwd(x, xs, y, ys, weight, bias, eps, save)
    nb, nc, npos = xs[:3]
    mean = rstd = None
    if save:
        mean = torch.empty(nb, npos, device=x.device, dtype=torch.float32)
        rstd = torch.empty(nb, npos, device=x.device, dtype=torch.float32)
    if nb * nc * npos == 0:
        return mean, rstd
    bc, bp, nw = pick_tile(nc, x.device.type != "cuda")
    tiles_p = triton.cdiv(npos, bp)
    _ln_fwd_kernel[(nb * tiles_p,)](
        x, weight if weight is not None else x, bias if bias is not None else x, y,
        mean if save else x, rstd if save else x, nc, npos, float(eps), tiles_p, *xs[3:], *ys,
        HAS_W=weight is not None, HAS_B=bias is not None, SAVE=save, BC=bc, BP=bp, num_warps=nw,
    )
    return mean, rstd


def layer_norm_bwd(x: torch.Tensor, xs: tuple[int, ...], g: torch.Tensor, gs: tuple[int, int, int],
                   dx: torch.Tensor, ds: tuple[int, int, int], weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, affine_grad: bool) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Write the input gradient into ``dx`` (strides ``ds``) from the output gradient ``g`` (strides
    ``gs``); return the float32 ``(C,)`` gradients of the weight and bias when ``affine_grad``."""
    if x.device.type != "cuda" and not INTERPRETED:
        return _twin().layer_norm_bwd(x, xs, g, gs, dx, ds, weight, mean, rstd, affine_grad)
    nb, nc, npos = xs[:3]
    bc, bp, nw = pick_tile(nc, x.device.type != "cuda")
    tiles_p = triton.cdiv(npos, bp)
    tiles = nb * tiles_p
    if tiles == 0 or nc == 0:
        zero = torch.zeros(nc, device=x.device, dtype=torch.float32)
        return (zero, zero.clone()) if affine_grad else (None, None)
    progs = _programs(x.device, tiles)
    dw = db = None
    if affine_grad:
        dw = torch.empty(progs, nc, device=x.device, dtype=torch.float32)
        db = torch.empty(progs, nc, device=x.device, dtype=torch.float32)
    _ln_bwd_kernel[(progs,)](
        x, weight if weight is not None else x, g, mean, rstd, dx, dw if affine_grad else x, db if affine_grad else x,
        nc, npos, tiles_p, tiles, *xs[3:], *gs, *ds,
        HAS_W=weight is not None, AFFINE_GRAD=affine_grad, BC=bc, BP=bp, num_warps=nw,
    )
    if not affine_grad:
        return None, None
    return dw.sum(0), db.sum(0)
