"""Plain sequential reference of the selective scan (Mamba's S6 recurrence).

This is the readable definition every fast backend is tested against. It loops over the
sequence one step at a time and keeps all state math in float32, exactly as mamba-ssm's
``selective_scan_ref`` specifies the operation (same arguments, shapes and dtypes), so it is
slow: use it in tests, never in a network.

The recurrence, per batch ``b``, channel ``d`` and state index ``n``::

    delta' = softplus(delta + delta_bias)              (each part optional)
    h[t]   = exp(delta'[t] * A[d, n]) * h[t-1] + delta'[t] * B[n, t] * u[t]
    y[t]   = sum_n C[n, t] * h[t, n]  (+ D[d] * u[t])  (* silu(z[t]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "check_scan_inputs", "scan_delta", "scan_output"]


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise ``ValueError`` with a plain message when the scan inputs do not fit together.

    Shapes follow mamba-ssm's ``selective_scan_fn``: ``u`` and ``delta`` ``(batch, dim, L)``;
    ``A`` ``(dim, N)`` real; ``B`` and ``C`` each ``(dim, N)``, ``(batch, N, L)`` or
    ``(batch, groups, N, L)`` with ``dim`` divisible by ``groups``; ``D`` and ``delta_bias``
    ``(dim,)``; ``z`` like ``u``.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (the networks here use real A)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            ok = tuple(t.shape) == (dim, n_state)
        elif t.dim() == 3:
            ok = tuple(t.shape) == (batch, n_state, length)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (n_state, length) and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (dim, N), (batch, N, L) or (batch, groups, N, L) with "
                f"dim % groups == 0 for u {tuple(u.shape)} and N={n_state}; got {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")


def scan_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """The time steps the recurrence uses: ``delta`` in ``dtype``, plus ``delta_bias`` per channel, softplus."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def scan_output(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """The scan's output from the states' contraction ``y`` (in ``u``'s compute dtype): the ``D * u`` skip,
    the ``silu(z)`` gate, then ``dtype``."""
    if D is not None:
        y = y + u * D.to(u.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return y.to(dtype)


def _per_channel(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """B or C in ``dtype``, broadcastable to (batch, dim, N, L) (or (dim, N) when fixed)."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t  # (dim, N): the same for every step
    if t.dim() == 3:
        return t.unsqueeze(1)  # (batch, 1, N, L)
    return t.repeat_interleave(dim // t.shape[1], dim=1)  # (batch, dim, N, L)


def selective_scan_ref(
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
    """Sequential selective scan; same signature and semantics as mamba-ssm's ``selective_scan_fn``.

    Returns ``out`` ``(batch, dim, L)`` in ``u``'s dtype, and ``(out, last_state)`` with
    ``last_state`` ``(batch, dim, N)`` float32 (float64 for float64 inputs) when ``return_last_state``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    batch, dim, length = u.shape
    cdt = torch.promote_types(u.dtype, torch.float32)  # float32 state math (float64 stays float64)
    u_f = u.to(cdt)
    dt = scan_delta(delta, delta_bias, delta_softplus, cdt)
    A_f = A.to(cdt)
    Bc, Cc = _per_channel(B, dim, cdt), _per_channel(C, dim, cdt)
    h = u_f.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        b_t = Bc if Bc.dim() == 2 else Bc[..., t]
        c_t = Cc if Cc.dim() == 2 else Cc[..., t]
        h = torch.exp(dt_t * A_f) * h + dt_t * b_t * u_f[:, :, t, None]
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_f.new_zeros(batch, dim, 0)
    out = scan_output(y, u_f, D, z, dtype_in)
    return (out, h) if return_last_state else out
