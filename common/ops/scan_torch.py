"""Fast pure-PyTorch selective scan (the CPU default, and the fallback on any device).

The S6 recurrence ``h[t] = a[t] * h[t-1] + b[t]`` (``a = exp(delta * A)``, ``b = delta * B * u``)
is linear in ``h``, so it can be evaluated in two levels instead of ``L`` sequential steps:

1. split the sequence into ``nc`` chunks of ``T`` steps and run the recurrence inside every chunk
   at once (``T`` vectorised steps over all chunks, batch, channels and states);
2. carry the state across chunk boundaries (``nc`` small steps): the state entering chunk ``c`` is
   ``end[c-1] + prod(a over chunk c-1) * carry[c-1]``;
3. add ``cumprod(a within chunk) * carry`` to every step (``T`` vectorised steps).

That is about ``3 * sqrt(L)`` tensor operations instead of ``L``, every step touches a large
contiguous slab (good vectorisation and threading), and only products of ``a`` in ``(0, 1]`` are
formed, so it is as numerically safe as the sequential loop (no ``exp(-cumsum)`` tricks that
overflow for large ``delta``), with memory ``O(batch * dim * L * N)``: no ``L x L`` matrices.

Backward is written by hand (``torch.autograd.Function``), like mamba-ssm's kernel: the forward
saves only its inputs, and the backward recomputes the states, runs the adjoint recurrence
``g[t] = C[t] * dy[t] + a[t+1] * g[t+1]`` with the same chunked scan in reverse, and forms every
input gradient with a few contractions.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .scan_ref import check_scan_inputs

__all__ = ["selective_scan_torch", "chunked_linear_scan_", "compute_dtype"]

# Overrides for benchmarking (``0`` or unset: automatic): chunk length, steps per block.
_CHUNK_ENV = "MAMBA_BUNDLES_SCAN_CHUNK"
_BLOCK_ENV = "MAMBA_BUNDLES_SCAN_BLOCK"
# Target size (elements) of one block's working tensor: large enough to amortise the per-op
# overhead, small enough to be reused from cache instead of faulting in fresh pages.
_BLOCK_ELEMENTS = 1 << 21


def _chunk_len(length: int) -> int:
    forced = int(os.environ.get(_CHUNK_ENV, "0") or 0)
    if forced > 0:
        return forced
    # balances the 2*T in-chunk steps against the nc = L/T carry steps
    return max(1, int(math.ceil(math.sqrt(length / 2.0))))


def chunked_linear_scan_(
    a: torch.Tensor, h: torch.Tensor, chunk: int, h0: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """In place, turn ``h`` (holding ``b``) into the states of ``h[t] = a[t] * h[t-1] + b[t]``.

    ``a`` and ``h`` are contiguous ``(Lp, ...)`` float tensors with ``Lp % chunk == 0``; ``h0`` (shape
    ``h.shape[1:]``) is the state before the first step (zero when ``None``). With ``reverse`` the
    recurrence runs from the end: ``h[t] = a[t] * h[t+1] + b[t]``. Returns the final state (a view).
    """
    lp = h.shape[0]
    if lp % chunk:
        raise ValueError(f"chunked_linear_scan_: length {lp} is not a multiple of chunk {chunk}")
    nc, t_len = lp // chunk, chunk
    av = a.reshape(nc, t_len, -1)
    hv = h.view(nc, t_len, -1)
    # 1. recurrence inside each chunk, all chunks at once
    if not reverse:
        for t in range(1, t_len):
            hv[:, t].addcmul_(av[:, t], hv[:, t - 1])
    else:
        for t in range(t_len - 2, -1, -1):
            hv[:, t].addcmul_(av[:, t], hv[:, t + 1])
    state_shape = h.shape[1:]
    if nc == 1 and h0 is None:
        return (hv[0, -1] if not reverse else hv[0, 0]).view(state_shape)
    # 2. carry the state across chunks
    prod = av.prod(dim=1)  # (nc, M): decay over a whole chunk
    carry = torch.empty_like(prod)
    order = range(nc) if not reverse else range(nc - 1, -1, -1)
    for i, c in enumerate(order):
        if i == 0:
            if h0 is None:
                carry[c].zero_()
            else:
                carry[c].copy_(h0.reshape(-1))
            continue
        p = c - 1 if not reverse else c + 1
        end = hv[p, -1] if not reverse else hv[p, 0]
        torch.addcmul(end, prod[p], carry[p], out=carry[c])
    # 3. add the carried state, decayed step by step, to every chunk
    if h0 is None:  # the first chunk starts from zero: nothing to add there
        sl = slice(1, None) if not reverse else slice(0, nc - 1)
        av, hv_fix, carry = av[sl], hv[sl], carry[sl]
    else:
        hv_fix = hv
    steps = range(t_len) if not reverse else range(t_len - 1, -1, -1)
    for t in steps:
        carry.mul_(av[:, t])
        hv_fix[:, t].add_(carry)
    return (hv[-1, -1] if not reverse else hv[0, 0]).view(state_shape)


def compute_dtype(u: torch.Tensor) -> torch.dtype:
    """State math runs in float32 (float64 when the inputs are float64, for gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def _block_rows(length: int, width: int) -> tuple[int, int]:
    """Steps per block (a multiple of the chunk length) and the chunk length, for ``width`` = batch*dim*N."""
    forced = int(os.environ.get(_BLOCK_ENV, "0") or 0)
    rows = forced if forced > 0 else max(16, _BLOCK_ELEMENTS // max(width, 1))
    rows = min(rows, length)
    chunk = _chunk_len(rows)
    return chunk * -(-rows // chunk), chunk


def _bc_view(x: torch.Tensor, batch: int, dim: int, dtype: torch.dtype):
    """B or C (any accepted shape) as ``(L|1, batch|1, G, 1, N)`` in ``dtype`` plus its group count G."""
    x = x.to(dtype)
    if x.dim() == 2:  # (dim, N): constant over time and batch, one "group" per channel
        return x.view(1, 1, dim, 1, x.shape[1]), dim
    # time-major and contiguous: the per-block products and contractions read it row by row
    if x.dim() == 3:  # (batch, N, L)
        return x.permute(2, 0, 1).contiguous().unsqueeze(2).unsqueeze(3), 1
    return x.permute(3, 0, 1, 2).contiguous().unsqueeze(3), x.shape[1]  # (batch, G, N, L)


def _grad_bc_buffer(x5: torch.Tensor) -> torch.Tensor:
    """Zeroed accumulator for the gradient of a ``(L|1, batch|1, G, 1, N)`` B or C view."""
    return torch.zeros(x5.shape, dtype=x5.dtype, device=x5.device)


def _reduce_bc_grad(g5: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bring a ``(L|1, batch|1, G, 1, N)`` gradient back to the shape and dtype of ``like``."""
    if like.dim() == 2:
        out = g5[0, 0, :, 0]  # (dim, N)
    elif like.dim() == 3:
        out = g5[:, :, 0, 0].permute(1, 2, 0)  # (batch, N, L)
    else:
        out = g5[:, :, :, 0].permute(1, 2, 3, 0)  # (batch, G, N, L)
    return out.to(like.dtype).contiguous()


def _time_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, dim, L) -> contiguous (L, batch, dim) in ``dtype``."""
    return x.to(dtype).permute(2, 0, 1).contiguous()


class _Scan:
    """Time-major float views of the inputs and the blocked forward / backward passes.

    The sequence is processed in blocks of ``lb`` steps whose working tensors (``lb x batch x dim
    x N``) are allocated once and reused, so memory stays bounded and warm in cache; inside a
    block the chunked scan runs with the state carried in from the previous block.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.cdt = cdt = compute_dtype(u)
        self.device = u.device
        self.uT = _time_major(u, cdt)
        dt_raw = _time_major(delta, cdt)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(cdt)
        self.dt_rawT = dt_raw
        self.dtT = F.softplus(dt_raw) if delta_softplus else dt_raw
        self.dtuT = self.dtT * self.uT
        self.A = A.to(cdt)
        self.D = D.to(cdt) if D is not None else None
        self.zT = _time_major(z, cdt) if z is not None else None
        self.Bk, self.gb = _bc_view(B, self.batch, self.dim, cdt)
        self.Ck, self.gc = _bc_view(C, self.batch, self.dim, cdt)
        self.b_fixed, self.c_fixed = B.dim() == 2, C.dim() == 2  # (dim, N): the same at every step
        self.lb, self.chunk = _block_rows(self.length, self.batch * self.dim * self.n)
        self.blocks = [(s, min(self.length, s + self.lb)) for s in range(0, self.length, self.lb)]

    def _work(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.batch, self.dim, self.n, dtype=self.cdt, device=self.device)

    @staticmethod
    def _rows(x5: torch.Tensor, fixed: bool, s: int, e: int) -> torch.Tensor:
        return x5 if fixed else x5[s:e]

    def _fill_decay(self, a: torch.Tensor, s: int, e: int) -> None:
        """a[:e-s] = exp(dt * A) for steps s..e; the remaining rows = 1 (padding steps keep the state)."""
        n = e - s
        torch.mul(self.dtT[s:e].unsqueeze(-1), self.A, out=a[:n])
        a[:n].exp_()
        a[n:].fill_(1.0)

    def _fill_input(self, h: torch.Tensor, s: int, e: int) -> None:
        """h[:e-s] = dt * u * B for steps s..e; the remaining rows = 0."""
        n, g = e - s, self.gb
        torch.mul(
            self.dtuT[s:e].view(n, self.batch, g, self.dim // g, 1),
            self._rows(self.Bk, self.b_fixed, s, e),
            out=h[:n].view(n, self.batch, g, self.dim // g, self.n),
        )
        h[n:].zero_()

    def _contract_c(self, h: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """sum_n C[t, n] h[t, b, d, n] for the rows s..e of h (shape (e-s, batch, dim, N))."""
        n, g = e - s, self.gc
        c = self._rows(self.Ck, self.c_fixed, s, e)
        y = torch.matmul(h.view(n, self.batch, g, self.dim // g, self.n), c.transpose(-1, -2))
        return y.view(n, self.batch, self.dim)

    def _block_states(self, a: torch.Tensor, wh: torch.Tensor, s: int, e: int, h0: torch.Tensor) -> None:
        """wh[0] = h0 (the state before step s), wh[1:] = states of steps s..e (padded)."""
        wh[0].copy_(h0)
        self._fill_input(wh[1:], s, e)
        chunked_linear_scan_(a[: self.lb], wh[1:], self.chunk, h0=h0)

    def forward(self):
        """Returns y (L, batch, dim) before D and z, and the states before each block (+ the last state)."""
        lb = self.lb
        a, wh = self._work(lb + 1), self._work(lb + 1)
        y = torch.empty(self.length, self.batch, self.dim, dtype=self.cdt, device=self.device)
        carries = torch.zeros(len(self.blocks) + 1, self.batch, self.dim, self.n, dtype=self.cdt, device=self.device)
        for k, (s, e) in enumerate(self.blocks):
            self._fill_decay(a, s, e)
            self._block_states(a, wh, s, e, carries[k])
            carries[k + 1].copy_(wh[e - s])
            y[s:e] = self._contract_c(wh[1 : e - s + 1], s, e)
        return y, carries

    def backward(self, doutT: torch.Tensor, carries: torch.Tensor, dlast: torch.Tensor | None):
        L, batch, dim, N, lb = self.length, self.batch, self.dim, self.n, self.lb
        cdt, dev = self.cdt, self.device
        a, wh, g = self._work(lb + 1), self._work(lb + 1), self._work(lb)
        g_carry = torch.zeros(batch, dim, N, dtype=cdt, device=dev)
        if dlast is not None:
            g_carry.copy_(dlast)
        duT = torch.empty(L, batch, dim, dtype=cdt, device=dev)
        ddtT = torch.empty_like(duT)
        dzT = torch.empty_like(duT) if self.zT is not None else None
        dD = torch.zeros(dim, dtype=cdt, device=dev) if self.D is not None else None
        dA = torch.zeros(dim, N, dtype=cdt, device=dev)
        dB5, dC5 = _grad_bc_buffer(self.Bk), _grad_bc_buffer(self.Ck)
        gb, gc = self.gb, self.gc
        for k in range(len(self.blocks) - 1, -1, -1):
            s, e = self.blocks[k]
            n = e - s
            self._fill_decay(a, s, e)
            if n == lb and e < L:  # a[t+1] for the block's last step is the next block's first decay
                torch.exp(self.dtT[e].unsqueeze(-1) * self.A, out=a[lb])
            else:
                a[lb].fill_(1.0)
            self._block_states(a, wh, s, e, carries[k])
            h, h_prev = wh[1 : n + 1], wh[:n]
            # output side: out = (y + D u) * silu(z)
            dy = doutT[s:e]
            if self.zT is not None or self.D is not None:
                y = self._contract_c(h, s, e)
                if self.D is not None:
                    y = y + self.uT[s:e] * self.D
                if self.zT is not None:
                    zb = self.zT[s:e]
                    sig = torch.sigmoid(zb)
                    dzT[s:e] = dy * y * sig * (1 + zb * (1 - sig))
                    dy = dy * zb * sig
                if self.D is not None:
                    dD += (dy * self.uT[s:e]).sum(dim=(0, 1))
                    duT[s:e] = dy * self.D
                else:
                    duT[s:e].zero_()
            else:
                duT[s:e].zero_()
            # dC = sum over a group's channels of dy * h
            dyg = dy.reshape(n, batch, gc, dim // gc, 1)
            dCb = torch.matmul(dyg.transpose(-1, -2), h.view(n, batch, gc, dim // gc, N))
            if self.c_fixed:
                dC5 += dCb.sum(dim=(0, 1), keepdim=True)
            else:
                dC5[s:e] = dCb
            # adjoint states: g[t] = C[t] dy[t] + a[t+1] g[t+1], entering from the next block
            torch.mul(dyg, self._rows(self.Ck, self.c_fixed, s, e), out=g[:n].view(n, batch, gc, dim // gc, N))
            g[n:].zero_()
            chunked_linear_scan_(a[1 : lb + 1], g, self.chunk, h0=g_carry, reverse=True)
            g_carry.copy_(g[0])
            gn = g[:n]
            # b = dt * u * B
            gv = gn.view(n, batch, gb, dim // gb, N)
            dBb = torch.matmul(self.dtuT[s:e].view(n, batch, gb, 1, dim // gb), gv)
            if self.b_fixed:
                dB5 += dBb.sum(dim=(0, 1), keepdim=True)
            else:
                dB5[s:e] = dBb
            sB = torch.matmul(gv, self._rows(self.Bk, self.b_fixed, s, e).transpose(-1, -2)).view(n, batch, dim)
            duT[s:e] += sB * self.dtT[s:e]
            ddtT[s:e] = sB * self.uT[s:e]
            # a = exp(dt * A): d(loss)/d(dt * A) = g * h[t-1] * a
            x = gn.mul_(h_prev).mul_(a[:n])
            ddtT[s:e] += torch.matmul(x.unsqueeze(-2), self.A.unsqueeze(-1)).view(n, batch, dim)
            dA += x.mul_(self.dtT[s:e].unsqueeze(-1)).sum(dim=(0, 1))
        return duT, ddtT, dzT, dA, dB5, dC5, dD


class SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        scan = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        y, carries = scan.forward()
        if D is not None:
            y += scan.uT * scan.D
        if z is not None:
            y *= F.silu(scan.zT)
        out = y.permute(1, 2, 0).to(u.dtype)
        last = carries[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, carries)
        ctx.delta_softplus = delta_softplus
        if not return_last_state:
            ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, carries = ctx.saved_tensors
        scan = _Scan(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        doutT = _time_major(dout, scan.cdt)
        duT, ddtT, dzT, dA, dB5, dC5, dD = scan.backward(doutT, carries, dlast)
        if ctx.delta_softplus:
            ddtT *= torch.sigmoid(scan.dt_rawT)
        back = lambda t, like: t.permute(1, 2, 0).to(like.dtype)  # noqa: E731
        return (
            back(duT, u),
            back(ddtT, delta),
            dA.to(A.dtype),
            _reduce_bc_grad(dB5, B),
            _reduce_bc_grad(dC5, C),
            dD.to(D.dtype) if D is not None else None,
            back(dzT, z) if z is not None else None,
            ddtT.sum(dim=(0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
        )


def selective_scan_torch(
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
    """Chunked pure-PyTorch selective scan; same signature and semantics as ``selective_scan_ref``."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.shape[-1] == 0:
        from .scan_ref import selective_scan_ref

        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
