"""Selective scan in plain out-of-place tensor operations, few of them: the backend for export.

TorchScript and ONNX export trace the network. A trace records a ``torch.autograd.Function`` (every
fast backend) as one opaque Python call that neither format can hold, so export needs a scan
written in standard operators. :func:`common.ops.selective_scan_ref` is one, but it loops over the
sequence: its trace unrolls ``L`` steps (12544 in MSSMamba's 1/2-scale stage at 224 px), which
makes exporting slow and the exported model slower. This scan's trace holds ``O(T + log L)``
operations per segment of the sequence.

The S6 recurrence ``h[t] = a[t] * h[t-1] + b[t]`` (``a = exp(delta * A)``, ``b = delta * B * u``)
is linear in ``h``. Per segment of at most ``S`` steps (a Python loop whose length depends only on
``L``, so the trace keeps the batch size free), split into chunks of ``T = 16`` steps:

1. step ``t`` of every chunk at once: ``T`` vectorised steps over all chunks give each chunk's
   states from a zero start and the decay ``a[0] * ... * a[t]`` so far. The steps are laid out
   outermost (``(batch, T, chunks, ...)``, rearranged on the small per-step inputs before ``a`` and
   ``b`` are formed), so every step reads and writes contiguous memory;
2. the state entering each chunk (including the one carried in from the previous segment): a
   Hillis-Steele scan over the chunks' end states and whole-chunk decays, ``log2(S / T)`` levels
   on tensors ``T`` times smaller than the states;
3. every step adds ``decay-so-far * state-entering-the-chunk`` and contracts with ``C``.

Only products of ``a`` in ``(0, 1]`` are formed (no ``exp(-cumsum)``, which overflows for large
``delta``), so it is as safe numerically as the sequential loop, and it is differentiable by
autograd like any tensor code. It keeps a segment's states twice (``batch * dim * N * S`` floats
each, ``dim * N * S`` capped at 2**24): it is for export and checking, not for training. On this
project's 2-core CPU, one MSSMamba 1/2-scale scan at 224 px (dim 768, N 16, L 12544) takes 1.6 s
eager and 1.2 s in onnxruntime (``benchmarks/README.md``, "Export").

Same signature and semantics as :func:`common.ops.selective_scan_ref` (mamba-ssm's
``selective_scan_fn``); float32 state math (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .scan_ref import check_scan_inputs, scan_delta, scan_output

__all__ = ["selective_scan_export", "associative_linear_scan"]

_CHUNK = 16  # steps per chunk (onnxruntime, MSSMamba's 1/2-scale scan at 224 px: 8 -> 2.2 s, 16 -> 1.2 s, 32 -> 1.4 s)
_SEGMENT_ELEMENTS = 1 << 24  # dim * N * segment length: 64 MB of float32 states per batch item, kept twice


def _shift(x: torch.Tensor, k: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """``x`` moved ``k`` places along ``dim`` (>= 0) towards the end, the first ``k`` filled with ``value``."""
    pad = [0, 0] * (x.dim() - dim - 1) + [k, 0]
    return F.pad(x.narrow(dim, 0, x.shape[dim] - k), pad, value=value)


def associative_linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of ``h[t] = a[t] * h[t-1] + b[t]`` (``h[-1] = 0``) along ``dim``.

    Returns ``(prod, h)``: ``prod[t] = a[0] * ... * a[t]`` and the states. Hillis-Steele: ``ceil(log2
    L)`` levels of out-of-place shifted multiply-adds, no in-place writes (traces and exports cleanly).
    """
    dim = dim % b.dim()
    k = 1
    while k < b.shape[dim]:
        b = b + a * _shift(b, k, dim)
        a = a * _shift(a, k, dim, 1.0)
        k *= 2
    return a, b


def _groups(*ts: torch.Tensor) -> int:
    """The group count the states are laid out in: the lcm of the (batch, groups, N, L) tensors' groups."""
    g = 1
    for t in ts:
        if t.dim() == 4:
            g = math.lcm(g, t.shape[1])
    return g


def _bc(t: torch.Tensor, groups: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """B or C as ``(groups, dim // groups, N)`` when fixed, else ``(batch, groups or 1, N, L + pad)``."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t.reshape(groups, -1, t.shape[1])
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.shape[1] != groups:  # a coarser grouping than the other one: repeat each group's rows
        t = t.repeat_interleave(groups // t.shape[1], dim=1)
    return F.pad(t, (0, pad))


def _steps(x: torch.Tensor, start: int, stop: int, chunk: int, at: int) -> torch.Tensor:
    """``(batch, g, rows, L)`` -> ``(batch, chunk, chunks, g, rows)`` over ``[start, stop)`` (step in chunk
    outermost), with a new axis inserted at ``at``."""
    return x[..., start:stop].unflatten(-1, (-1, chunk)).permute(0, 4, 3, 1, 2).unsqueeze(at)


def _segment(dt, dtu, A, B, C, h0, chunk):
    """Outputs ``(batch, chunks, g, dim // g, chunk)`` and last state of one segment entering with state ``h0``.

    ``dt``, ``dtu``: ``(batch, chunk, chunks, g, dim // g, 1)``; ``A``: ``(g, dim // g, N)``; ``B``, ``C``:
    ``(batch, chunk, chunks, g, 1, N)`` or fixed ``(g, dim // g, N)``; ``h0``: ``(batch, g, dim // g, N)`` or None.
    """
    hs, ps = [], []
    h = p = None
    for t in range(chunk):  # 1. every chunk from a zero start
        a = torch.exp(dt[:, t] * A)  # (batch, chunks, g, dim // g, N)
        b = dtu[:, t] * (B if B.dim() == 3 else B[:, t])
        if h is None:  # (a sequence of one step: a * 0 keeps A in the graph, with the reference's zero gradient)
            h, p = (b, a) if chunk > 1 else (a * 0 + b, a)
        else:
            h, p = a * h + b, p * a
        hs.append(h)
        ps.append(p)
    carry = None if h0 is None else h0.unsqueeze(1)
    if hs[-1].shape[1] > 1:  # 2. the state entering each chunk
        decay, ends = associative_linear_scan(ps[-1], hs[-1], dim=1)
        entering = _shift(ends, 1, 1)
        if carry is not None:
            entering = entering + _shift(decay, 1, 1, 1.0) * carry
        carry = entering
    ys = []
    for t in range(chunk):  # 3. add the carried state, contract with C
        h = hs[t] if carry is None else hs[t] + ps[t] * carry
        ys.append((h * (C if C.dim() == 3 else C[:, t])).sum(-1))
    return torch.stack(ys, dim=-1), h[:, -1]


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan for tracing (TorchScript, ONNX); signature and semantics of ``selective_scan_ref``.

    Returns ``out`` ``(batch, dim, L)`` in ``u``'s dtype, and ``(out, last_state)`` with ``last_state``
    ``(batch, dim, N)`` in float32 (float64 for float64 inputs) when ``return_last_state``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    batch, dim, length = u.shape
    n_state = A.shape[1]
    cdt = torch.promote_types(u.dtype, torch.float32)
    groups = _groups(B, C)
    u_f = u.to(cdt)
    dt = scan_delta(delta, delta_bias, delta_softplus, cdt)
    # whole chunks: identity steps at the end (delta 0: a = 1, b = 0) leave the state as it is
    chunk = min(_CHUNK, max(1, length))
    pad = -length % chunk
    dt_g = F.pad(dt, (0, pad)).unflatten(1, (groups, -1))  # (batch, g, dim // g, L + pad)
    dtu_g = F.pad(dt * u_f, (0, pad)).unflatten(1, (groups, -1))
    A_g = A.to(cdt).reshape(groups, -1, n_state)
    B_g, C_g = _bc(B, groups, pad, cdt), _bc(C, groups, pad, cdt)
    seg = max(chunk, _SEGMENT_ELEMENTS // max(1, dim * n_state) // chunk * chunk)
    ys, h_last = [], None
    for start in range(0, length + pad, seg):
        stop = min(start + seg, length + pad)
        rows = [_steps(x, start, stop, chunk, -1) for x in (dt_g, dtu_g)]  # (..., g, dim // g, 1)
        b_c = [x if x.dim() == 3 else _steps(x, start, stop, chunk, -2) for x in (B_g, C_g)]  # (..., g, 1, N)
        y, h_last = _segment(*rows, A_g, *b_c, h_last, chunk)
        ys.append(y.permute(0, 2, 3, 1, 4).flatten(3))  # (batch, g, dim // g, segment)
    y = (torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]).flatten(1, 2)[..., :length] if ys else u_f[..., :0]
    out = scan_output(y, u_f, D, z, dtype_in)
    if not return_last_state:
        return out
    last = h_last.flatten(1, 2) if h_last is not None else u_f.new_zeros(batch, dim, n_state)
    return out, last
