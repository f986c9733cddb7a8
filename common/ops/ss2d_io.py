"""What surrounds SS2D's bidirectional scan, fused for inference.

SS2D's bidirectional path (:func:`common.ops.cross_scan.bidirectional_selective_scan`) scans two
sequences of the ``(B, D, H, W)`` map, its rows view (position ``h W + w``) and a column-major copy
(``w H + h``), each forward and backward, giving four outputs ``(B, 4, D, H*W)`` (slots rows forward,
rows backward, columns forward, columns backward) at their sequences' positions. Around it, with
the channels-last ``x`` and ``z`` halves of ``in_proj``'s output:

- :func:`conv_cross`: ``SiLU(dwconv(x) + bias)`` as the two sequences ``(B, 2, D, H*W)``;
- :func:`merge_norm`: the four outputs summed at the map's positions, ``LayerNorm`` over the
  channels, times ``SiLU(z)``, channels-last ``(B, H, W, D)``.

- :func:`layer_norm_cast`: a LayerNorm (float32 inside) stored in the dtype the ``nn.Linear`` after it
  computes in under autocast: the VSS block's norm before SS2D's ``in_proj``.

Each has a PyTorch reference (``*_ref``: the unfused composition SS2D runs when training, same
arguments, differentiable). Where no gradient is needed and the tensors are on CUDA (or Triton's
interpreter is on), the fused Triton kernels of :mod:`common.ops.ss2d_io_triton` run instead: one
kernel each, every value read once and written once (H200 numbers in benchmarks/README.md).
Everything is float32 inside; the fused results differ from the references by the rounding of
the intermediates the references store in the input dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["conv_cross", "conv_cross_ref", "merge_norm", "merge_norm_ref", "layer_norm_cast", "layer_norm_cast_ref",
           "fused_io_available"]

_AVAILABLE: dict = {}


def fused_io_available(device: torch.device | str) -> bool:
    """Whether the fused kernels run for tensors on ``device``: CUDA with Triton importable, or any
    device under ``TRITON_INTERPRET=1`` (tests)."""
    device = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    key = (device.type, interpret)
    ok = _AVAILABLE.get(key)
    if ok is None:
        ok = device.type == "cuda" or interpret
        if ok:
            try:
                import triton  # noqa: F401
            except ImportError:
                ok = False
        _AVAILABLE[key] = ok
    return ok


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_conv(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"conv_cross: x must be channels-last (B, H, W, D), got {tuple(x.shape)}")
    d = x.shape[-1]
    ks = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.dim() != 4 or tuple(weight.shape) != (d, 1, ks, ks) or ks % 2 == 0:
        raise ValueError(f"conv_cross: weight must be a depth-wise ({d}, 1, K, K) kernel with odd K, "
                         f"got {tuple(weight.shape)}")


def conv_cross_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused composition: channels-first copy, depth-wise conv (zero padding ``(K - 1) // 2``),
    SiLU, and the rows view stacked with the column-major copy. ``x`` ``(B, H, W, D)`` ->
    ``(B, 2, D, H*W)``."""
    _check_conv(x, weight)
    ks = weight.shape[-1]
    y = F.silu(F.conv2d(x.permute(0, 3, 1, 2).contiguous(), weight, bias, padding=(ks - 1) // 2,
                        groups=x.shape[-1]))
    return torch.stack([y.flatten(2), y.transpose(2, 3).flatten(2)], dim=1)


def conv_cross(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``SiLU(depth-wise conv(x) + bias)`` of the channels-last map ``x`` ``(B, H, W, D)`` as SS2D's two
    scan sequences ``(B, 2, D, H*W)``: the rows view and the column-major copy. Fused (one Triton
    kernel) where no gradient is needed and :func:`fused_io_available`; else :func:`conv_cross_ref`."""
    _check_conv(x, weight)
    if _needs_grad(x, weight, bias) or not fused_io_available(x.device):
        return conv_cross_ref(x, weight, bias)
    from .ss2d_io_triton import conv_cross_triton

    if not torch.is_autocast_enabled(x.device.type):
        return conv_cross_triton(x, weight, bias)
    # as autocast's convolution would: input, weight and bias in the autocast dtype (float32 sums).
    # The CUDA-graph wrapper passes weights cast once already; eager and graphed give the same numbers.
    dtype = torch.get_autocast_dtype(x.device.type)
    return conv_cross_triton(x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)


def _check_merge(ys: torch.Tensor, height: int, width: int, z: torch.Tensor | None) -> None:
    if ys.dim() != 4 or ys.shape[1] != 4 or ys.shape[3] != height * width:
        raise ValueError(f"merge_norm: ys must be (B, 4, D, {height}*{width}) (rows forward, rows backward, "
                         f"columns forward, columns backward), got {tuple(ys.shape)}")
    b, _, d, _ = ys.shape
    if z is not None and tuple(z.shape) != (b, height, width, d):
        raise ValueError(f"merge_norm: z must be channels-last {(b, height, width, d)}, got {tuple(z.shape)}")


def merge_norm_ref(
    ys: torch.Tensor,
    height: int,
    width: int,
    z: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    normalize: bool = True,
    z_silu: bool = True,
) -> torch.Tensor:
    """The unfused composition: the merge (two sums and a transposed add), a channels-last view,
    ``F.layer_norm`` (float32 out under autocast, as ``nn.LayerNorm``) and the product with
    ``SiLU(z)``. ``ys`` ``(B, 4, D, H*W)`` -> ``(B, H, W, D)``."""
    _check_merge(ys, height, width, z)
    b, _, d, length = ys.shape
    y = ys.view(b, 2, 2, d, length).sum(2)
    y = y[:, 0].view(b, d, height, width) + y[:, 1].view(b, d, width, height).transpose(2, 3)
    y = y.permute(0, 2, 3, 1)
    if normalize:
        y = F.layer_norm(y, (d,), weight, bias, eps)
    if z is not None:
        y = y * (F.silu(z) if z_silu else z)
    return y


def merge_norm(
    ys: torch.Tensor,
    height: int,
    width: int,
    z: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    normalize: bool = True,
    z_silu: bool = True,
) -> torch.Tensor:
    """SS2D's output before ``out_proj``: the four scans' outputs merged at the map's positions,
    layer-normalised over the channels (``normalize``; ``weight`` / ``bias`` optional) and gated by
    ``z`` (SiLU first when ``z_silu``), channels-last ``(B, H, W, D)``.

    Args:
        ys: ``(B, 4, D, H*W)``: rows forward, rows backward (both at row-major positions), columns
            forward, columns backward (at column-major positions ``w H + h``).
        height, width: the map's size.
        z: ``(B, H, W, D)`` gate (channels contiguous, other strides free) or None.

    Fused (one Triton kernel, float32 inside, the result in ``z``'s dtype: what ``out_proj`` reads
    under autocast) where no gradient is needed, :func:`fused_io_available`, and the map has enough
    positions to fill the device (the kernel's programs split the positions; batch-1 inference of
    the deepest, smallest maps runs the unfused ops, which are faster there); else :func:`merge_norm_ref`.
    """
    _check_merge(ys, height, width, z)
    if _needs_grad(ys, z, weight, bias) or not fused_io_available(ys.device):
        return merge_norm_ref(ys, height, width, z, weight, bias, eps, normalize, z_silu)
    from .ss2d_io_triton import merge_fused_applies, merge_norm_triton

    if not merge_fused_applies(ys.shape[0], height, width, ys.shape[2]):
        return merge_norm_ref(ys, height, width, z, weight, bias, eps, normalize, z_silu)

    out_dtype = z.dtype if z is not None else ys.dtype
    return merge_norm_triton(ys, height, width, z, weight, bias, eps, normalize, z_silu, out_dtype)


def layer_norm_cast_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        dtype: torch.dtype) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension in float32, then cast to ``dtype``: under autocast, a
    float32 norm and the cast the ``nn.Linear`` after it makes."""
    with torch.autocast(x.device.type, enabled=False):
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(dtype)


def layer_norm_cast(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``, computed in float32, returned in ``dtype``.

    Under autocast an ``nn.LayerNorm`` runs in float32 and the ``nn.Linear`` after it casts its input
    to the autocast dtype; this gives that input directly, in one kernel where no gradient is needed
    and :func:`fused_io_available` (else :func:`layer_norm_cast_ref`, the norm and the cast).
    """
    if _needs_grad(x, weight, bias) or not fused_io_available(x.device) or x.shape[-1] > 4096:
        return layer_norm_cast_ref(x, weight, bias, eps, dtype)
    from .ss2d_io_triton import layer_norm_triton

    return layer_norm_triton(x, weight, bias, eps, dtype)
