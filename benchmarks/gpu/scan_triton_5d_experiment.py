"""EXPERIMENT, not used by ``common.ops``: a variant of ``common/ops/scan_triton.py`` with 5-D register tiles.

Kept for the next round of tuning (issue 6). Tiles are (time, n_hi, warp, n_lo, channel_lo): Triton's
default layout then puts the lanes on (n_lo, channel_lo) and the warps on ``warp``, so each thread
holds all ``BLOCK_L`` steps of its (channel, state) pairs and the time scan runs inside the thread
(no shuffles), unlike the shipped kernel whose default layout spreads the time axis over the lanes.
Measured on the H100 (``benchmarks/results/scan_triton_sweep_cuda_2026-11-23.json``,
``sweep_5d_experiment``), batch 16, d_inner 192, L 3136, N 16, fp32: forward 1.47 ms at
(BLOCK_L 16, 16 lanes on N, 1 warp) against 2.91 ms for the shipped kernel (mamba-ssm: 1.37 ms),
but forward + backward 12.6-19 ms (shipped: 11.7 ms): its backward is dominated by the cross-lane
channel reductions and atomics for dB / dC and by register spills; at N = 1 (1 channel per thread,
too few threads) it is 2.5x slower than the shipped kernel. Correct under the interpreter and on the
H100 at the shapes checked then; CPU use needs TRITON_INTERPRET=1 set before triton is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import triton
import triton.language as tl

from common.ops.scan_ref import check_scan_inputs

__all__ = ["selective_scan_triton", "SelectiveScanTriton", "pick_config", "CONFIG_OVERRIDE"]

# Were the kernels of this module object built for the interpreter (CPU tensors)?
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TWIN_NAME = "benchmarks.gpu._scan_triton_5d_interpreted"
_LOG2E = tl.constexpr(1.4426950408889634)

# Benchmarks may force the launch configuration: {"fwd": (BLOCK_L, lanes on N, num_warps), "bwd": (...)}.
CONFIG_OVERRIDE: dict[str, tuple[int, int, int]] = {}


@triton.jit
def _combine(a1, b1, a2, b2):
    # first-order linear recurrence x = a * x_prev + b: (a1, b1) then (a2, b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    e = tl.exp(x)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _sum_n(x):
    # the in-thread axis first, then across the lanes
    return tl.sum(tl.sum(x, 1, keep_dims=True), 3, keep_dims=True)


@triton.jit
def _sum_d(x):
    return tl.sum(tl.sum(x, 4, keep_dims=True), 2, keep_dims=True)


@triton.jit(do_not_specialize=["stride_t"])
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr,
    dim, L, n_state, n_chunks, stride_t,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_MODE: tl.constexpr, C_MODE: tl.constexpr, SAVE_STATES: tl.constexpr, FP64: tl.constexpr,
    BLOCK_L: tl.constexpr, BNR: tl.constexpr, LN: tl.constexpr, NW: tl.constexpr, BD8: tl.constexpr,
):
    # 5-D register tiles (time, n_hi, warp, n_lo, channel_lo): n = n_hi * LN + n_lo,
    # d = d0 + warp * BD8 + channel_lo. Triton's default layout puts the lanes on (n_lo, channel_lo)
    # and the warps on `warp`, so every thread holds all BLOCK_L steps of its (channel, n) pairs:
    # the time scan runs inside the thread, with no shuffles.
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * (NW * BD8)
    ol = tl.arange(0, BLOCK_L)[:, None, None, None, None]
    n = tl.arange(0, BNR)[None, :, None, None, None] * LN + tl.arange(0, LN)[None, None, None, :, None]
    d = d0 + tl.arange(0, NW)[None, None, :, None, None] * BD8 + tl.arange(0, BD8)[None, None, None, None, :]
    mask_d = d < dim
    mask_n = n < n_state
    mask_dn = mask_d & mask_n
    dn_off = d.to(tl.int64) * n_state + n

    A = tl.load(A_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    A2 = A * _LOG2E  # exp(dt * A) = exp2(dt * A2)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(CDT)
    # B / C modes: 0 = fixed (dim, N); 1 = time-varying, the block inside one group (a (L, N) tile);
    # 2 = time-varying, the block straddles groups (gathered per channel)
    if B_MODE == 0:
        Bf = tl.load(B_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    elif B_MODE == 1:
        b_base = B_ptr + pid_b * sb_batch + (d0 // dpg_b) * sb_group + n * sb_n
    else:
        b_base = B_ptr + pid_b * sb_batch + (d // dpg_b) * sb_group + n * sb_n
    if C_MODE == 0:
        Cf = tl.load(C_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    elif C_MODE == 1:
        c_base = C_ptr + pid_b * sc_batch + (d0 // dpg_c) * sc_group + n * sc_n
    else:
        c_base = C_ptr + pid_b * sc_batch + (d // dpg_c) * sc_group + n * sc_n

    row = (pid_b * dim + d).to(tl.int64) * L
    bdn = (pid_b * dim + d).to(tl.int64) * n_state + n
    h = tl.zeros((1, BNR, NW, LN, BD8), dtype=CDT)
    for c in range(0, n_chunks):
        t = c * BLOCK_L + ol
        mask_t = t < L
        m2 = mask_d & mask_t
        ptrs = row + t * stride_t
        u = tl.load(u_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        dt = tl.load(dt_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)
        if SAVE_STATES:
            tl.store(states_ptr + (pid_b * n_chunks + c) * dim * n_state + d * n_state + n, h, mask=mask_dn)
        a = tl.exp2(dt * A2)
        dtu = dt * u
        if B_MODE == 0:
            b = dtu * Bf
        else:
            b = dtu * tl.load(b_base + t * stride_t, mask=mask_n & mask_t & mask_d, other=0.0).to(CDT)
        b = tl.where(ol == 0, b + a * h, b)  # the state carried in enters at the first step
        _, hh = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
        if C_MODE == 0:
            y = _sum_n(hh * Cf)
        else:
            y = _sum_n(hh * tl.load(c_base + t * stride_t, mask=mask_n & mask_t & mask_d, other=0.0).to(CDT))
        h = tl.sum(tl.where(ol == BLOCK_L - 1, hh, 0.0), 0, keep_dims=True)
        if HAS_D:
            y = y + u * Dv
        if HAS_Z:
            zv = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(CDT)
            y = y * zv / (1.0 + tl.exp(-zv))
        tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + bdn, h, mask=mask_dn)


@triton.jit(do_not_specialize=["stride_t"])
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_state, n_chunks, stride_t,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_MODE: tl.constexpr, C_MODE: tl.constexpr, HAS_DLAST: tl.constexpr, FP64: tl.constexpr,
    B_ATOMIC: tl.constexpr, C_ATOMIC: tl.constexpr,
    BLOCK_L: tl.constexpr, BNR: tl.constexpr, LN: tl.constexpr, NW: tl.constexpr, BD8: tl.constexpr,
):
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * (NW * BD8)
    ol = tl.arange(0, BLOCK_L)[:, None, None, None, None]
    n = tl.arange(0, BNR)[None, :, None, None, None] * LN + tl.arange(0, LN)[None, None, None, :, None]
    d = d0 + tl.arange(0, NW)[None, None, :, None, None] * BD8 + tl.arange(0, BD8)[None, None, None, None, :]
    mask_d = d < dim
    mask_n = n < n_state
    mask_dn = mask_d & mask_n
    dn_off = d.to(tl.int64) * n_state + n
    bdn = (pid_b * dim + d).to(tl.int64) * n_state + n

    A = tl.load(A_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    A2 = A * _LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(CDT)
    if B_MODE == 0:
        Bf = tl.load(B_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    elif B_MODE == 1:
        b_off = pid_b * sb_batch + (d0 // dpg_b) * sb_group + n * sb_n
    else:
        b_off = pid_b * sb_batch + (d // dpg_b) * sb_group + n * sb_n
    if C_MODE == 0:
        Cf = tl.load(C_ptr + dn_off, mask=mask_dn, other=0.0).to(CDT)
    elif C_MODE == 1:
        c_off = pid_b * sc_batch + (d0 // dpg_c) * sc_group + n * sc_n
    else:
        c_off = pid_b * sc_batch + (d // dpg_c) * sc_group + n * sc_n

    row = (pid_b * dim + d).to(tl.int64) * L
    if HAS_DLAST:
        q_carry = tl.load(dlast_ptr + bdn, mask=mask_dn, other=0.0).to(CDT)
    else:
        q_carry = tl.zeros((1, BNR, NW, LN, BD8), dtype=CDT)
    dA_acc = tl.zeros((1, BNR, NW, LN, BD8), dtype=CDT)
    dBf_acc = tl.zeros((1, BNR, NW, LN, BD8), dtype=CDT)
    dCf_acc = tl.zeros((1, BNR, NW, LN, BD8), dtype=CDT)
    dD_acc = tl.zeros((1, 1, NW, 1, BD8), dtype=CDT)
    dbias_acc = tl.zeros((1, 1, NW, 1, BD8), dtype=CDT)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + ol
        mask_t = t < L
        m2 = mask_d & mask_t
        mnt = mask_n & mask_t & mask_d
        ptrs = row + t * stride_t
        u = tl.load(u_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        dt_raw = tl.load(dt_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        # the decay of the next step, a[t+1] (delta re-read one step ahead: the same cache lines)
        m2n = mask_d & (t + 1 < L)
        dt_next = tl.load(dt_ptr + ptrs + stride_t, mask=m2n, other=0.0).to(CDT)
        if HAS_BIAS:
            dt_raw = dt_raw + bias
            dt_next = dt_next + bias
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dt_next = _softplus(dt_next)
        else:
            dt = dt_raw
        dt = tl.where(m2, dt, 0.0)
        dt_next = tl.where(m2n, dt_next, 0.0)
        dout = tl.load(dout_ptr + ptrs, mask=m2, other=0.0).to(CDT)

        # recompute this chunk's states from the state entering it
        h0 = tl.load(states_ptr + (pid_b * n_chunks + c) * dim * n_state + d * n_state + n, mask=mask_dn, other=0.0)
        a = tl.exp2(dt * A2)
        dtu = dt * u
        if B_MODE == 0:
            Bv = Bf
        else:
            Bv = tl.load(B_ptr + b_off + t * stride_t, mask=mnt, other=0.0).to(CDT)
        if C_MODE == 0:
            Cv = Cf
        else:
            Cv = tl.load(C_ptr + c_off + t * stride_t, mask=mnt, other=0.0).to(CDT)
        b = dtu * Bv
        _, hh = tl.associative_scan((a, tl.where(ol == 0, b + a * h0, b)), axis=0, combine_fn=_combine)

        # output side: out = (y + D u) * silu(z)
        if HAS_Z:
            zv = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(CDT)
            y = _sum_n(hh * Cv)
            if HAS_D:
                y = y + u * Dv
            sig = 1.0 / (1.0 + tl.exp(-zv))
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + ptrs, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * zv * sig
        else:
            dy = dout
        if HAS_D:
            dD_acc += tl.sum(dy * u, 0, keep_dims=True)
            du = dy * Dv
        else:
            du = tl.zeros((BLOCK_L, 1, NW, 1, BD8), dtype=CDT)

        # dC = sum over the block's channels of dy * h
        dyh = dy * hh
        if C_MODE == 0:
            dCf_acc += tl.sum(dyh, 0, keep_dims=True)
        elif C_MODE == 1:
            dC_t = _sum_d(dyh)
            if C_ATOMIC:
                tl.atomic_add(dC_ptr + c_off + t * stride_t, dC_t, mask=mask_n & mask_t)
            else:
                tl.store(dC_ptr + c_off + t * stride_t, dC_t, mask=mask_n & mask_t)
        else:
            tl.atomic_add(dC_ptr + c_off + t * stride_t, dyh, mask=mnt)

        # adjoint states, reverse scan: q[t] = C[t] dy[t] + a[t+1] q[t+1]
        a_next = tl.exp2(dt_next * A2)
        rhs = dy * Cv
        rhs = tl.where(ol == BLOCK_L - 1, rhs + a_next * q_carry, rhs)
        _, q = tl.associative_scan((a_next, rhs), axis=0, combine_fn=_combine, reverse=True)
        q_carry = tl.sum(tl.where(ol == 0, q, 0.0), 0, keep_dims=True)

        # b = dt * u * B
        qdtu = q * dtu
        if B_MODE == 0:
            dBf_acc += tl.sum(qdtu, 0, keep_dims=True)
        elif B_MODE == 1:
            dB_t = _sum_d(qdtu)
            if B_ATOMIC:
                tl.atomic_add(dB_ptr + b_off + t * stride_t, dB_t, mask=mask_n & mask_t)
            else:
                tl.store(dB_ptr + b_off + t * stride_t, dB_t, mask=mask_n & mask_t)
        else:
            tl.atomic_add(dB_ptr + b_off + t * stride_t, qdtu, mask=mnt)
        # a = exp(dt * A): d loss / d(dt * A) = q[t] * a[t] * h[t-1] = q[t] * (h[t] - b[t])
        x = q * (hh - b)
        sB = _sum_n(q * Bv)
        ddt = sB * u + _sum_n(x * A)
        du = du + sB * dt
        dA_acc += tl.sum(x * dt, 0, keep_dims=True)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-dt_raw))
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, 0, keep_dims=True)
        tl.store(du_ptr + ptrs, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + ptrs, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)

    # per (batch, channel) partial sums; the wrapper sums them over the batch
    tl.store(dA_ptr + bdn, dA_acc, mask=mask_dn)
    if B_MODE == 0:
        tl.store(dB_ptr + bdn, dBf_acc, mask=mask_dn)
    if C_MODE == 0:
        tl.store(dC_ptr + bdn, dCf_acc, mask=mask_dn)
    bd = pid_b * dim + d
    if HAS_D:
        tl.store(dD_ptr + bd, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + bd, dbias_acc, mask=mask_d)


def pick_config(kind: str, dim: int, length: int, n_state: int) -> tuple[int, int, int]:
    """(BLOCK_L, lanes on the state axis, num_warps) for the forward (``kind='fwd'``) or backward kernel.

    A program covers ``num_warps * 32 // lanes`` channels; each thread holds ``BLOCK_L`` steps of
    ``N / lanes`` states of one channel.
    """
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    bn = triton.next_power_of_2(n_state)
    ln = min(bn, 8)
    bl = min(8, max(4, triton.next_power_of_2(length)))
    return bl, ln, 1


def _bc_layout(x: torch.Tensor, dim: int):
    """(tensor, fixed, batch stride, group stride, n stride, channels per group) of a B or C input."""
    x = x.contiguous()
    if x.dim() == 2:
        return x, True, 0, 0, 0, dim
    if x.dim() == 3:  # (batch, N, L): one group
        return x, False, x.stride(0), 0, x.stride(1), dim
    return x, False, x.stride(0), x.stride(1), x.stride(2), dim // x.shape[1]


def _mode(fixed: bool, dpg: int, block_d: int) -> int:
    """0: fixed (dim, N); 1: every channel block inside one group; 2: blocks straddle groups."""
    return 0 if fixed else (1 if dpg % block_d == 0 else 2)


def _launch_shape(kind, dim, length, n_state):
    bl, ln, nw = pick_config(kind, dim, length, n_state)
    bn = triton.next_power_of_2(n_state)
    ln = min(ln, bn)
    bd8 = 32 // ln
    return dict(BLOCK_L=bl, BNR=bn // ln, LN=ln, NW=nw, BD8=bd8), nw * bd8, nw


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        batch, dim, length = u.shape
        n_state = A.shape[1]
        fp64 = u.dtype == torch.float64
        cdt = torch.float64 if fp64 else torch.float32
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        z = z.contiguous() if z is not None else None
        Bc, b_fixed, sbb, sbg, sbn, dpg_b = _bc_layout(B, dim)
        Cc, c_fixed, scb, scg, scn, dpg_c = _bc_layout(C, dim)
        save = any(ctx.needs_input_grad[:8])
        # with a backward to come, the forward walks the backward's chunks (their states are stored)
        meta, bd, nw = _launch_shape("fwd", dim, length, n_state)
        if save:
            meta["BLOCK_L"] = pick_config("bwd", dim, length, n_state)[0]
        n_chunks = triton.cdiv(length, meta["BLOCK_L"])
        out = torch.empty_like(u)
        last = torch.empty(batch, dim, n_state, dtype=cdt, device=u.device)
        states = torch.empty(batch, n_chunks, dim, n_state, dtype=cdt, device=u.device) if save else last
        dummy = u
        grid = (triton.cdiv(dim, bd), batch)
        _fwd_kernel[grid](
            u, delta, A, Bc, Cc,
            D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            out, last, states,
            dim, length, n_state, n_chunks, 1,
            sbb, sbg, sbn, dpg_b, scb, scg, scn, dpg_c,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), B_MODE=_mode(b_fixed, dpg_b, bd), C_MODE=_mode(c_fixed, dpg_c, bd),
            SAVE_STATES=save, FP64=fp64, num_warps=nw, **meta,
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.chunk = meta["BLOCK_L"]
        if not return_last_state:
            ctx.mark_non_differentiable(last)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        n_state = A.shape[1]
        fp64 = u.dtype == torch.float64
        cdt = torch.float64 if fp64 else torch.float32
        dev = u.device
        Bc, b_fixed, sbb, sbg, sbn, dpg_b = _bc_layout(B, dim)
        Cc, c_fixed, scb, scg, scn, dpg_c = _bc_layout(C, dim)
        meta, bd, nw = _launch_shape("bwd", dim, length, n_state)
        meta["BLOCK_L"] = ctx.chunk
        n_chunks = triton.cdiv(length, ctx.chunk)
        b_mode, c_mode = _mode(b_fixed, dpg_b, bd), _mode(c_fixed, dpg_c, bd)
        b_atomic = b_mode == 2 or (b_mode == 1 and dpg_b > bd)
        c_atomic = c_mode == 2 or (c_mode == 1 and dpg_c > bd)
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA_part = torch.empty(batch, dim, n_state, dtype=cdt, device=dev)

        def grad_buffer(x, fixed, atomic):
            if fixed:
                return torch.empty(batch, dim, n_state, dtype=cdt, device=dev)
            return (torch.zeros if atomic else torch.empty)(x.shape, dtype=cdt, device=dev)

        dB, dC = grad_buffer(Bc, b_fixed, b_atomic), grad_buffer(Cc, c_fixed, c_atomic)
        dD_part = torch.empty(batch, dim, dtype=cdt, device=dev) if D is not None else None
        dbias_part = torch.empty(batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
        dummy = u
        grid = (triton.cdiv(dim, bd), batch)
        _bwd_kernel[grid](
            u, delta, A, Bc, Cc,
            D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            states, dout, dlast.contiguous() if dlast is not None else dummy,
            du, ddelta, dz if dz is not None else dummy, dA_part, dB, dC,
            dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
            dim, length, n_state, n_chunks, 1,
            sbb, sbg, sbn, dpg_b, scb, scg, scn, dpg_c,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, B_MODE=b_mode, C_MODE=c_mode, HAS_DLAST=dlast is not None,
            FP64=fp64, B_ATOMIC=b_atomic, C_ATOMIC=c_atomic, num_warps=nw, **meta,
        )
        dB = dB.sum(0) if b_fixed else dB
        dC = dC.sum(0) if c_fixed else dC
        return (
            du,
            ddelta,
            dA_part.sum(0).to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD_part.sum(0).to(D.dtype) if D is not None else None,
            dz,
            dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
        )


def _interpreted_twin():
    """This module loaded a second time with ``TRITON_INTERPRET=1``: kernels that run on CPU tensors."""
    mod = sys.modules.get(_TWIN_NAME)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(_TWIN_NAME, __file__)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = __package__
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules[_TWIN_NAME] = mod
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_TWIN_NAME, None)
        raise
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def selective_scan_triton(
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
    """Triton selective scan; same signature and semantics as ``selective_scan_ref``.

    CUDA tensors run the compiled kernels; CPU tensors run them under Triton's interpreter (slow:
    tests and debugging at small shapes only).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cuda" and not INTERPRETED:
        return _interpreted_twin().selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    if u.shape[-1] == 0:
        from .scan_ref import selective_scan_ref

        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
