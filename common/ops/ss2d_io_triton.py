"""Triton kernels for what surrounds SS2D's bidirectional scan at inference (see :mod:`common.ops.ss2d_io`).

- :func:`conv_cross_triton`: the depth-wise conv of the channels-last ``x`` half of ``in_proj``'s
  output, its bias and SiLU, written straight into the two scan sequences ``(B, 2, D, H*W)``: the
  rows view (position ``h W + w``) and the column-major copy (``w H + h``). It replaces the
  channels-first copy, the convolution, the SiLU and the stacking copy (five reads and five writes
  of the map) with one read and two writes.
- :func:`merge_norm_triton`: the merge of the four scans' outputs ``(B, 4, D, L)`` (slots rows
  forward, rows backward, columns forward, columns backward, each at its sequence's positions), the
  LayerNorm over the channels and the SiLU(z) gate, written channels-last ``(B, H, W, D)`` for
  ``out_proj``. It replaces two sums, a transposed add, a permuting copy, the norm (float32 out under
  autocast), the SiLU and the product.
- :func:`layer_norm_triton`: a LayerNorm whose float32 result is stored in the autocast dtype: what
  the ``nn.Linear`` after a float32 norm reads under autocast (VSS blocks' norm before ``in_proj``,
  patch merging's before its reduction), without the float32 tensor and the cast kernel.

Both work on ``(BLOCK_H, BLOCK_W, BLOCK_D)`` tiles of map positions and channels: every memory
access then runs along a contiguous axis (``w`` for the rows sequence, ``h`` for the column-major one,
the channels for the channels-last tensors), and Triton moves the tile between those layouts through
shared memory. The merge makes two passes over the channels: the statistics (chunks combined with
Chan et al.'s update, so no ``E[x^2] - E[x]^2`` cancellation), then the normalised output; the
second pass re-reads the chunk from cache. All arithmetic is float32; outputs are rounded once.

No autograd: :mod:`common.ops.ss2d_io` calls these only where no gradient is needed. On CPU tensors
they run under Triton's interpreter (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._twin import interpreted_twin

__all__ = ["conv_cross_triton", "merge_norm_triton", "layer_norm_triton", "merge_fused_applies", "pick_tiles",
           "TILE_OVERRIDE"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TWIN_NAME = "common.ops._ss2d_io_triton_interpreted"

# Benchmarks may force the tiles: "conv" / "merge" -> (BLOCK_H, BLOCK_W, BLOCK_D, num_warps).
TILE_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}


@triton.jit
def _sum(x, axis: tl.constexpr):
    # as scan_triton._sum (triton.language's sum combine, which the interpreter twin sums with NumPy);
    # defined here again rather than imported from scan_triton: the twin's relative import would
    # bring the compiled module's helper, which the interpreter cannot call
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _conv_cross_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    H, W, D, L,
    sxb, sxh, sxw,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    n_wb = (W + BW - 1) // BW
    hh = (pid_hw // n_wb) * BH + tl.arange(0, BH)
    ww = (pid_hw % n_wb) * BW + tl.arange(0, BW)
    dd = pid_d * BD + tl.arange(0, BD)
    h3 = hh[:, None, None]
    w3 = ww[None, :, None]
    d3 = dd[None, None, :]
    mask_d = d3 < D
    pad: tl.constexpr = (KS - 1) // 2
    acc = tl.full((BH, BW, BD), 0.0, dtype=tl.float32)
    x_base = x_ptr + pid_b * sxb
    for kh in tl.static_range(KS):
        hi = h3 + (kh - pad)
        for kw in tl.static_range(KS):
            wi = w3 + (kw - pad)
            m = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W) & mask_d
            xv = tl.load(x_base + hi * sxh + wi * sxw + d3, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + d3 * (KS * KS) + (kh * KS + kw), mask=mask_d, other=0.0).to(tl.float32)
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(b_ptr + d3, mask=mask_d, other=0.0).to(tl.float32)
    y = (acc / (1.0 + tl.exp(-acc))).to(out_ptr.dtype.element_ty)
    m = (h3 < H) & (w3 < W) & mask_d
    o_base = out_ptr + pid_b * 2 * D * L + d3 * L
    tl.store(o_base + h3 * W + w3, y, mask=m)  # the rows view
    tl.store(o_base + D * L + w3 * H + h3, y, mask=m)  # the column-major copy


@triton.jit
def _merged_chunk(base, d0, D, L, rows, cols, mask_p, BD: tl.constexpr):
    dd = d0 + tl.arange(0, BD)
    d3 = dd[None, None, :]
    m = mask_p & (d3 < D)
    off = d3 * L
    v = tl.load(base + off + rows, mask=m, other=0.0).to(tl.float32)
    v += tl.load(base + D * L + off + rows, mask=m, other=0.0).to(tl.float32)
    v += tl.load(base + 2 * D * L + off + cols, mask=m, other=0.0).to(tl.float32)
    v += tl.load(base + 3 * D * L + off + cols, mask=m, other=0.0).to(tl.float32)
    return v, d3, m


@triton.jit
def _merge_norm_kernel(
    ys_ptr, z_ptr, w_ptr, b_ptr, out_ptr,
    H, W, D, L, eps,
    szb, szh, szw,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,
    Z_SILU: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n_wb = (W + BW - 1) // BW
    hh = (pid_hw // n_wb) * BH + tl.arange(0, BH)
    ww = (pid_hw % n_wb) * BW + tl.arange(0, BW)
    h3 = hh[:, None, None]
    w3 = ww[None, :, None]
    mask_p = (h3 < H) & (w3 < W)
    rows = h3 * W + w3
    cols = w3 * H + h3
    base = ys_ptr + pid_b * 4 * D * L
    if NORM:
        # per-position mean and M2 over the channels, chunk by chunk (Chan et al.'s parallel update)
        mean = tl.full((BH, BW), 0.0, dtype=tl.float32)
        m2 = tl.full((BH, BW), 0.0, dtype=tl.float32)
        for d0 in range(0, D, BD):
            v, d3, m = _merged_chunk(base, d0, D, L, rows, cols, mask_p, BD)
            n_a = d0 * 1.0
            n_c = tl.minimum(D - d0, BD) * 1.0
            mean_c = _sum(v, 2) / n_c
            dev = tl.where(m, v - mean_c[:, :, None], 0.0)
            m2_c = _sum(dev * dev, 2)
            delta = mean_c - mean
            n = n_a + n_c
            mean += delta * (n_c / n)
            m2 += m2_c + delta * delta * (n_a * n_c / n)
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
    z_base = z_ptr + pid_b * szb + h3 * szh + w3 * szw
    o_base = out_ptr + pid_b * H * W * D + (h3 * W + w3) * D
    for d0 in range(0, D, BD):
        v, d3, m = _merged_chunk(base, d0, D, L, rows, cols, mask_p, BD)
        if NORM:
            v = (v - mean[:, :, None]) * rstd[:, :, None]
            if HAS_W:
                v = v * tl.load(w_ptr + d3, mask=d3 < D, other=0.0).to(tl.float32)
            if HAS_B:
                v = v + tl.load(b_ptr + d3, mask=d3 < D, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_base + d3, mask=m, other=0.0).to(tl.float32)
            if Z_SILU:
                zv = zv / (1.0 + tl.exp(-zv))
            v = v * zv
        tl.store(o_base + d3, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, D, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)[:, None]
    cols = tl.arange(0, BD)[None, :]
    m = (rows < M) & (cols < D)
    x = tl.load(x_ptr + rows * D + cols, mask=m, other=0.0).to(tl.float32)
    mean = _sum(x, 1) / D
    dev = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(dev * dev, 1) / D + eps)
    y = dev * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * D + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def pick_tiles(kind: str, batch: int, height: int, width: int, dim: int) -> tuple[int, int, int, int] | None:
    """``(BLOCK_H, BLOCK_W, BLOCK_D, num_warps)`` for ``kind`` ``"conv"`` or ``"merge"``; None where the
    merge kernel would leave the device mostly idle (too few positions: its programs split the map,
    not the channels) and the unfused ops are faster.

    From the H200 sweeps in ``benchmarks/results/ss2d_io_tile_sweep_cuda_2026-12-03.json``: the conv at 8 x 16
    positions x 32 channels (8 x 8 for maps narrower than 16). The merge at 64-channel chunks of 8 x 8
    positions where that gives 264 programs (two per multiprocessor; 128 for up to 256 channels),
    else 4 x 4 positions (128-channel chunks from 384 channels), and unfused below 32 programs of
    those (batch-1 inference of the deepest maps, e.g. 1536 channels at 8 x 8).
    """
    forced = TILE_OVERRIDE.get(kind)
    if forced is not None:
        return forced
    if kind == "conv":
        return 8, (16 if width >= 16 else 8), 32, 4
    p8 = batch * triton.cdiv(height, 8) * triton.cdiv(width, 8)
    p4 = batch * triton.cdiv(height, 4) * triton.cdiv(width, 4)
    if p8 >= 264 or (dim <= 256 and p8 >= 128):
        return 8, 8, min(64, triton.next_power_of_2(max(dim, 1))), 4
    if p4 >= 32:
        return (4, 4, 128, 8) if dim >= 384 else (4, 4, min(64, triton.next_power_of_2(max(dim, 1))), 4)
    return None


def merge_fused_applies(batch: int, height: int, width: int, dim: int) -> bool:
    """Whether :func:`merge_norm_triton` is expected to beat the unfused ops at this size (see :func:`pick_tiles`)."""
    return pick_tiles("merge", batch, height, width, dim) is not None


def _twin():
    return interpreted_twin(_TWIN_NAME, __file__, __package__)


def conv_cross_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depth-wise ``K x K`` conv (zero padding ``(K - 1) // 2``, stride 1) + bias + SiLU of a
    channels-last map ``x`` ``(B, H, W, D)`` (channels contiguous; the other strides free), written as
    the two scan sequences ``(B, 2, D, H*W)`` in ``x``'s dtype. ``weight`` ``(D, 1, K, K)``."""
    if x.device.type != "cuda" and not INTERPRETED:
        return _twin().conv_cross_triton(x, weight, bias)
    b, h, w, d = x.shape
    ks = weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b, 2, d, h * w, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    bh, bw, bd, nw = pick_tiles("conv", b, h, w, d)
    grid = (triton.cdiv(h, bh) * triton.cdiv(w, bw), triton.cdiv(d, bd), b)
    _conv_cross_kernel[grid](
        x, weight.reshape(d, ks * ks).contiguous(), bias if bias is not None else x, out,
        h, w, d, h * w, x.stride(0), x.stride(1), x.stride(2),
        KS=ks, HAS_BIAS=bias is not None, BH=bh, BW=bw, BD=bd, num_warps=nw,
    )
    return out


def merge_norm_triton(
    ys: torch.Tensor,
    height: int,
    width: int,
    z: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    normalize: bool,
    z_silu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The four scans' outputs ``ys`` ``(B, 4, D, H*W)`` merged, layer-normalised over ``D`` (when
    ``normalize``; ``weight`` / ``bias`` optional) and gated by ``z`` ``(B, H, W, D)`` (SiLU first when
    ``z_silu``), as a contiguous ``(B, H, W, D)`` tensor of ``out_dtype``."""
    if ys.device.type != "cuda" and not INTERPRETED:
        return _twin().merge_norm_triton(ys, height, width, z, weight, bias, eps, normalize, z_silu, out_dtype)
    b, _, d, length = ys.shape
    ys = ys.contiguous()
    out = torch.empty(b, height, width, d, device=ys.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    bh, bw, bd, nw = pick_tiles("merge", b, height, width, d) or (4, 4, 64, 4)
    grid = (triton.cdiv(height, bh) * triton.cdiv(width, bw), b)
    zs = z.stride()[:3] if z is not None else (0, 0, 0)
    _merge_norm_kernel[grid](
        ys, z if z is not None else ys, weight if weight is not None else ys, bias if bias is not None else ys,
        out, height, width, d, length, float(eps), *zs,
        NORM=normalize, HAS_W=normalize and weight is not None, HAS_B=normalize and bias is not None,
        HAS_Z=z is not None, Z_SILU=z_silu, BH=bh, BW=bw, BD=bd, num_warps=nw,
    )
    return out


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dimension (up to 4096 channels), float32 inside, the result stored in
    ``out_dtype``: under autocast, what the ``nn.Linear`` after a float32 norm reads, in one kernel."""
    if x.device.type != "cuda" and not INTERPRETED:
        return _twin().layer_norm_triton(x, weight, bias, eps, out_dtype)
    d = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rows = x.numel() // max(d, 1)
    if out.numel() == 0:
        return out
    bd = triton.next_power_of_2(d)
    bm = max(1, min(64, 4096 // bd))
    _layer_norm_kernel[(triton.cdiv(rows, bm),)](
        x, weight if weight is not None else x, bias if bias is not None else x, out, rows, d, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, BM=bm, BD=bd, num_warps=4 if bd * bm <= 4096 else 8,
    )
    return out
