"""This project's own GPU selective scan, written in Triton (JIT-compiled on first use, no build step).

Same signature and semantics as :func:`common.ops.scan_ref.selective_scan_ref` (mamba-ssm's
``selective_scan_fn``): float32 state math (float64 for float64 inputs), ``out`` in ``u``'s dtype,
``B`` / ``C`` fixed ``(dim, N)``, shared ``(batch, N, L)`` or grouped ``(batch, G, N, L)``, and
gradients for every input, also through ``last_state``.

Four kernel families, chosen per call:

- Plane kernels (:mod:`common.ops.scan_triton_plane`; N <= 4, time-varying B and C): the fused
  cross-scan's default, one program reading a channel's whole map in bands for all four directions;
  for plain scans only when ``CONFIG_OVERRIDE["path"] = "plane"`` (not faster there on an H100).

- Tile kernels (N < 8, e.g. MSVM-UNet's N = 1, and fixed B or C). One program per (block of
  ``BLOCK_D`` channels of one B/C group, batch element) walks the sequence in chunks of ``BLOCK_L``
  steps (at N < 8 one warp, 4 channels, 32 or 64 steps: ``pick_config``). A chunk is a
  ``(BLOCK_D, N, BLOCK_L)`` register tile: the decays ``a = exp(dt * A)`` and inputs
  ``b = dt * u * B`` of every step, scanned along the time axis with ``tl.associative_scan``
  (first-order linear recurrence), plus the state carried in from the previous chunk;
  ``y = sum_n C * h`` is reduced in registers, so the states never touch memory. Triton's default layout puts the
  time axis across the lanes, so the scans cost shuffles.
- Step kernels (time-varying B and C, 8 <= N <= 32: the N = 16 SS2D scans; the default there).
  One-warp programs of 8 channels whose tiles are laid out (by the shapes of the loads, which decide
  Triton's layouts) as 8 channel lanes x 4 state lanes with N / 4 states in each thread, and the time
  steps inside the thread: the forward reads 4-step vectors and scans them in registers; the
  backward works on per-step tiles with both recurrences written out (one exp per step, no shifted
  re-reads, no scan shuffles), two channel blocks per program sharing the B / C loads and the
  reduction of dB / dC over the channel lanes. The forward stores the state every 8 steps (twice
  ``u``'s size in float32 at N = 16). ``STEP_CONFIG`` holds the measured choices. Where the channels
  give too few programs (batch-1 inference), the sequence is split into time segments: a local pass
  per segment (its end state from zero and its summed dt; in the backward, its adjoint from zero),
  then each segment's program starts from the carry composed over the segments before (after) it.
  A parallel backward for the step forward (``STEP_CONFIG["bwd_par"]``, ``_bwd_kernel_p``; mamba-ssm's
  scheme), taken on CUDA where the step backward's grid fills the GPU badly (long sequences, a partial last
  wave): the time axis across the threads and the states one after another, each block's states and
  adjoints by two ``tl.associative_scan``s, dB / dC added with atomics per channel.
- Time-in-thread kernels (the fused cross-scan mode, and ``CONFIG_OVERRIDE["path"] = "time"``). 5-D
  tiles ``(BLOCK_L, N / LN, warps, LN, 32 / LN)``, meant to give each thread all ``BLOCK_L`` steps;
  compiled, Triton's layout choice puts lanes on the time axis of some of them (benchmarks/README.md).
  Launch configurations in ``TIME_IN_THREAD_CONFIG``.

Both forwards store the state entering each chunk when a gradient will be needed. The backwards
walk the chunks in reverse: they recompute the chunk's states from the stored chunk state (scanning
the previous step's decay and input, so that ``a[t] h[t-1]`` is formed directly rather than as
``h[t] - b[t]``, which cancels), run the adjoint recurrence ``q[t] = C[t] dy[t] + a[t+1] q[t+1]`` as a
reverse scan (the shifted decay from re-reading ``delta`` one step ahead, a cache hit), and form all
gradients in the same pass. Per-channel sums (``dA``, ``dD``, ``d delta_bias``, fixed ``dB`` / ``dC``)
go to per-(batch, channel) buffers summed afterwards; the time-varying ``dB`` and ``dC`` (sums over
the channels of a group) are added with float atomics, one per program and element, or stored
directly when one program covers a group.

Bidirectional mode (``rev_slot=d``, :func:`bidirectional_selective_scan_triton`; the step kernels only):
the channels come in slots of ``d``, slot ``2g`` scanning sequence ``g`` of ``u`` ``(batch, dim / 2, L)``
forward and slot ``2g + 1`` backward, every per-step input and output at the sequence's positions. A
backward slot's forward blocks load each 4-step chunk at positions ``L - 4 - 4c + (0..3)`` (still one
contiguous vector) and walk it in reverse in registers; its backward blocks address step ``t`` at
``L - 1 - t``. ``du`` is summed over each sequence's two slots. SS2D uses it by default for N = 16: the
cross-scan is then one transposed copy (no flips, no concatenation).

Fused cross-scan mode (``spatial=(H, W)``, :func:`cross_selective_scan_triton`): the kernels read
the ``(B, D, H, W)`` map and the per-direction inputs at the map position of each step of each of
the four SS2D directions and write the outputs there: no ``(B, 4, D, L)`` copy. At N <= 4 the plane
kernels do it (bands of the map, the four outputs summed in the kernel); otherwise the chunked kernels
(``_pos``; the time-in-thread ones at N 8-32).

Speed on an H200 (batch 16, SS2D shapes; benchmarks/README.md): at N = 16 (step kernels, state
stored every 8 steps) forward + backward 1.13-1.28x faster than mamba-ssm's CUDA kernel at L 3136 and
196, 0.67-0.96x at L 4096 and 12544; at batch 1 (time segments) forward 0.26 ms at 192 @ 4096 (mamba-ssm
0.12) and 0.35 at 192 @ 12544 (0.36); at N = 1 0.4-0.8x with the launch configurations before
2026-12-06 (H100, MSVM-UNet's batch-32 scans: one-warp tiles now, 1.6-2x faster than those).
The step kernels also run N < 8 on request (``STEP_CONFIG["small_n"]``: blocks of 32 / N channels);
at N = 1 they are 2.3-4x slower than the tile kernels (too few programs, one chain per thread).
The fused cross-scan mode is about 2x slower than the PyTorch cross-scan around the plain scan
(column-major steps are W elements apart in memory), so SS2D uses it only when asked.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), for tests: if
this module was first imported without that variable, a CPU call loads an interpreted twin.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._twin import interpreted_twin
from .scan_ref import check_scan_inputs

__all__ = ["selective_scan_triton", "cross_selective_scan_triton", "bidirectional_selective_scan_triton",
           "bidirectional_step_available", "plane_cross_scan_applies", "SelectiveScanTriton", "pick_config",
           "CONFIG_OVERRIDE", "TIME_IN_THREAD_CONFIG"]

# Were the kernels of this module object built for the interpreter (CPU tensors)?
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TWIN_NAME = "common.ops._scan_triton_interpreted"
if INTERPRETED:  # the plane kernels' module, built the same way as this one
    _plane = interpreted_twin("common.ops._scan_triton_plane_interpreted",
                              os.path.join(os.path.dirname(__file__), "scan_triton_plane.py"), __package__)
else:
    from . import scan_triton_plane as _plane
_LOG2E = tl.constexpr(1.4426950408889634)

# Benchmarks and tests may force the launch configuration: "fwd" / "bwd": the tile kernels' (BLOCK_D,
# BLOCK_L, num_warps) (and the tile kernels where the plane kernels would apply); "time": the
# time-in-thread kernels' (BLOCK_L, LN, NW, cap); "plane": the plane kernels' (chunk elements,
# num_warps); "path": "tile" to use the tile kernels everywhere (the fused cross-scan too), "plane" to
# use the plane kernels for plain scans with N <= 4 as well; "min_programs": the backward's occupancy
# target (default 5 per SM).
CONFIG_OVERRIDE: dict[str, object] = {}


@triton.jit
def _combine(a1, b1, a2, b2):
    # first-order linear recurrence x = a * x_prev + b: (a1, b1) then (a2, b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _sum(x, axis: tl.constexpr):
    # triton.language's own sum combine (what tl.sum reduces with) passed to tl.reduce, not tl.sum: the
    # interpreter twin cannot call triton.language's jit helpers (tl.sum, tl.zeros), but it recognises this
    # combine and sums with NumPy; any other combine it applies element by element in Python
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _softplus(x):
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _pos(t, k, H, W, L, SPATIAL: tl.constexpr):
    # Where step t of scan direction k lies in a row-major (H, W) map (the fused cross-scan): k = 0
    # row-major, 1 column-major, 2 and 3 the same reversed (common.ops.cross_scan's order). Unfused: t.
    if SPATIAL:
        tt = tl.where(k >= 2, L - 1 - t, t)
        return tl.where(k % 2 == 1, (tt % H) * W + tt // H, tt)
    else:
        return t


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr,
    dim, L, n_state, n_chunks, u_dim, H, W,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, SAVE_STATES: tl.constexpr, FP64: tl.constexpr,
    SPATIAL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D
    k = d0 // u_dim  # the scan direction (fused); 0 otherwise
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]

    A = tl.load(A_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    A2 = A * _LOG2E  # exp(dt * A) = exp2(dt * A2)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(CDT)
    if B_FIXED:
        Bf = tl.load(B_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    else:
        b_base = B_ptr + pid_b * sb_batch + (d0 // dpg_b) * sb_group + offs_n[:, None] * sb_n
    if C_FIXED:
        Cf = tl.load(C_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    else:
        c_base = C_ptr + pid_b * sc_batch + (d0 // dpg_c) * sc_group + offs_n[:, None] * sc_n

    row = (pid_b * dim + offs_d).to(tl.int64) * L  # (BLOCK_D,) offsets of the channels' rows
    urow = (pid_b * u_dim + offs_d % u_dim).to(tl.int64) * L
    st_base = states_ptr + ((pid_b * dim + offs_d).to(tl.int64) * n_chunks)[:, None] * n_state + offs_n[None, :]
    h = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype=CDT)
    for c in range(0, n_chunks):
        t = c * BLOCK_L + offs_l
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        p = _pos(t, k, H, W, L, SPATIAL)
        ptrs = row[:, None] + p[None, :]
        u = tl.load(u_ptr + urow[:, None] + p[None, :], mask=m2, other=0.0).to(CDT)
        dt = tl.load(dt_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)
        if SAVE_STATES:
            tl.store(st_base + c * n_state, h, mask=mask_dn)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        dtu = dt * u
        mnt = mask_n[:, None] & mask_t[None, :]
        if B_FIXED:
            b = dtu[:, None, :] * Bf[:, :, None]
        else:
            Bt = tl.load(b_base + p[None, :], mask=mnt, other=0.0).to(CDT)
            b = dtu[:, None, :] * Bt[None, :, :]
        acum, hs = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        hh = hs + acum * h[:, :, None]
        if C_FIXED:
            y = _sum(hh * Cf[:, :, None], 1)
        else:
            Ct = tl.load(c_base + p[None, :], mask=mnt, other=0.0).to(CDT)
            y = _sum(hh * Ct[None, :, :], 1)
        h = _sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hh, 0.0), 2)
        if HAS_D:
            y = y + u * Dv[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(CDT)
            y = y * zv / (1.0 + tl.exp(-zv))
        tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
    last_ptrs = last_ptr + ((pid_b * dim + offs_d).to(tl.int64) * n_state)[:, None] + offs_n[None, :]
    tl.store(last_ptrs, h, mask=mask_dn)


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_state, n_chunks, u_dim, H, W,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_DLAST: tl.constexpr, FP64: tl.constexpr,
    B_ATOMIC: tl.constexpr, C_ATOMIC: tl.constexpr, SPATIAL: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D
    k = d0 // u_dim
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn_ptrs = ((pid_b * dim + offs_d).to(tl.int64) * n_state)[:, None] + offs_n[None, :]  # (batch, dim, N)

    A = tl.load(A_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    A2 = A * _LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(CDT)
    if B_FIXED:
        Bf = tl.load(B_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    else:
        gb = d0 // dpg_b
        b_off = pid_b * sb_batch + gb * sb_group + offs_n[:, None] * sb_n
    if C_FIXED:
        Cf = tl.load(C_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(CDT)
    else:
        gc = d0 // dpg_c
        c_off = pid_b * sc_batch + gc * sc_group + offs_n[:, None] * sc_n

    row = (pid_b * dim + offs_d).to(tl.int64) * L
    urow = (pid_b * u_dim + offs_d % u_dim).to(tl.int64) * L
    st_base = states_ptr + ((pid_b * dim + offs_d).to(tl.int64) * n_chunks)[:, None] * n_state + offs_n[None, :]
    if HAS_DLAST:
        q_carry = tl.load(dlast_ptr + dn_ptrs, mask=mask_dn, other=0.0).to(CDT)
    else:
        q_carry = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype=CDT)
    dA_acc = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype=CDT)
    dBf_acc = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype=CDT)
    dCf_acc = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype=CDT)
    dD_acc = tl.full((BLOCK_D,), 0.0, dtype=CDT)
    dbias_acc = tl.full((BLOCK_D,), 0.0, dtype=CDT)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + offs_l
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        mnt = mask_n[:, None] & mask_t[None, :]
        p = _pos(t, k, H, W, L, SPATIAL)
        p_next = _pos(t + 1, k, H, W, L, SPATIAL)
        p_prev = _pos(t - 1, k, H, W, L, SPATIAL)
        ptrs = row[:, None] + p[None, :]
        u = tl.load(u_ptr + urow[:, None] + p[None, :], mask=m2, other=0.0).to(CDT)
        dt_raw = tl.load(dt_ptr + ptrs, mask=m2, other=0.0).to(CDT)
        # the decay of the next step, a[t+1] (delta re-read one step ahead: the same cache lines)
        m2n = mask_d[:, None] & (t[None, :] + 1 < L)
        dt_next = tl.load(dt_ptr + row[:, None] + p_next[None, :], mask=m2n, other=0.0).to(CDT)
        if HAS_BIAS:
            dt_raw = dt_raw + bias[:, None]
            dt_next = dt_next + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dt_next = _softplus(dt_next)
        else:
            dt = dt_raw
        dt = tl.where(m2, dt, 0.0)
        dt_next = tl.where(m2n, dt_next, 0.0)
        dout = tl.load(dout_ptr + ptrs, mask=m2, other=0.0).to(CDT)

        # recompute this chunk's states from the state entering it. The scan runs over the previous
        # step's decay and input (re-read at t - 1, cache hits; identity at the chunk's first step), so
        # it gives h[t-1] and a[t] h[t-1] is formed directly: the gradient of A needs it, and forming
        # it as h[t] - b[t] cancels when the decay is small and b large (dA off by ~1e-3 of its scale)
        h0 = tl.load(st_base + c * n_state, mask=mask_dn, other=0.0)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        dtu = dt * u
        m2p = m2 & (offs_l[None, :] > 0)
        dt_prev = tl.load(dt_ptr + row[:, None] + p_prev[None, :], mask=m2p, other=0.0).to(CDT)
        u_prev = tl.load(u_ptr + urow[:, None] + p_prev[None, :], mask=m2p, other=0.0).to(CDT)
        if HAS_BIAS:
            dt_prev = dt_prev + bias[:, None]
        if SOFTPLUS:
            dt_prev = _softplus(dt_prev)
        dt_prev = tl.where(m2p, dt_prev, 0.0)
        dtu_prev = dt_prev * u_prev
        if B_FIXED:
            Bv = Bf[:, :, None]
            Bv_prev = Bv
        else:
            Bt = tl.load(B_ptr + b_off + p[None, :], mask=mnt, other=0.0).to(CDT)
            Bv = Bt[None, :, :]
            mntp = mnt & (offs_l[None, :] > 0)
            Bt_prev = tl.load(B_ptr + b_off + p_prev[None, :], mask=mntp, other=0.0).to(CDT)
            Bv_prev = Bt_prev[None, :, :]
        if C_FIXED:
            Cv = Cf[:, :, None]
        else:
            Ct = tl.load(C_ptr + c_off + p[None, :], mask=mnt, other=0.0).to(CDT)
            Cv = Ct[None, :, :]
        b = dtu[:, None, :] * Bv
        a_prev = tl.exp2(dt_prev[:, None, :] * A2[:, :, None])
        b_prev = dtu_prev[:, None, :] * Bv_prev
        acum, hs = tl.associative_scan((a_prev, b_prev), axis=2, combine_fn=_combine)
        ah = a * (hs + acum * h0[:, :, None])  # a[t] h[t-1]
        hh = ah + b

        # output side: out = (y + D u) * silu(z)
        if HAS_Z:
            zv = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(CDT)
            y = _sum(hh * Cv, 1)
            if HAS_D:
                y = y + u * Dv[:, None]
            sig = 1.0 / (1.0 + tl.exp(-zv))
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + ptrs, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * zv * sig
        else:
            dy = dout
        if HAS_D:
            dD_acc += _sum(dy * u, 1)
            du = dy * Dv[:, None]
        else:
            du = tl.full((BLOCK_D, BLOCK_L), 0.0, dtype=CDT)

        # dC = sum over the block's channels of dy * h
        dyh = dy[:, None, :] * hh
        if C_FIXED:
            dCf_acc += _sum(dyh, 2)
        else:
            dC_t = _sum(dyh, 0)
            if C_ATOMIC:
                tl.atomic_add(dC_ptr + c_off + p[None, :], dC_t, mask=mnt)
            else:
                tl.store(dC_ptr + c_off + p[None, :], dC_t, mask=mnt)

        # adjoint states, reverse scan: q[t] = C[t] dy[t] + a[t+1] q[t+1]
        a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        rhs = dy[:, None, :] * Cv
        aq, qs = tl.associative_scan((a_next, rhs), axis=2, combine_fn=_combine, reverse=True)
        q = qs + aq * q_carry[:, :, None]
        q_carry = _sum(tl.where(offs_l[None, None, :] == 0, q, 0.0), 2)

        # b = dt * u * B
        qdtu = q * dtu[:, None, :]
        if B_FIXED:
            dBf_acc += _sum(qdtu, 2)
        else:
            dB_t = _sum(qdtu, 0)
            if B_ATOMIC:
                tl.atomic_add(dB_ptr + b_off + p[None, :], dB_t, mask=mnt)
            else:
                tl.store(dB_ptr + b_off + p[None, :], dB_t, mask=mnt)
        sB = _sum(q * Bv, 1)
        du = du + sB * dt
        # a = exp(dt * A): d loss / d(dt * A) = q[t] * a[t] * h[t-1]
        x = q * ah
        ddt = sB * u + _sum(x * A[:, :, None], 1)
        dA_acc += _sum(x * dt[:, None, :], 2)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-dt_raw))
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += _sum(ddt, 1)
        tl.store(du_ptr + ptrs, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + ptrs, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)

    # per (batch, channel) partial sums; the wrapper sums them over the batch
    tl.store(dA_ptr + dn_ptrs, dA_acc, mask=mask_dn)
    if B_FIXED:
        tl.store(dB_ptr + dn_ptrs, dBf_acc, mask=mask_dn)
    if C_FIXED:
        tl.store(dC_ptr + dn_ptrs, dCf_acc, mask=mask_dn)
    bd_ptrs = pid_b * dim + offs_d
    if HAS_D:
        tl.store(dD_ptr + bd_ptrs, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + bd_ptrs, dbias_acc, mask=mask_d)


@triton.jit
def _sum_keep(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine, keep_dims=True)


@triton.jit
def _sum_n5(x):
    # over the state axis of a 5-D tile: the in-thread part (n_hi) first, then across the lanes (n_lo)
    return _sum_keep(_sum_keep(x, 1), 3)


@triton.jit
def _sum_d5(x):
    # over the channel axes of a 5-D tile: the lanes (channel_lo), then the warps
    return _sum_keep(_sum_keep(x, 4), 2)


@triton.jit
def _fwd_kernel_t(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr, dts_ptr,
    dim, L, n_state, n_chunks, u_dim, H, W,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, FP64: tl.constexpr, SPATIAL: tl.constexpr,
    BLOCK_L: tl.constexpr, BNR: tl.constexpr, LN: tl.constexpr, NW: tl.constexpr, BD8: tl.constexpr,
):
    # "time in thread" forward for time-varying B and C and N >= 8. Tiles are 5-D,
    # (time, n_hi, warp, n_lo, channel_lo) with n = n_hi * LN + n_lo and channel = d0 + warp * BD8 +
    # channel_lo: Triton's default layout puts the lanes on (n_lo, channel_lo) and the warps on `warp`,
    # so each thread holds all BLOCK_L steps of its BNR states of one channel and the time scan runs
    # inside the thread, without shuffles (LN = 1: all states of a channel in one thread, and y = C h
    # summed in registers too). A program's channels lie inside one B group, one C group and, fused,
    # one scan direction. With a backward to come, the step sizes dt (after bias and softplus) are
    # stored for it in scan order.
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * (NW * BD8)
    k = d0 // u_dim  # the scan direction (fused); 0 otherwise
    ol = tl.arange(0, BLOCK_L)[:, None, None, None, None]
    n = tl.arange(0, BNR)[None, :, None, None, None] * LN + tl.arange(0, LN)[None, None, None, :, None]
    d = d0 + tl.arange(0, NW)[None, None, :, None, None] * BD8 + tl.arange(0, BD8)[None, None, None, None, :]
    mask_d = d < dim
    mask_n = n < n_state
    mask_dn = mask_d & mask_n
    A2 = tl.load(A_ptr + d * n_state + n, mask=mask_dn, other=0.0).to(CDT) * _LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(CDT)
    b_base = B_ptr + pid_b * sb_batch + (d0 // dpg_b) * sb_group + n * sb_n
    c_base = C_ptr + pid_b * sc_batch + (d0 // dpg_c) * sc_group + n * sc_n
    row = (pid_b * dim + d).to(tl.int64) * L
    urow = (pid_b * u_dim + d % u_dim).to(tl.int64) * L
    h = tl.full((1, BNR, NW, LN, BD8), 0.0, dtype=CDT)
    for c in range(0, n_chunks):
        t = c * BLOCK_L + ol
        mask_t = t < L
        m2 = mask_d & mask_t
        p = _pos(t, k, H, W, L, SPATIAL)
        u = tl.load(u_ptr + urow + p, mask=m2, other=0.0).to(CDT)
        dt = tl.load(dt_ptr + row + p, mask=m2, other=0.0).to(CDT)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m2, dt, 0.0)
        if SAVE_STATES:  # (batch, chunk, dim, N): the state entering the chunk; dt in scan order
            tl.store(states_ptr + (pid_b * n_chunks + c) * dim * n_state + d * n_state + n, h, mask=mask_dn)
            tl.store(dts_ptr + row + t, dt, mask=m2)
        a = tl.exp2(dt * A2)
        mnt = mask_n & mask_t
        b = dt * u * tl.load(b_base + p, mask=mnt, other=0.0).to(CDT)
        b = tl.where(ol == 0, b + a * h, b)  # the state carried in enters at the chunk's first step
        _, hh = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
        y = _sum_n5(hh * tl.load(c_base + p, mask=mnt, other=0.0).to(CDT))
        h = _sum_keep(tl.where(ol == BLOCK_L - 1, hh, 0.0), 0)
        if HAS_D:
            y = y + u * Dv
        if HAS_Z:
            zv = tl.load(z_ptr + row + p, mask=m2, other=0.0).to(CDT)
            y = y * zv / (1.0 + tl.exp(-zv))
        tl.store(out_ptr + row + p, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + (pid_b * dim + d).to(tl.int64) * n_state + n, h, mask=mask_dn)


@triton.jit
def _bwd_kernel_t(
    u_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr,
    states_ptr, dts_ptr, dout_ptr, q_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_state, n_chunks, n_sub, u_dim, H, W,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr, B_ATOMIC: tl.constexpr, C_ATOMIC: tl.constexpr, SPATIAL: tl.constexpr,
    BLOCK_L: tl.constexpr, BNR: tl.constexpr, LN: tl.constexpr, NW: tl.constexpr, BD8: tl.constexpr,
):
    # "time in thread" backward (5-D tiles as in _fwd_kernel_t). A program owns n_sub blocks of
    # NW * BD8 channels, all inside one B group, one C group and one scan direction, and walks the
    # chunks in reverse; for each chunk it visits its channel blocks in turn, so B[t] and C[t] are
    # loaded once per chunk and the time-varying dB / dC, sums over the channels, are accumulated
    # elementwise over the blocks in registers and reduced across lanes and warps once per chunk: one
    # store (or one atomic per program when several programs share a group). What a channel block
    # carries from chunk to chunk (the adjoint state q, and the sums dA, dD, d delta_bias) lives in
    # per-(batch, channel) buffers that only this program touches; q_ptr arrives holding the gradient
    # of last_state (or zeros). The step sizes dt come from the forward (dts_ptr, after bias and
    # softplus, scan order): the softplus derivative is sigmoid(x) = 1 - exp(-softplus(x)).
    # (Measured slower on an H200, in git history: one exp per step with the shifted tiles from an
    # in-thread shift scan, and register carries when a program owns one block; benchmarks/README.md.)
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    BDP: tl.constexpr = NW * BD8
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    p0 = pid * n_sub * BDP
    k = p0 // u_dim
    ol = tl.arange(0, BLOCK_L)[:, None, None, None, None]
    n = tl.arange(0, BNR)[None, :, None, None, None] * LN + tl.arange(0, LN)[None, None, None, :, None]
    dl = tl.arange(0, NW)[None, None, :, None, None] * BD8 + tl.arange(0, BD8)[None, None, None, None, :]
    mask_n = n < n_state
    b_off = pid_b * sb_batch + (p0 // dpg_b) * sb_group + n * sb_n
    c_off = pid_b * sc_batch + (p0 // dpg_c) * sc_group + n * sc_n
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + ol
        mask_t = t < L
        mnt = mask_n & mask_t
        p = _pos(t, k, H, W, L, SPATIAL)
        p_prev = _pos(t - 1, k, H, W, L, SPATIAL)
        Bv = tl.load(B_ptr + b_off + p, mask=mnt, other=0.0).to(CDT)
        Bp = tl.load(B_ptr + b_off + p_prev, mask=mnt & (ol > 0), other=0.0).to(CDT)  # B[t - 1]
        Cv = tl.load(C_ptr + c_off + p, mask=mnt, other=0.0).to(CDT)
        accB = tl.full((BLOCK_L, BNR, NW, LN, BD8), 0.0, dtype=CDT)
        accC = tl.full((BLOCK_L, BNR, NW, LN, BD8), 0.0, dtype=CDT)
        # the carried per-channel sums were written last chunk by other threads than read them
        tl.debug_barrier()
        for j in range(0, n_sub):
            d = p0 + j * BDP + dl
            mask_d = d < dim
            mask_dn = mask_d & mask_n
            m2 = mask_d & mask_t
            row = (pid_b * dim + d).to(tl.int64) * L
            urow = (pid_b * u_dim + d % u_dim).to(tl.int64) * L
            bdn = (pid_b * dim + d).to(tl.int64) * n_state + n
            A = tl.load(A_ptr + d * n_state + n, mask=mask_dn, other=0.0).to(CDT)
            A2 = A * _LOG2E
            u = tl.load(u_ptr + urow + p, mask=m2, other=0.0).to(CDT)
            dt = tl.load(dts_ptr + row + t, mask=m2, other=0.0)
            m2n = m2 & (t + 1 < L)
            dt_next = tl.load(dts_ptr + row + t + 1, mask=m2n, other=0.0)
            m2p = m2 & (ol > 0)
            dt_prev = tl.load(dts_ptr + row + t - 1, mask=m2p, other=0.0)
            u_prev = tl.load(u_ptr + urow + p_prev, mask=m2p, other=0.0).to(CDT)
            dout = tl.load(dout_ptr + row + p, mask=m2, other=0.0).to(CDT)

            # recompute the chunk's states from the stored entering state h0. The scan runs over the
            # previous step's decay and input (identity at the chunk's first step), so it gives
            # h[t - 1] and a[t] h[t - 1] is formed directly (as h[t] - b[t] it cancels when the decay
            # is small and b large).
            h0 = tl.load(states_ptr + (pid_b * n_chunks + c) * dim * n_state + d * n_state + n,
                         mask=mask_dn, other=0.0)
            a = tl.exp2(dt * A2)
            dtu = dt * u
            b = dtu * Bv
            b_prev = tl.where(ol == 0, h0, dt_prev * u_prev * Bp)
            _, h_prev = tl.associative_scan((tl.exp2(dt_prev * A2), b_prev), axis=0, combine_fn=_combine)
            ah = a * h_prev
            hh = ah + b

            if HAS_D:
                Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(CDT)
            if HAS_Z:
                zv = tl.load(z_ptr + row + p, mask=m2, other=0.0).to(CDT)
                y = _sum_n5(hh * Cv)
                if HAS_D:
                    y = y + u * Dv
                sig = 1.0 / (1.0 + tl.exp(-zv))
                dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
                tl.store(dz_ptr + row + p, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                dy = dout * zv * sig
            else:
                dy = dout
            bd = pid_b * dim + d
            if HAS_D:
                du = dy * Dv
                dD_new = tl.load(dD_ptr + bd, mask=mask_d, other=0.0) + _sum_keep(dy * u, 0)
                tl.store(dD_ptr + bd, dD_new, mask=mask_d)
            else:
                du = tl.full((BLOCK_L, 1, NW, 1, BD8), 0.0, dtype=CDT)
            accC += dy * hh

            # adjoint states, reverse scan: q[t] = C[t] dy[t] + a[t+1] q[t+1]
            a_next = tl.exp2(dt_next * A2)
            q_in = tl.load(q_ptr + bdn, mask=mask_dn, other=0.0)
            rhs = dy * Cv
            rhs = tl.where(ol == BLOCK_L - 1, rhs + a_next * q_in, rhs)
            _, q = tl.associative_scan((a_next, rhs), axis=0, combine_fn=_combine, reverse=True)
            tl.store(q_ptr + bdn, _sum_keep(tl.where(ol == 0, q, 0.0), 0), mask=mask_dn)
            accB += q * dtu

            sB = _sum_n5(q * Bv)
            x = q * ah  # d loss / d(dt * A)
            ddt = sB * u + _sum_n5(x * A)
            du = du + sB * dt
            dA_ptrs = dA_ptr + bdn
            tl.store(dA_ptrs, tl.load(dA_ptrs, mask=mask_dn, other=0.0) + _sum_keep(x * dt, 0), mask=mask_dn)
            if SOFTPLUS:  # sigmoid(x) = 1 - exp(-softplus(x)); a series where that cancels
                ddt = ddt * tl.where(dt < 0.01, dt * (1.0 - dt * (0.5 - dt / 6.0)), 1.0 - tl.exp(-dt))
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_BIAS:
                db_new = tl.load(dbias_ptr + bd, mask=mask_d, other=0.0) + _sum_keep(ddt, 0)
                tl.store(dbias_ptr + bd, db_new, mask=mask_d)
            tl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddt_ptr + row + p, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)

        dB_t = _sum_d5(accB)
        dC_t = _sum_d5(accC)
        if B_ATOMIC:
            tl.atomic_add(dB_ptr + b_off + p, dB_t, mask=mnt)
        else:
            tl.store(dB_ptr + b_off + p, dB_t, mask=mnt)
        if C_ATOMIC:
            tl.atomic_add(dC_ptr + c_off + p, dC_t, mask=mnt)
        else:
            tl.store(dC_ptr + c_off + p, dC_t, mask=mnt)


@triton.jit
def _split4(x):
    # the four steps of a (P, Q, 4) chunk tile whose time axis lies inside each thread
    lo, hi = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 2, 2)))
    x0, x2 = tl.split(lo)
    x1, x3 = tl.split(hi)
    return x0, x1, x2, x3


@triton.jit
def _join4(x0, x1, x2, x3):
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (x0.shape[0], x0.shape[1], 4))


@triton.jit
def _flip4(x0, x1, x2, x3, rv):
    # the four steps reversed where rv (a backward scan's block), as they are elsewhere
    return tl.where(rv, x3, x0), tl.where(rv, x2, x1), tl.where(rv, x1, x2), tl.where(rv, x0, x3)


@triton.jit
def _rev_urow(pid_b, dim, d0, dd, slot, L):
    # the u row of channels dd (block d0) in the bidirectional mode: channel i of slot 2g or 2g + 1 reads
    # channel i of sequence g, u being (batch, dim / 2, L)
    return (pid_b * (dim // 2) + (d0 // (2 * slot)) * slot + d0 % slot + (dd - d0)).to(tl.int64) * L


@triton.jit
def _rev_pos(t, L, rv, REV: tl.constexpr):
    # the memory position of step t (a backward block's step t lies at L - 1 - t)
    if REV:
        return tl.where(rv, L - 1 - t, t)
    else:
        return t


@triton.jit
def _s_fwd_pos(c, tt, L, rv, REV: tl.constexpr):
    # the memory positions of chunk c's 4 steps (a backward block's chunk c: L - 4 - 4c + (0..3), walked
    # in reverse in registers) and their mask
    if REV:
        t = tl.where(rv, L - 4 - c * 4, c * 4) + tt
        return t, (t >= 0) & (t < L)
    else:
        t = c * 4 + tt
        return t, t < L


@triton.jit
def _s_fwd_loads(u_ptr, dt_ptr, B_ptr, C_ptr, urow, row, b_off, c_off, c, tt, mask_n, L, rv, REV: tl.constexpr,
                 LOCAL: tl.constexpr):
    # chunk c's u, delta, B and C (C not in the local pass: B again), as stored; zeros past the ends
    t, mask_t = _s_fwd_pos(c, tt, L, rv, REV)
    mnt = mask_n & mask_t
    u = tl.load(u_ptr + urow + t, mask=mask_t, other=0.0)
    dt = tl.load(dt_ptr + row + t, mask=mask_t, other=0.0)
    Bv = tl.load(B_ptr + b_off + t, mask=mnt, other=0.0)
    Cv = Bv
    if not LOCAL:
        Cv = tl.load(C_ptr + c_off + t, mask=mnt, other=0.0)
    return u, dt, Bv, Cv


@triton.jit(do_not_specialize=["st_n"])
def _fwd_kernel_s(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr, dts_ptr, seg_h_ptr, seg_dt_ptr,
    dim, L, n_state, n_chunks, n_saved, st_n, seg_chunks, n_segs, slot,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, FP64: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, NUM_STAGES: tl.constexpr,
    SAVE_EVERY: tl.constexpr, LOCAL: tl.constexpr, REV: tl.constexpr, STORE_DT: tl.constexpr, SA: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # "step" forward (time-varying B and C, 8 <= N <= 32). Tiles are (channels, states, 4 steps) (SA = 1)
    # or (states, channels, 4 steps) (SA = 0), the time axis last: the loads of B and C (broadcast over
    # the channels) are contiguous 4-step vectors, and the layout wanted gives each thread the 4 steps of
    # BN / 4 states of one channel, the lanes spread over 8 channels x 4 state groups, so that y = C h is
    # summed over the states in the thread and over 2 rounds of shuffles. Triton's coalescing decides
    # which of the two equally contiguous axes (channels, stride 0; states, stride L) gets the lanes
    # first, and Triton 3.6 and 3.7+ decide it the other way round: SA is chosen per version
    # (_STATE_AXIS), as with the wrong axis 16 lanes share the states (64 shuffles per 4-step chunk
    # instead of 8; offline sm_90 SASS, benchmarks/README.md). The 4-step scan is written out on the
    # split tile, in registers. With a backward to come, the state entering every SAVE_EVERY-th chunk
    # and the step sizes dt (after bias and softplus) are stored; the state from a 2-D pointer tile,
    # whose layout is the recurrence's own (from a 3-D one, Triton 3.6 computed the bf16 recurrence
    # twice, once in the store's layout).
    #
    # Time segments (grid axis 2; n_segs > 1 where the channels alone give too few programs): program
    # s walks the chunks [s * seg_chunks, (s + 1) * seg_chunks). With LOCAL, it only scans its segment
    # from a zero state and stores that end state and the segment's summed dt (the segment's decay is
    # exp(A * sum dt)), for segments 0 .. n_segs - 2; the full pass then starts segment s from the
    # state composed of the segments before it.
    #
    # REV (the bidirectional mode, bidirectional_selective_scan_triton): the channels come in slots of
    # `slot`, slot 2g scanning sequence g of u (batch, dim / 2, L) forward and slot 2g + 1 backward. A
    # backward block reads and writes the 4 positions of chunk c in memory order, L - 4 - 4c + (0..3),
    # and walks them in reverse in registers.
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    BL: tl.constexpr = 4
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    d0 = pid_d * BD
    nn = tl.expand_dims(tl.expand_dims(tl.arange(0, BN), 1 - SA), 2)  # the states on axis SA
    dd = d0 + tl.expand_dims(tl.expand_dims(tl.arange(0, BD), SA), 2)  # the channels on the other
    tt = tl.arange(0, BL)[None, None, :]
    mask_n = nn < n_state
    n2 = tl.expand_dims(tl.arange(0, BN), 1 - SA)  # the state tile's indices
    d2 = d0 + tl.expand_dims(tl.arange(0, BD), SA)
    A2 = tl.load(A_ptr + dd * n_state + nn, mask=mask_n, other=0.0).to(CDT) * _LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + dd).to(CDT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + dd).to(CDT)
    row = (pid_b * dim + dd).to(tl.int64) * L
    urow = row
    rv = d0 < 0  # False
    if REV:
        urow = _rev_urow(pid_b, dim, d0, dd, slot, L)
        rv = (d0 // slot) % 2 == 1
    b_off = pid_b * sb_batch + (d0 // dpg_b) * sb_group + nn * sb_n + 0 * dd
    c_off = pid_b * sc_batch + (d0 // dpg_c) * sc_group + nn * sc_n + 0 * dd
    c_lo = pid_s * seg_chunks
    c_hi = tl.minimum(n_chunks, c_lo + seg_chunks)
    h3 = (nn * 0 + dd * 0).to(CDT)
    if not LOCAL:
        for j in range(0, pid_s):  # the state entering the segment, from the local passes before it
            seg = (pid_b * (n_segs - 1) + j) * dim + dd
            h3 = (tl.exp2(tl.load(seg_dt_ptr + seg) * A2) * h3
                  + tl.load(seg_h_ptr + seg * n_state + nn, mask=mask_n, other=0.0))
    h = tl.reshape(h3, (h3.shape[0], h3.shape[1]))
    sdt = (dd * 0).to(CDT)
    if PREFETCH:  # the first chunk's inputs
        u_n, dt_n, B_n, C_n = _s_fwd_loads(u_ptr, dt_ptr, B_ptr, C_ptr, urow, row, b_off, c_off, c_lo, tt, mask_n, L,
                                           rv, REV, LOCAL)
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        t, mask_t = _s_fwd_pos(c, tt, L, rv, REV)
        if PREFETCH:  # this chunk's inputs came with the last one; the next chunk's loads go out now
            u_r, dt_r, B_r, C_r = u_n, dt_n, B_n, C_n
            u_n, dt_n, B_n, C_n = _s_fwd_loads(u_ptr, dt_ptr, B_ptr, C_ptr, urow, row, b_off, c_off, c + 1, tt,
                                               mask_n, L, rv, REV, LOCAL)
        else:
            u_r, dt_r, B_r, C_r = _s_fwd_loads(u_ptr, dt_ptr, B_ptr, C_ptr, urow, row, b_off, c_off, c, tt, mask_n,
                                               L, rv, REV, LOCAL)
        u = u_r.to(CDT)
        dt = dt_r.to(CDT)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(mask_t, dt, 0.0)
        if LOCAL:
            sdt += _sum(dt, 2)[:, :, None]
        elif SAVE_STATES:  # (batch, chunk // SAVE_EVERY, dim, N): the state entering the chunk
            if c % SAVE_EVERY == 0:
                tl.store(states_ptr + ((pid_b * n_saved + c // SAVE_EVERY) * dim + d2) * n_state + n2 * st_n, h,
                         mask=n2 < n_state)
            if STORE_DT:
                tl.store(dts_ptr + row + t, dt, mask=mask_t)
        a0, a1, a2, a3 = _split4(tl.exp2(dt * A2))
        b0, b1, b2, b3 = _split4((dt * u) * B_r.to(CDT))
        if REV:  # into time order
            a0, a1, a2, a3 = _flip4(a0, a1, a2, a3, rv)
            b0, b1, b2, b3 = _flip4(b0, b1, b2, b3, rv)
        h0 = a0 * h + b0
        h1 = a1 * h0 + b1
        h2 = a2 * h1 + b2
        h = a3 * h2 + b3
        if not LOCAL:
            if REV:  # back into memory order
                o0, o1, o2, o3 = _flip4(h0, h1, h2, h, rv)
                hh = _join4(o0, o1, o2, o3)
            else:
                hh = _join4(h0, h1, h2, h)
            y = tl.expand_dims(_sum(hh * C_r.to(CDT), SA), SA)
            if HAS_D:
                y = y + u * Dv
            if HAS_Z:
                zv = tl.load(z_ptr + row + t, mask=mask_t, other=0.0).to(CDT)
                y = y * zv / (1.0 + tl.exp(-zv))
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_t)
    if LOCAL:
        seg = (pid_b * (n_segs - 1) + pid_s) * dim + dd
        tl.store(seg_h_ptr + seg * n_state + nn, h[:, :, None], mask=mask_n)
        tl.store(seg_dt_ptr + seg, sdt)
    elif pid_s == n_segs - 1:
        tl.store(last_ptr + (pid_b * dim + dd).to(tl.int64) * n_state + nn, h[:, :, None], mask=mask_n)


@triton.jit
def _s_dt(dts_ptr, off, m, bias, DT_STORED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
          CDT: tl.constexpr):
    # the step size dt at off: stored by the forward (float32), or recomputed from delta (+ bias,
    # softplus) as the forward computed it; 0 where masked
    if DT_STORED:
        dt = tl.load(dts_ptr + off, mask=m, other=0.0)
    else:
        dt = tl.load(dts_ptr + off, mask=m, other=0.0).to(CDT)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(m, dt, 0.0)
    return dt


@triton.jit
def _s_channel(ptr, dd, LOAD: tl.constexpr, CDT: tl.constexpr):
    # a per-channel parameter (D, delta_bias) of the channels dd as a tile shaped like dd; zeros where it
    # is absent or not needed
    v = (dd * 0).to(CDT)
    if LOAD:
        v = tl.load(ptr + dd).to(CDT)
    return v


@triton.jit
def _s_recompute(h, A2, row, urow, t, p, L, u_ptr, dts_ptr, Bv, bias, DT_STORED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    # one step of the forward recurrence from the state h before it: (a h, the new state, a, u, dt);
    # step t lies at memory position p
    m = (row * 0 + t) < L  # a tensor mask (under the interpreter t is a Python int)
    u = tl.load(u_ptr + urow + p, mask=m, other=0.0).to(CDT)
    dt = _s_dt(dts_ptr, row + p, m, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
    a = tl.exp2(dt * A2)
    ah = a * h
    return ah, ah + (dt * u) * Bv, a, u, dt


@triton.jit
def _s_adjoint(
    g, ah, hh, a, u, dt, Bv, Cv, A, Dv, row, t, p, L, z_ptr, dout_ptr, du_ptr, ddt_ptr, dz_ptr, dA, dD, dbias,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr, SA: tl.constexpr,
):
    # one step of the adjoint recurrence, walking back: g carries a[t+1] q[t+1], so
    # q[t] = C[t] dy[t] + g and the next g = a[t] q[t]; returns g, the step's dB and dC terms (summed
    # over the channels by the caller) and the per-channel sums
    m = (row * 0 + t) < L
    dout = tl.load(dout_ptr + row + p, mask=m, other=0.0).to(CDT)
    if HAS_Z:
        zv = tl.load(z_ptr + row + p, mask=m, other=0.0).to(CDT)
        y = tl.expand_dims(_sum(hh * Cv, SA), SA)
        if HAS_D:
            y = y + u * Dv
        sig = 1.0 / (1.0 + tl.exp(-zv))
        tl.store(dz_ptr + row + p, (dout * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=m)
        dy = dout * zv * sig
    else:
        dy = dout
    q = dy * Cv + g
    g = a * q
    pB = q * (dt * u)
    pC = dy * hh
    sB = tl.expand_dims(_sum(q * Bv, SA), SA)
    x = q * ah  # d loss / d(dt * A)
    ddt = sB * u + tl.expand_dims(_sum(x * A, SA), SA)
    dA = dA + x * dt
    du = sB * dt
    if HAS_D:
        du = du + dy * Dv
        dD = dD + dy * u
    if SOFTPLUS:  # sigmoid(x) = 1 - exp(-softplus(x)); a series where that cancels
        ddt = ddt * tl.where(dt < 0.01, dt * (1.0 - dt * (0.5 - dt / 6.0)), 1.0 - tl.exp(-dt))
    ddt = tl.where(m, ddt, 0.0)
    dbias = dbias + ddt
    tl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(ddt_ptr + row + p, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
    return g, pB, pC, dA, dD, dbias


@triton.jit
def _s_block(
    g, dA, dD, dbias, A, Dv, bias, d0, pid_b, c, n_saved, dim, L, n_state, st_n, mask_n, slot, rv,
    B0, B1, B2, B3, C0, C1, C2, C3, B_ptr, b_full, tt, b_full3, mask_n3,
    u_ptr, dts_ptr, states_ptr, z_ptr, dout_ptr, du_ptr, ddt_ptr, dz_ptr,
    BD: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CDT: tl.constexpr, SAVE_EVERY: tl.constexpr, REV: tl.constexpr,
    DT_STORED: tl.constexpr, SA: tl.constexpr, VEC: tl.constexpr,
):
    # one block of BD channels through one 4-step chunk: the states from the stored state (advanced
    # over the chunks since it, when the forward stored every SAVE_EVERY-th), then the adjoint steps in
    # reverse
    dd = d0 + tl.expand_dims(tl.arange(0, BD), SA)
    nn = tl.expand_dims(tl.arange(0, BN), 1 - SA)
    row = (pid_b * dim + dd).to(tl.int64) * L
    urow = row
    if REV:
        urow = _rev_urow(pid_b, dim, d0, dd, slot, L)
    t0 = c * 4
    # st_n = 1, passed unspecialized: the state tile is then read in the compute layout, not as vectors
    h = tl.load(states_ptr + ((pid_b * n_saved + c // SAVE_EVERY) * dim + dd) * n_state + nn * st_n, mask=mask_n,
                other=0.0)
    A2 = A * _LOG2E
    if SAVE_EVERY > 1:
        for k in range(c - c % SAVE_EVERY, c):
            if VEC:  # B as one 4-step vector per state
                tk, mk = _s_fwd_pos(k, tt, L, rv, REV)
                Bk = tl.load(B_ptr + b_full3 + tk, mask=mask_n3 & mk, other=0.0).to(CDT)
                Bk0, Bk1, Bk2, Bk3 = _v_steps(Bk, rv, REV)
                _, h, _, _, _ = _s_recompute(h, A2, row, urow, k * 4, _rev_pos(k * 4, L, rv, REV), L, u_ptr,
                                             dts_ptr, Bk0, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
                _, h, _, _, _ = _s_recompute(h, A2, row, urow, k * 4 + 1, _rev_pos(k * 4 + 1, L, rv, REV), L, u_ptr,
                                             dts_ptr, Bk1, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
                _, h, _, _, _ = _s_recompute(h, A2, row, urow, k * 4 + 2, _rev_pos(k * 4 + 2, L, rv, REV), L, u_ptr,
                                             dts_ptr, Bk2, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
                _, h, _, _, _ = _s_recompute(h, A2, row, urow, k * 4 + 3, _rev_pos(k * 4 + 3, L, rv, REV), L, u_ptr,
                                             dts_ptr, Bk3, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
            else:
                for j in tl.static_range(4):
                    tk = k * 4 + j
                    pk = _rev_pos(tk, L, rv, REV)
                    Bk = _s_load_bc(B_ptr, b_full, tk, pk, L, mask_n, CDT)
                    _, h, _, _, _ = _s_recompute(h, A2, row, urow, tk, pk, L, u_ptr, dts_ptr, Bk, bias, DT_STORED,
                                                 HAS_BIAS, SOFTPLUS, CDT)
    p0 = _rev_pos(t0, L, rv, REV)
    p1 = _rev_pos(t0 + 1, L, rv, REV)
    p2 = _rev_pos(t0 + 2, L, rv, REV)
    p3 = _rev_pos(t0 + 3, L, rv, REV)
    ah0, h0, a0, u0, dt0 = _s_recompute(h, A2, row, urow, t0, p0, L, u_ptr, dts_ptr, B0, bias,
                                        DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
    ah1, h1, a1, u1, dt1 = _s_recompute(h0, A2, row, urow, t0 + 1, p1, L, u_ptr, dts_ptr, B1, bias,
                                        DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
    ah2, h2, a2, u2, dt2 = _s_recompute(h1, A2, row, urow, t0 + 2, p2, L, u_ptr, dts_ptr, B2, bias,
                                        DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
    ah3, h3, a3, u3, dt3 = _s_recompute(h2, A2, row, urow, t0 + 3, p3, L, u_ptr, dts_ptr, B3, bias,
                                        DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
    g, pB3, pC3, dA, dD, dbias = _s_adjoint(g, ah3, h3, a3, u3, dt3, B3, C3, A, Dv, row, t0 + 3, p3, L, z_ptr, dout_ptr,
                                            du_ptr, ddt_ptr, dz_ptr, dA, dD, dbias, HAS_D, HAS_Z, SOFTPLUS, CDT, SA)
    g, pB2, pC2, dA, dD, dbias = _s_adjoint(g, ah2, h2, a2, u2, dt2, B2, C2, A, Dv, row, t0 + 2, p2, L, z_ptr, dout_ptr,
                                            du_ptr, ddt_ptr, dz_ptr, dA, dD, dbias, HAS_D, HAS_Z, SOFTPLUS, CDT, SA)
    g, pB1, pC1, dA, dD, dbias = _s_adjoint(g, ah1, h1, a1, u1, dt1, B1, C1, A, Dv, row, t0 + 1, p1, L, z_ptr, dout_ptr,
                                            du_ptr, ddt_ptr, dz_ptr, dA, dD, dbias, HAS_D, HAS_Z, SOFTPLUS, CDT, SA)
    g, pB0, pC0, dA, dD, dbias = _s_adjoint(g, ah0, h0, a0, u0, dt0, B0, C0, A, Dv, row, t0, p0, L, z_ptr, dout_ptr,
                                            du_ptr, ddt_ptr, dz_ptr, dA, dD, dbias, HAS_D, HAS_Z, SOFTPLUS, CDT, SA)
    return g, dA, dD, dbias, pB0, pB1, pB2, pB3, pC0, pC1, pC2, pC3


@triton.jit
def _s_load_bc(ptr, off, t, p, L, mask_n, CDT: tl.constexpr):
    # step t of a B or C row, at memory position p
    return tl.load(ptr + off + p, mask=mask_n & (off * 0 + t < L), other=0.0).to(CDT)


@triton.jit
def _s_put(ptr, off, first, t, p, L, mask_n, val, ATOMIC: tl.constexpr, SA: tl.constexpr):
    # a time-varying dB / dC step, summed over the program's channels; written from the full-shape tile
    # (off, first: (BD, BN)), so that it keeps the compute layout: a store from every channel lane (the
    # same value to the same address), or an atomic from the first channel's lanes
    v = tl.expand_dims(_sum(val, 1 - SA), 1 - SA) + 0.0 * val
    if ATOMIC:
        tl.atomic_add(ptr + off + p, v, mask=first & mask_n & (off * 0 + t < L), sem="relaxed")
    else:
        tl.store(ptr + off + p, v, mask=mask_n & (off * 0 + t < L))


@triton.jit
def _bwd_local_kernel_s(
    A_ptr, C_ptr, z_ptr, dts_ptr, bias_ptr, dout_ptr, seg_g_ptr, seg_dt_ptr,
    dim, L, n_state, n_chunks, seg_chunks, n_segs, slot,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_Z: tl.constexpr, FP64: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, REV: tl.constexpr,
    DT_STORED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SA: tl.constexpr,
):
    # The backward's local pass over time segment s + 1 (s = program axis 2): the adjoint recurrence
    # g <- a[t] (C[t] dy[t] + g) walked back over the segment from g = 0, and the segment's summed dt.
    # Segment s's full backward then starts from g composed over the segments after it: each maps
    # its entering g to exp(A * sum dt) g + (its local g).
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    d0 = pid_d * BD
    dd = d0 + tl.expand_dims(tl.arange(0, BD), SA)  # the states on axis SA, as in the backward
    nn = tl.expand_dims(tl.arange(0, BN), 1 - SA)
    mask_n = nn < n_state
    A2 = tl.load(A_ptr + dd * n_state + nn, mask=mask_n, other=0.0).to(CDT) * _LOG2E
    bias = _s_channel(bias_ptr, dd, HAS_BIAS and not DT_STORED, CDT)
    row = (pid_b * dim + dd).to(tl.int64) * L
    rv = d0 < 0  # False
    if REV:
        rv = (d0 // slot) % 2 == 1
    c_full = pid_b * sc_batch + (d0 // dpg_c) * sc_group + nn * sc_n + 0 * dd
    c_lo = (pid_s + 1) * seg_chunks
    c_hi = tl.minimum(n_chunks, c_lo + seg_chunks)
    g = (dd * 0 + nn * 0).to(CDT)
    sdt = (dd * 0).to(CDT)
    for i in range(0, c_hi - c_lo):
        t0 = (c_hi - 1 - i) * 4
        for j in tl.static_range(4):
            t = t0 + 3 - j
            p = _rev_pos(t, L, rv, REV)
            m = (row * 0 + t) < L
            dy = tl.load(dout_ptr + row + p, mask=m, other=0.0).to(CDT)
            if HAS_Z:
                zv = tl.load(z_ptr + row + p, mask=m, other=0.0).to(CDT)
                dy = dy * zv / (1.0 + tl.exp(-zv))
            dt = _s_dt(dts_ptr, row + p, m, bias, DT_STORED, HAS_BIAS, SOFTPLUS, CDT)
            sdt += dt
            g = tl.exp2(dt * A2) * (dy * _s_load_bc(C_ptr, c_full, t, p, L, mask_n, CDT) + g)
    seg = (pid_b * (n_segs - 1) + pid_s) * dim + dd
    tl.store(seg_g_ptr + seg * n_state + nn, g, mask=mask_n)
    tl.store(seg_dt_ptr + seg, sdt)


@triton.jit
def _s_carry(q_ptr, seg_g_ptr, seg_dt_ptr, A, pid_b, pid_s, n_segs, dim, dd, n_state, nn, mask_n):
    # the adjoint g entering segment pid_s's backward (from its end): the gradient of last_state
    # carried back over the later segments' local passes
    g = tl.load(q_ptr + (pid_b * dim + dd) * n_state + nn, mask=mask_n, other=0.0)
    A2 = A * _LOG2E
    for i in range(0, n_segs - 1 - pid_s):
        seg = (pid_b * (n_segs - 1) + n_segs - 2 - i) * dim + dd  # local pass of segment n_segs - 1 - i
        g = tl.exp2(tl.load(seg_dt_ptr + seg) * A2) * g + tl.load(seg_g_ptr + seg * n_state + nn, mask=mask_n,
                                                                  other=0.0)
    return g


@triton.jit(do_not_specialize=["st_n"])
def _bwd_kernel_s(
    u_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    states_ptr, dts_ptr, dout_ptr, q_ptr, seg_g_ptr, seg_dt_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_state, n_chunks, n_saved, st_n, part_b, part_c, seg_chunks, n_segs, n_batch, slot,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr, B_ATOMIC: tl.constexpr, C_ATOMIC: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, NSUB: tl.constexpr, NUM_STAGES: tl.constexpr, SAVE_EVERY: tl.constexpr,
    REV: tl.constexpr, DT_STORED: tl.constexpr, SA: tl.constexpr, VEC: tl.constexpr,
):
    # "step" backward. Per-step (channels, states) tiles, the states on axis SA as in the forward (Triton 3.6 and 3.7+
    # give the lanes to different axes of equally contiguous loads and stores, such as the per-step dB / dC; with SA
    # by version every load and store takes the compute layout). Nothing has a time axis, so the layout is the same
    # everywhere (8 channel lanes x 4 state lanes, BN / 4 states in each thread) and both recurrences are plain
    # register updates: per 4-step chunk, the states are recomputed forward from the stored chunk state (a h[t-1]
    # formed directly, one exp per step) and the adjoint walks back. A program owns NSUB (1 or 2) blocks of BD
    # channels of one B and one C group; they share the B / C loads,
    # and their dB / dC terms are summed before the reduction over the channel lanes, which is stored
    # per step (or added with relaxed atomics when several programs share a group). The carries (the
    # adjoint g = a q, and the sums dA, dD, d delta_bias) stay in registers; q_ptr holds the gradient
    # of last_state (or zeros). Without atomics and with several programs in a group, each writes its
    # own partial dB / dC slab (part_b / part_c elements apart), summed afterwards.
    #
    # Time segments (grid axis 2): program s walks the chunks of segment s back, from the adjoint g
    # composed over the later segments (the local passes of _bwd_local_kernel_s, and the gradient of
    # last_state); the per-channel sums go to per-segment partials (n_batch x dim apart).
    #
    # REV: as in the forward, a program's blocks (one slot) of a backward scan read and write step t at
    # position L - 1 - t.
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    p0 = pid * NSUB * BD
    rv = p0 < 0  # False
    if REV:
        rv = (p0 // slot) % 2 == 1
    dl = tl.expand_dims(tl.arange(0, BD), SA)  # the states on axis SA (see _fwd_kernel_s)
    nn = tl.expand_dims(tl.arange(0, BN), 1 - SA)
    mask_n = nn < n_state
    b_off = pid_b * sb_batch + (p0 // dpg_b) * sb_group + nn * sb_n
    c_off = pid_b * sc_batch + (p0 // dpg_c) * sc_group + nn * sc_n
    b_full = b_off + 0 * dl  # B / C read and dB / dC written at the tiles' full shape: one layout
    c_full = c_off + 0 * dl
    b_put = b_full
    c_put = c_full
    b_put3 = tl.expand_dims(b_off, 2)  # (VEC) the states' offsets of dB / dC, without the channel axis
    c_put3 = tl.expand_dims(c_off, 2)
    if not B_ATOMIC:  # this program's partial slab
        b_part = ((p0 % dpg_b) // (NSUB * BD)).to(tl.int64) * part_b
        b_put = b_full + b_part
        b_put3 = b_put3 + b_part
    if not C_ATOMIC:
        c_part = ((p0 % dpg_c) // (NSUB * BD)).to(tl.int64) * part_c
        c_put = c_full + c_part
        c_put3 = c_put3 + c_part
    first = dl == 0
    # VEC: B and C read, and dB / dC written, per 4-step chunk as one contiguous vector per state (chunk tiles
    # with the time axis inside the thread, split into the per-step tiles and joined back)
    tt = tl.arange(0, 4)[None, None, :]
    nn3 = tl.expand_dims(nn, 2)
    mask_n3 = nn3 < n_state
    b_full3 = tl.expand_dims(b_full, 2)
    c_full3 = tl.expand_dims(c_full, 2)
    da = p0 + dl
    A_a = tl.load(A_ptr + da * n_state + nn * st_n, mask=mask_n, other=0.0).to(CDT)
    D_a = _s_channel(D_ptr, da, HAS_D, CDT)
    bias_a = _s_channel(bias_ptr, da, HAS_BIAS and not DT_STORED, CDT)
    g_a = _s_carry(q_ptr, seg_g_ptr, seg_dt_ptr, A_a, pid_b, pid_s, n_segs, dim, da, n_state, nn, mask_n)
    dA_a = (dl * 0 + nn * 0).to(CDT)
    dD_a = (dl * 0).to(CDT)
    db_a = (dl * 0).to(CDT)
    if NSUB == 2:
        db2 = p0 + BD + dl
        A_b = tl.load(A_ptr + db2 * n_state + nn * st_n, mask=mask_n, other=0.0).to(CDT)
        D_b = _s_channel(D_ptr, db2, HAS_D, CDT)
        bias_b = _s_channel(bias_ptr, db2, HAS_BIAS and not DT_STORED, CDT)
        g_b = _s_carry(q_ptr, seg_g_ptr, seg_dt_ptr, A_b, pid_b, pid_s, n_segs, dim, db2, n_state, nn, mask_n)
        dA_b = (dl * 0 + nn * 0).to(CDT)
        dD_b = (dl * 0).to(CDT)
        db_b = (dl * 0).to(CDT)
    c_lo = pid_s * seg_chunks
    c_hi = tl.minimum(n_chunks, c_lo + seg_chunks)
    for i in tl.range(0, c_hi - c_lo, num_stages=NUM_STAGES):
        c = c_hi - 1 - i
        t0 = c * 4
        q0 = _rev_pos(t0, L, rv, REV)
        q1 = _rev_pos(t0 + 1, L, rv, REV)
        q2 = _rev_pos(t0 + 2, L, rv, REV)
        q3 = _rev_pos(t0 + 3, L, rv, REV)
        if VEC:
            t3, m3 = _s_fwd_pos(c, tt, L, rv, REV)
            B0, B1, B2, B3 = _v_steps(tl.load(B_ptr + b_full3 + t3, mask=mask_n3 & m3, other=0.0).to(CDT), rv, REV)
            C0, C1, C2, C3 = _v_steps(tl.load(C_ptr + c_full3 + t3, mask=mask_n3 & m3, other=0.0).to(CDT), rv, REV)
        else:
            B0 = _s_load_bc(B_ptr, b_full, t0, q0, L, mask_n, CDT)
            B1 = _s_load_bc(B_ptr, b_full, t0 + 1, q1, L, mask_n, CDT)
            B2 = _s_load_bc(B_ptr, b_full, t0 + 2, q2, L, mask_n, CDT)
            B3 = _s_load_bc(B_ptr, b_full, t0 + 3, q3, L, mask_n, CDT)
            C0 = _s_load_bc(C_ptr, c_full, t0, q0, L, mask_n, CDT)
            C1 = _s_load_bc(C_ptr, c_full, t0 + 1, q1, L, mask_n, CDT)
            C2 = _s_load_bc(C_ptr, c_full, t0 + 2, q2, L, mask_n, CDT)
            C3 = _s_load_bc(C_ptr, c_full, t0 + 3, q3, L, mask_n, CDT)
        g_a, dA_a, dD_a, db_a, pB0, pB1, pB2, pB3, pC0, pC1, pC2, pC3 = _s_block(
            g_a, dA_a, dD_a, db_a, A_a, D_a, bias_a, p0, pid_b, c, n_saved, dim, L, n_state, st_n, mask_n, slot, rv,
            B0, B1, B2, B3, C0, C1, C2, C3, B_ptr, b_full, tt, b_full3, mask_n3,
            u_ptr, dts_ptr, states_ptr, z_ptr, dout_ptr, du_ptr, ddt_ptr, dz_ptr,
            BD, BN, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, CDT, SAVE_EVERY, REV, DT_STORED, SA, VEC)
        if NSUB == 2:
            g_b, dA_b, dD_b, db_b, qB0, qB1, qB2, qB3, qC0, qC1, qC2, qC3 = _s_block(
                g_b, dA_b, dD_b, db_b, A_b, D_b, bias_b, p0 + BD, pid_b, c, n_saved, dim, L, n_state, st_n, mask_n,
                slot, rv,
                B0, B1, B2, B3, C0, C1, C2, C3, B_ptr, b_full, tt, b_full3, mask_n3,
                u_ptr, dts_ptr, states_ptr, z_ptr, dout_ptr, du_ptr, ddt_ptr, dz_ptr,
                BD, BN, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, CDT, SAVE_EVERY, REV, DT_STORED, SA, VEC)
            pB0, pB1, pB2, pB3 = pB0 + qB0, pB1 + qB1, pB2 + qB2, pB3 + qB3
            pC0, pC1, pC2, pC3 = pC0 + qC0, pC1 + qC1, pC2 + qC2, pC3 + qC3
        if VEC:
            _v_put(dB_ptr, b_put3, t3, m3, mask_n3, pB0, pB1, pB2, pB3, rv, B_ATOMIC, REV, SA)
            _v_put(dC_ptr, c_put3, t3, m3, mask_n3, pC0, pC1, pC2, pC3, rv, C_ATOMIC, REV, SA)
        else:
            _s_put(dB_ptr, b_put, first, t0, q0, L, mask_n, pB0, B_ATOMIC, SA)
            _s_put(dB_ptr, b_put, first, t0 + 1, q1, L, mask_n, pB1, B_ATOMIC, SA)
            _s_put(dB_ptr, b_put, first, t0 + 2, q2, L, mask_n, pB2, B_ATOMIC, SA)
            _s_put(dB_ptr, b_put, first, t0 + 3, q3, L, mask_n, pB3, B_ATOMIC, SA)
            _s_put(dC_ptr, c_put, first, t0, q0, L, mask_n, pC0, C_ATOMIC, SA)
            _s_put(dC_ptr, c_put, first, t0 + 1, q1, L, mask_n, pC1, C_ATOMIC, SA)
            _s_put(dC_ptr, c_put, first, t0 + 2, q2, L, mask_n, pC2, C_ATOMIC, SA)
            _s_put(dC_ptr, c_put, first, t0 + 3, q3, L, mask_n, pC3, C_ATOMIC, SA)
    bda = (pid_s * n_batch + pid_b) * dim + da  # per-segment partials
    tl.store(dA_ptr + bda * n_state + nn, dA_a, mask=mask_n)
    if HAS_D:
        tl.store(dD_ptr + bda, dD_a)
    if HAS_BIAS:
        tl.store(dbias_ptr + bda, db_a)
    if NSUB == 2:
        bdb = (pid_s * n_batch + pid_b) * dim + db2
        tl.store(dA_ptr + bdb * n_state + nn, dA_b, mask=mask_n)
        if HAS_D:
            tl.store(dD_ptr + bdb, dD_b)
        if HAS_BIAS:
            tl.store(dbias_ptr + bdb, db_b)


@triton.jit
def _v_steps(x, rv, REV: tl.constexpr):
    # a chunk tile (P, Q, 4), in memory order, as its 4 per-step (P, Q) tiles in time order
    x0, x1, x2, x3 = _split4(x)
    if REV:
        x0, x1, x2, x3 = _flip4(x0, x1, x2, x3, rv)
    return x0, x1, x2, x3


@triton.jit
def _v_chunk(x0, x1, x2, x3, rv, REV: tl.constexpr):
    # 4 per-step tiles in time order as a chunk tile in memory order (the inverse of _v_steps)
    if REV:
        x0, x1, x2, x3 = _flip4(x0, x1, x2, x3, rv)
    return _join4(x0, x1, x2, x3)


@triton.jit
def _v_put(ptr, off3, o3, m3, mask_n3, p0, p1, p2, p3, rv, ATOMIC: tl.constexpr, REV: tl.constexpr,
           SA: tl.constexpr):
    # a chunk's time-varying dB / dC terms, summed over the program's channels, written as one 4-step vector
    # per state (off3: the states' offsets, no channel axis); relaxed atomics where programs share a group
    v = tl.expand_dims(_sum(_v_chunk(p0, p1, p2, p3, rv, REV), 1 - SA), 1 - SA)
    if ATOMIC:
        tl.atomic_add(ptr + off3 + o3, v, mask=mask_n3 & m3, sem="relaxed")
    else:
        tl.store(ptr + off3 + o3, v, mask=mask_n3 & m3)


@triton.jit
def _p_add(ptr, p0, v, L):
    # add the block's dB / dC terms v (BLOCK_L steps from position p0) with atomics. Tried and removed
    # (2026-12-07): for 16-bit inputs, adding each thread's 8 steps as two 4-step halves in the layout they
    # have (an atomic takes at most 128 bits a thread; Triton converts the whole vector to a 4-step layout
    # through shuffles). Offline sm_90 SASS of the state loop went 490 -> 433 instructions, but on an H100 the
    # backward got slower: b24 192 @ 4096 bf16 forward + backward 7.55 -> 10.30 ms (benchmarks/README.md)
    pos = p0 + tl.arange(0, v.shape[0])
    tl.atomic_add(ptr + pos, v, mask=(pos >= 0) & (pos < L), sem="relaxed")


@triton.jit
def _bwd_kernel_p(
    u_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, dts_ptr, dout_ptr, q_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, L, n_state, n_saved, slot,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FP64: tl.constexpr,
    BDP: tl.constexpr, BLOCK_L: tl.constexpr, SAVE_STEPS: tl.constexpr, REV: tl.constexpr, RVK: tl.constexpr,
):
    # "parallel" backward of the step forward (time-varying B and C, dt stored, no z): the time axis across
    # the threads, the states one after another. A program owns BDP channels of one batch element and walks
    # the sequence back in blocks of BLOCK_L steps, a (BDP, BLOCK_L) tile each in memory order, with each
    # thread holding BLOCK_L / (32 * warps) consecutive positions. Per state n: the block's states from the
    # stored state entering it (the forward stores one every SAVE_STEPS steps; BLOCK_L is a multiple of it)
    # by one scan, the adjoint q[t] = C[t] dy[t] + a[t+1] q[t+1] by a scan the other way from the adjoint
    # entering from the later block (q_ptr, two slots; this block's first step is written to the other),
    # and their gradient terms: du / ddt summed over the states in registers (no reductions), dA as a sum
    # over the block's steps, dB / dC summed over the program's channels and added with atomics (the
    # channels of a group are in many programs). a[t] h[t-1] is formed as h[t] - dt B u, as in mamba-ssm's
    # backward.
    #
    # REV (the bidirectional mode): the forward slots and the backward slots are two launches (RVK 0 / 1;
    # grid axis 0 over the slots' channels). A backward slot's step t lies at memory position L - 1 - t, so
    # its blocks are read in memory order too (vector loads) and scanned the other way: the states by a
    # reverse scan, the adjoint by a forward one, a[t+1] one position down.
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    FWD_REVERSE: tl.constexpr = RVK == 1  # the states' scan runs down the memory positions
    ADJ_REVERSE: tl.constexpr = RVK == 0  # the adjoint's
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BDP
    if REV:  # channel i of the RVK-th slot of each pair
        d0 = (d0 // slot) * 2 * slot + RVK * slot + d0 % slot
    dd = d0 + tl.arange(0, BDP)[:, None]  # (BDP, 1)
    ti = tl.arange(0, BLOCK_L)[None, :]  # (1, BLOCK_L)
    row = (pid_b * dim + dd).to(tl.int64) * L
    urow = row
    if REV:
        urow = _rev_urow(pid_b, dim, d0, dd, slot, L)
    b_base = pid_b * sb_batch + (d0 // dpg_b) * sb_group
    c_base = pid_b * sc_batch + (d0 // dpg_c) * sc_group
    qrow = (pid_b * dim + dd) * n_state
    q_slot = tl.num_programs(1) * dim * n_state
    Dv = _s_channel(D_ptr, dd, HAS_D, CDT)
    nidx = tl.arange(0, 32)[None, :]  # the dA accumulator's state columns (n_state <= 32)
    dA_acc = (dd * 0 + nidx * 0).to(CDT)
    dD_acc = (dd * 0).to(CDT)
    db_acc = (dd * 0).to(CDT)
    n_blocks = (L + BLOCK_L - 1) // BLOCK_L
    for i in range(0, n_blocks):
        k = n_blocks - 1 - i  # the block of steps [k BLOCK_L, (k + 1) BLOCK_L)
        if RVK:  # at positions L - (k + 1) BLOCK_L + ti; step k BLOCK_L is the last of them
            p0 = L - (k + 1) * BLOCK_L
            p = p0 + ti
            t = L - 1 - p
            m = p >= 0
            pn = p - 1
            mn = pn >= 0
        else:
            p0 = k * BLOCK_L
            p = p0 + ti
            t = p
            m = p < L
            pn = p + 1
            mn = pn < L
        u = tl.load(u_ptr + urow + p, mask=m, other=0.0).to(CDT)
        dt = tl.load(dts_ptr + row + p, mask=m, other=0.0)
        dtn = tl.load(dts_ptr + row + pn, mask=mn, other=0.0)  # the next step's; 0 past the end: a = 1 there
        dy = tl.load(dout_ptr + row + p, mask=m, other=0.0).to(CDT)
        dtu = dt * u
        gB = dt * 0.0  # sum_n q B
        gX = dt * 0.0  # sum_n A q a h[t-1]
        first = t == k * BLOCK_L
        # two slots of adjoints (batch x dim x N apart): this block reads slot (k + 1) % 2 and writes its own
        # first step's to slot k % 2, so no thread overwrites a carry another one has still to read
        q_in = qrow + ((k + 1) % 2) * q_slot
        q_out = qrow + (k % 2) * q_slot
        sidx = ((pid_b * n_saved + (k * BLOCK_L) // SAVE_STEPS) * dim + dd) * n_state
        tl.debug_barrier()  # the adjoints written back by the last block
        for n in range(0, n_state):
            A_n = tl.load(A_ptr + dd * n_state + n).to(CDT)
            A2 = A_n * _LOG2E
            Bn = tl.load(B_ptr + b_base + n * sb_n + p, mask=m, other=0.0).to(CDT)
            Cn = tl.load(C_ptr + c_base + n * sc_n + p, mask=m, other=0.0).to(CDT)
            a = tl.exp2(A2 * dt)
            an = tl.exp2(A2 * dtn)
            bu = Bn * dtu
            P, hl = tl.associative_scan((a, bu), axis=1, combine_fn=_combine, reverse=FWD_REVERSE)
            h = hl + P * tl.load(states_ptr + sidx + n)
            S, ql = tl.associative_scan((an, dy * Cn), axis=1, combine_fn=_combine, reverse=ADJ_REVERSE)
            q = ql + S * tl.load(q_ptr + q_in + n)
            # the first step's adjoint, picked out by a sum (a masked store of the tile would take a layout
            # of its own: a conversion of the whole tile through shared memory)
            tl.store(q_ptr + q_out + n, _sum(tl.where(first, q, 0.0), 1)[:, None])
            gB += q * Bn
            x = q * (h - bu)  # q a h[t-1]
            gX += A_n * x
            dA_acc += tl.where(nidx == n, _sum(x * dt, 1)[:, None], 0.0)
            _p_add(dB_ptr + b_base + n * sb_n, p0, _sum(q * dtu, 0), L)
            _p_add(dC_ptr + c_base + n * sc_n, p0, _sum(dy * h, 0), L)
        du = dt * gB
        if HAS_D:
            du += Dv * dy
            dD_acc += _sum(dy * u, 1)[:, None]
        ddt = u * gB + gX
        if SOFTPLUS:  # sigmoid(x) = 1 - exp(-softplus(x)); a series where that cancels
            ddt = ddt * tl.where(dt < 0.01, dt * (1.0 - dt * (0.5 - dt / 6.0)), 1.0 - tl.exp(-dt))
        ddt = tl.where(m, ddt, 0.0)
        db_acc += _sum(ddt, 1)[:, None]
        tl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddt_ptr + row + p, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
    bd = pid_b * dim + dd
    tl.store(dA_ptr + bd * n_state + nidx, dA_acc, mask=nidx < n_state)
    if HAS_D:
        tl.store(dD_ptr + bd, dD_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + bd, db_acc)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def pick_config(kind: str, dim: int, length: int, n_state: int, group_dims: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps) for the forward (``kind='fwd'``) or backward kernel.

    ``group_dims`` is the number of channels that share one B/C group (``dim`` when B and C are fixed):
    a channel block never straddles two groups.
    """
    if kind in CONFIG_OVERRIDE:
        bd, bl, nw = CONFIG_OVERRIDE[kind]
        return _pow2_divisor(group_dims, bd), bl, nw
    # the fastest forward+backward measured on an H100 (benchmarks/README.md): (4, 64, 4) at N=16
    # (fixed B or C). At N=1, one-warp programs of 4 channels (compare_scan.py --tile --tile-configs,
    # MSVM-UNet's training scans at batch 32, 2026-12-06): chunks of 64 steps for L 3136 and 784, of 32
    # for L 196 and 49; bf16 fwd+bwd 1.80 -> 0.88 ms at 96 @ 3136, 0.47 -> 0.28 at 384 @ 196 against the
    # 4-warp (8, 32, 4) / 8-warp (32, 16, 8) tiles measured on the issue's batch-16 shapes before (N 2-4
    # and fixed B or C below N = 8 take the same, unmeasured)
    bn = triton.next_power_of_2(n_state)
    if bn >= 8:
        bd, bl, nw = 4, 64, 4
    else:
        bd, bl, nw = (4, 64, 1) if length > 512 else (4, 32, 1)
    bd = _pow2_divisor(group_dims, bd)
    bl = min(bl, max(16, triton.next_power_of_2(length)))
    return bd, bl, nw


def _bc_layout(x: torch.Tensor, dim: int, strided: bool = False):
    """(tensor, fixed, batch stride, group stride, n stride, channels per group) of a B or C input.

    With ``strided``, a time-varying input whose steps are adjacent (a slice of the projections'
    output) is read in place; otherwise it is made contiguous (the backward's gradient buffers share
    the input's strides).
    """
    if x.dim() == 2:
        return x.contiguous(), True, 0, 0, 0, dim
    if not (strided and x.stride(-1) == 1):
        x = x.contiguous()
    if x.dim() == 3:  # (batch, N, L): one group
        return x, False, x.stride(0), 0, x.stride(1), dim
    return x, False, x.stride(0), x.stride(1), x.stride(2), dim // x.shape[1]


def _group_dims(dim: int, *dpgs: int) -> int:
    g = dim
    for d in dpgs:
        g = math.gcd(g, d)
    return g


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# (BLOCK_L, LN, NW, max channel blocks per backward program) of the time-in-thread kernels, by the
# padded state count; LN lanes share a channel's states, so a thread holds BLOCK_L x (N / LN) values
# of each tile. N = 16: the fastest forward + backward over three SS2D shapes of the sweep in
# benchmarks/gpu/compare_scan.py on an H200 (benchmarks/README.md); N = 8 and 32 use it unmeasured.
TIME_IN_THREAD_CONFIG = {8: (8, 4, 1, 8), 16: (8, 4, 1, 8), 32: (8, 4, 1, 8)}


def _time_in_thread_config(dim, n_state, gdims, batch, any_fixed, device):
    """Launch parameters of the time-in-thread kernels, or None where they do not apply.

    They apply to time-varying B and C with 8 <= N <= 32 (padded; the N = 16 SS2D scans) when a block
    of ``NW * 32 / LN`` channels fits a group. Returns dict(BLOCK_L, LN, NW, n_sub, BDP) where
    ``n_sub`` is how many channel blocks one backward program walks: the most, up to the cap, that
    keeps at least five one-warp programs per multiprocessor (fewer programs then share each dB / dC
    element's atomics, but the sequential work per program grows).
    """
    bn = triton.next_power_of_2(n_state)
    if any_fixed or bn < 8 or bn > 32 or CONFIG_OVERRIDE.get("path") == "tile":
        return None
    bl, ln, nw, cap = CONFIG_OVERRIDE.get("time", TIME_IN_THREAD_CONFIG[bn])
    ln = min(ln, bn)
    bdp = nw * (32 // ln)
    if gdims % bdp:
        bdp_small = 32 // ln  # one warp
        if gdims % bdp_small:
            return None
        nw, bdp = 1, bdp_small
    blocks = gdims // bdp  # channel blocks per group
    target = CONFIG_OVERRIDE.get("min_programs", 5 * _sm_count(device))
    n_sub = 1
    for k in range(1, min(cap, blocks) + 1):
        if blocks % k == 0 and (dim // (k * bdp)) * batch >= target:
            n_sub = k
    return dict(BLOCK_L=bl, LN=ln, NW=nw, n_sub=n_sub, BDP=bdp)


# The step kernels' channel blocks per backward program (1 or 2), how the time-varying dB / dC of a
# group that several programs share is summed ("atomic": relaxed float atomics; "partial": one slab
# per program, summed afterwards), the chunk loops' software-pipelining stages (Triton's cp.async
# prefetch) and how often the forward stores the state (every "save_every"-th 4-step chunk; the
# backward advances it over the chunks in between). Chosen on an H200 over the issue's N = 16 shapes
# (benchmarks/README.md): 2 blocks and partials were fastest; 2 or 3 stages made the forward 2.6-3x
# slower; storing every 2nd chunk costs 6 % of the scan time against every chunk and halves the
# states' memory (Mamba-HUNet training peak 18.5 instead of 22.6 GiB in float32).
# Time segments: where the channels give fewer one-warp programs than "seg_fwd" (forward) or
# "seg_bwd" (backward) per multiprocessor, the sequence is split into 2, 4, ... segments of at least
# "min_seg_fwd" / "min_seg" chunks, each its own program, after a local pass over the segments, until
# "seg_fwd_aim" / "seg_bwd" programs per multiprocessor: a small batch, as in inference (H200, batch 1,
# 192 @ 4096 N 16: forward 0.83 -> 0.26 ms, 192 @ 12544: 2.54 -> 0.35). At training batches
# splitting costs more than it gains (batch 16, 192 @ 3136: forward 0.86 -> 1.25 ms with 2
# segments), hence the low thresholds; once splitting, the forward aims higher (12 instead of 6 per
# multiprocessor, segments of 16 chunks: MSSMamba's one-slice scans, graphed, bf16: 192 @ 12544
# 0.253 -> 0.205 ms, 384 @ 3136 0.121 -> 0.104, 768 @ 784 0.060 -> 0.053; float32 0.335 -> 0.224,
# 0.165 -> 0.114, 0.070 -> 0.054; benchmarks/gpu/bench_batch1_scan.py). "segs_fwd" / "segs_bwd"
# (> 0) force a count.
# "small_n": the step kernels for N < 8 too (MSVM-UNet's N = 1), in blocks of 32 / N channels, so that a
# warp's lanes hold one (channel, state) pair each; off, the tile kernels take N < 8: at MSVM-UNet's
# batch-32 scans on an H100 the step kernels were 2.3-4x slower (fwd+bwd, every variant) and its
# training 11-21 % slower (benchmarks/README.md).
# "bd_fwd" / "bd_bwd": channels per block of the forward / backward at N >= 8 (one warp: 8 channel lanes x
# 4 state lanes at 8 x 16). Swept on an H100 at Mamba-HUNet's and MSSMamba's N = 16 training scans
# (benchmarks/gpu/compare_scan.py --step-blocks): 8-channel blocks, 2 per backward program, were fastest
# overall (weighted by the networks' blocks: forward 35.6 against 54.7 / 100.3 ms for 4 / 2 channels,
# backward 117.8 against 142.1 for 4 x 2 and 142.2 for 8 x 1); smaller blocks give more programs but
# repeat every per-channel load and per-state reduction in more lanes.
# "store_dt": the forward stores dt (after bias and softplus, float32) for the backward; off, the
# backward recomputes it from delta. Off saves 4 bytes per channel and step (Mamba-HUNet bf16 training:
# 12.1 -> 10.2 GiB) but the softplus per step made the backward 30-40 % slower and training 24 % slower
# (203.0 -> 153.8 images/s, H100): kept on.
# "state_axis": the step kernels' state axis (see _fwd_kernel_s): None picks it by the Triton version
# (_STATE_AXIS); 0 or 1 force it (tests run both). "prefetch_fwd": the forward loads each chunk's
# inputs one iteration ahead, in registers (Triton's own pipelining, "stages_fwd", stages them in shared
# memory); on an H100 (Triton 3.6) within 5 % either way at most N = 16 scans, 7-11 % faster at the
# longest (MSSMamba's 192 @ 12544 bf16, b24 192 @ 4096 fp32), 10 % slower at b16 192 @ 3136 fp32.
# "fwd_maxnreg": a register cap for the forward (Triton's maxnreg) to keep more programs resident; 104
# was slower at every shape measured (fp32 spills), and 112 (bf16 fits Mamba-HUNet's stage 1 in one wave)
# was within 1 % in bf16 and 3-28 % slower in fp32 (H100, 2026-12-07), so None: no cap.
# "bwd_maxnreg": the same for the backward. At 255 registers 8 one-warp programs fit a multiprocessor,
# and Mamba-HUNet's stage-1 backward (b24, 768 channels, 2 blocks of 8 a program: 1152 programs) is
# 1.09 waves on 132 (Nsight Compute, H100: SM active 77 % of the kernel's cycles); 224 fits 9 (bf16 compiles
# without spills, fp32 spills 48 bytes; offline sm_90). Timed on an H100 (2026-12-07, scalar backward):
# forward + backward 0-6 % slower at the nine N = 16 training scans, so None.
# "bwd_vec": the backward reads B and C, and writes the per-program dB / dC, as one 4-step vector per
# state (chunk tiles split into the per-step tiles and joined back), as the forward reads them, instead
# of one scalar access per state and step. Nsight Compute on the scalar backward (H100, b24 192 @ 4096
# bf16): L1/TEX 76 % busy, 56 % of global sectors excess, 39 % of the stall cycles waiting on L1/TEX
# loads. Offline sm_90 SASS of the loop (Triton 3.6): bf16 1647 -> 1472 instructions, fp32 1465 -> 1323,
# loads 128 -> 80, stores 48 -> 20, no spills. H100 (2026-12-07, compare_scan.py --step-variants --graphs):
# forward + backward 10-26 % faster at all nine N = 16 training scans (b24 192 @ 4096 bf16 10.78 -> 9.61 ms,
# b10 192 @ 12544 bf16 14.04 -> 10.36, fp32 14.73 -> 11.43), Mamba-HUNet bf16 graphed training 189.5 ->
# 200.5 images/s: on.
# Tried and removed (2026-12-07): B and C copied chunk-interleaved, (batch, groups, L / 4, N, 4), so that a
# 4-step chunk of all states is one contiguous run (a quarter of the sectors of those loads). On an H100 it
# was slower everywhere: forward 1.86 -> 2.25 ms and forward + backward (vector backward) 9.61 -> 14.61 ms at
# b24 192 @ 4096 bf16, Mamba-HUNet training 200.5 -> 158.1 images/s, a batch-1 MSSMamba slice 5.00 -> 5.60
# ms (benchmarks/README.md, "Step-kernel candidates timed").
# bwd_par (written 2026-12-07): the parallel backward _bwd_kernel_p instead of the step backward: "auto" (the
# default) where _par_wins on CUDA, True everywhere it applies, False never; par_bdp / par_block / par_warps /
# par_steps: its channels per program, block length, warps (0: par_block / (32 par_steps)). H100, plain mode,
# forward + backward at one-warp 256-step blocks: b24 192 @ 4096 bf16 9.71 -> 7.55 ms, fp32 10.44 -> 7.56,
# b24 384 @ 1024 bf16 3.93 -> 3.65, b10 192 @ 12544 bf16 10.35 -> 9.08, but slower at L <= 784 and at b10
# 384 @ 3136 (4.53 -> 4.83). In the networks (the bidirectional mode, backward slots read in memory order),
# bf16 graphed training: Mamba-HUNet 200.3 -> 210.3 images/s with "auto", MSSMamba 91.1 -> 90.1 with its
# level 1 taken, which the rule now leaves to the step backward (benchmarks/README.md, "The parallel backward").
STEP_CONFIG = {"nsub": 2, "dbc": "partial", "stages_fwd": 1, "stages_bwd": 1, "save_every": 2,
               "seg_fwd": 6, "seg_fwd_aim": 12, "seg_bwd": 4, "min_seg_fwd": 16, "min_seg": 32,
               "segs_fwd": 0, "segs_bwd": 0, "small_n": False, "bd_fwd": 8, "bd_bwd": 8,
               "store_dt": True, "state_axis": None, "prefetch_fwd": True, "fwd_maxnreg": None,
               "bwd_maxnreg": None, "bwd_vec": True, "bwd_par": "auto", "par_bdp": 1, "par_block": 256,
               "par_warps": 0, "par_steps": 8}


def _triton_version() -> tuple[int, int]:
    parts = []
    for x in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in x if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# Where two axes of a load are equally contiguous, Triton 3.6's coalescing gives the lanes to the first
# one and 3.7 onwards to the last (found from offline sm_90 compiles of the step forward with 3.6.0,
# 3.7.1, 3.8.0 and 3.9.0): the step kernels' tiles put the channels on that axis
_STATE_AXIS = 1 if _triton_version() < (3, 7) else 0


def _segments(n_chunks: int, programs: int, target: int, min_chunks: int, every: int, forced: int = 0,
              aim: int = 0):
    """(segments, chunks per segment): where ``programs`` is below ``target``, the fewest power-of-two
    segments (``forced`` if > 0) that bring it to ``max(target, aim)``, each at least ``min_chunks``
    chunks, a multiple of ``every``."""
    s = forced
    if s <= 0:
        s = 1
        goal = max(target, aim) if programs < target else 0
        while programs * s < goal and n_chunks >= 2 * s * min_chunks:
            s *= 2
    per = triton.cdiv(triton.cdiv(n_chunks, s), every) * every
    return triton.cdiv(n_chunks, per), per


def _par_wins(programs: int, length: int, sms: int) -> bool:
    """Whether the parallel backward beats the step backward (``programs`` one-warp programs) at sequence
    length ``length`` on ``sms`` multiprocessors (``_par_config``'s rule)."""
    if length < 1024:
        return False
    waves = programs / (8 * sms)
    return 235.0 * (waves / math.ceil(waves)) < 210.0


def _par_config(scfg, dim, length, n_state, has_z, batch, device):
    """(channels per program, block length, warps) of the parallel backward (``_bwd_kernel_p``) for a
    scan the step forward ran, or None where the step backward runs: ``STEP_CONFIG["bwd_par"]`` False,
    z, dt not stored, more than 32 states, time segments, or blocks that do not fit the stored states'
    spacing. ``True`` forces it; ``"auto"`` (the default) takes it on CUDA where the step backward would
    fill the GPU badly.

    The rule comes from the H100 timings of 2026-12-07 (plain mode): the parallel backward does about 210 G
    state-steps a second at L >= 1024 whatever the grid; the step backward's one-warp programs (8 a
    multiprocessor at 255 registers) about 235 G in whole waves, times the used fraction of its last wave.
    So: L >= 1024 and ``235 * fill < 210``. In plain mode the step backward is also about 15 % slower with
    one block a program, which made MSSMamba's level 1 (fill 0.91) a win there, but MSSMamba's training (the
    bidirectional mode) was 1 % slower with it, so that case is left to the step backward.
    """
    conf = dict(STEP_CONFIG, **CONFIG_OVERRIDE.get("step", {}))
    mode = conf["bwd_par"]
    if not mode or has_z or not scfg["store_dt"] or n_state > 32 or scfg["segs_bwd"] > 1:
        return None
    if mode == "auto" and (device.type != "cuda" or not _par_wins(batch * dim // (scfg["NSUB"] * scfg["BD_bwd"]),
                                                                  length, _sm_count(device))):
        return None
    bdp = conf["par_bdp"]
    block_l = min(conf["par_block"], max(32, triton.next_power_of_2(length)))
    save_steps = 4 * scfg["save_every"]
    if dim % bdp or block_l % save_steps or scfg["BD_bwd"] % bdp:
        return None
    warps = conf["par_warps"] or max(1, min(8, block_l // (32 * conf["par_steps"])))
    return bdp, block_l, warps


def _step_config(dim, length, n_state, gdims, batch, any_fixed, spatial, device):
    """Launch parameters of the step kernels, or None where they do not apply.

    They apply to time-varying B and C with 8 <= N <= 32 (padded) in the plain (not fused cross-scan)
    mode, when the channel blocks (``STEP_CONFIG`` ``bd_fwd`` / ``bd_bwd``, 8) fit the groups; with
    ``STEP_CONFIG["small_n"]`` (or the path override ``"step"``) also to N < 8, in blocks of 32 / N
    channels. Returns dict(BD, BD_bwd, NSUB, SA, prefetch_fwd, fwd_maxnreg, bwd_maxnreg, bwd_vec,
    store_dt, dbc, stages_fwd, stages_bwd, save_every, segs_fwd, seg_chunks_fwd, segs_bwd, seg_chunks_bwd).
    ``NSUB`` is 2 where two blocks fit a group and the grid keeps at least ``min_programs`` (default 5 per
    multiprocessor) programs, else 1.
    """
    bn = triton.next_power_of_2(n_state)
    path = CONFIG_OVERRIDE.get("path")
    conf = dict(STEP_CONFIG, **CONFIG_OVERRIDE.get("step", {}))
    small = bn < 8 and (conf["small_n"] or path == "step")  # N < 8: one (channel, state) pair per lane
    bd, bdb = (32 // bn, 32 // bn) if small else (conf["bd_fwd"], conf["bd_bwd"])
    if (any_fixed or spatial or (bn < 8 and not small) or bn > 32 or path in ("tile", "time") or gdims % bd
            or gdims % bdb):
        return None
    nsub = conf["nsub"]
    sms = _sm_count(device)
    target = CONFIG_OVERRIDE.get("min_programs", 5 * sms)
    if nsub == 2 and (gdims % (2 * bdb) or (dim // (2 * bdb)) * batch < target):
        nsub = 1
    n_chunks = triton.cdiv(length, 4)
    every = conf["save_every"]
    gpu = device.type == "cuda"  # under the interpreter (tests): only forced counts
    segs_f, per_f = _segments(n_chunks, (dim // bd) * batch, conf["seg_fwd"] * sms * gpu, conf["min_seg_fwd"],
                              every, conf["segs_fwd"], conf["seg_fwd_aim"] * sms * gpu)
    segs_b, per_b = _segments(n_chunks, (dim // (nsub * bdb)) * batch, conf["seg_bwd"] * sms * gpu,
                              conf["min_seg"], every, conf["segs_bwd"])
    sa = _STATE_AXIS if conf["state_axis"] is None else conf["state_axis"]
    return dict(BD=bd, BD_bwd=bdb, NSUB=nsub, SA=sa, prefetch_fwd=conf["prefetch_fwd"], fwd_maxnreg=conf["fwd_maxnreg"],
                bwd_maxnreg=conf["bwd_maxnreg"], bwd_vec=conf["bwd_vec"],
                store_dt=conf["store_dt"], dbc=conf["dbc"], stages_fwd=conf["stages_fwd"],
                stages_bwd=conf["stages_bwd"], save_every=every, segs_fwd=segs_f, seg_chunks_fwd=per_f,
                segs_bwd=segs_b, seg_chunks_bwd=per_b)


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd function of both kernel families; ``spatial=(H, W)`` is the fused cross-scan mode.

    Fused, ``u`` is the ``(batch, d, H * W)`` map in row-major order and every other per-step input
    (``delta``, ``z``, ``B``, ``C``) and the output hold the four directions' values at the map's
    positions (``(batch, 4 * d, H * W)``; groups ``(batch, 4 * g, N, H * W)``): the kernels read and
    write position ``_pos(t, k)`` at step ``t`` of direction ``k``. ``du`` is summed over the
    directions.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, spatial=None,
                rev_slot=0):
        batch, dim, length = delta.shape
        u_dim = u.shape[1]
        n_state = A.shape[1]
        fp64 = u.dtype == torch.float64
        cdt = torch.float64 if fp64 else torch.float32
        u, delta = u.contiguous(), delta.contiguous()
        A = A.contiguous()
        z = z.contiguous() if z is not None else None
        save = any(ctx.needs_input_grad[:8])
        Bc, b_fixed, sbb, sbg, sbn, dpg_b = _bc_layout(B, dim, strided=not save)
        Cc, c_fixed, scb, scg, scn, dpg_c = _bc_layout(C, dim, strided=not save)
        gdims = _group_dims(dim, *([] if b_fixed else [dpg_b]), *([] if c_fixed else [dpg_c]), u_dim,
                            *([rev_slot] if rev_slot else []))
        height, width = spatial if spatial is not None else (1, length)
        geometry = (u_dim, height, width)
        strides = (sbb, sbg, sbn, dpg_b, scb, scg, scn, dpg_c)
        pcfg = None
        if not (rev_slot or b_fixed or c_fixed) and _plane_path_allowed(spatial is not None):
            pcfg = _plane.plane_config(dim, u_dim, length, n_state, gdims, spatial, CONFIG_OVERRIDE.get("plane"))
        scfg = None if pcfg is not None else _step_config(dim, length, n_state, gdims, batch, b_fixed or c_fixed,
                                                          spatial is not None, u.device)
        if rev_slot and scfg is None:
            raise ValueError("SelectiveScanTriton: the bidirectional mode needs the step kernels (time-varying B "
                             f"and C, 8 <= N <= 32, slots of a multiple of 8 channels); got N = {n_state}, "
                             f"slot {rev_slot}")
        tcfg = None
        if scfg is None and pcfg is None:
            tcfg = _time_in_thread_config(dim, n_state, gdims, batch, b_fixed or c_fixed, u.device)
        bn = triton.next_power_of_2(n_state)
        opts = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                    SOFTPLUS=bool(delta_softplus), SAVE_STATES=save, FP64=fp64, SPATIAL=spatial is not None)
        dummy = u
        optional = (D if D is not None else dummy, z if z is not None else dummy,
                    delta_bias if delta_bias is not None else dummy)
        if pcfg is not None:  # nothing saved but the inputs: the backward recomputes the forward
            out, last = _plane.plane_fwd(u, delta, A, Bc, Cc, D, z, delta_bias, delta_softplus, return_last_state,
                                         spatial, strides, pcfg, cdt)
            bl, saved = length, ()
        else:  # outputs allocated here (the plane kernels allocate their own: a summed one when fused)
            out = torch.empty_like(delta, dtype=u.dtype)
            last = torch.empty(batch, dim, n_state, dtype=cdt, device=u.device)
            if scfg is not None:
                bl, every = 4, scfg["save_every"]
                n_chunks = triton.cdiv(length, bl)
                n_saved = triton.cdiv(n_chunks, every)
                states = torch.empty(batch, n_saved, dim, n_state, dtype=cdt, device=u.device) if save else last
                store_dt = save and scfg["store_dt"]
                dts = torch.empty(batch, dim, length, dtype=cdt, device=u.device) if store_dt else last
                step_opts = {k: v for k, v in opts.items() if k != "SPATIAL"}
                segs, per = scfg["segs_fwd"], scfg["seg_chunks_fwd"]
                if segs > 1:
                    seg_h = torch.empty(batch, segs - 1, dim, n_state, dtype=cdt, device=u.device)
                    seg_dt = torch.empty(batch, segs - 1, dim, dtype=cdt, device=u.device)
                else:  # not read with one segment
                    seg_h = seg_dt = last
                for local in ([True] if segs > 1 else []) + [False]:
                    _fwd_kernel_s[(dim // scfg["BD"], batch, segs - 1 if local else segs)](
                        u, delta, A, Bc, Cc, *optional, out, last, states, dts, seg_h, seg_dt,
                        dim, length, n_state, n_chunks, n_saved, 1, per, segs, rev_slot, *strides,
                        **step_opts, BD=scfg["BD"], BN=bn, NUM_STAGES=scfg["stages_fwd"], SAVE_EVERY=every,
                        LOCAL=local, REV=bool(rev_slot), STORE_DT=store_dt, SA=scfg["SA"],
                        PREFETCH=scfg["prefetch_fwd"],
                        num_warps=1, **({"maxnreg": scfg["fwd_maxnreg"]} if scfg["fwd_maxnreg"] else {}),
                    )
                saved = (states, dts)
            elif tcfg is not None:
                bl, ln, nw = tcfg["BLOCK_L"], tcfg["LN"], tcfg["NW"]
                n_chunks = triton.cdiv(length, bl)
                states = torch.empty(batch, n_chunks, dim, n_state, dtype=cdt, device=u.device) if save else last
                dts = torch.empty(batch, dim, length, dtype=cdt, device=u.device) if save else last
                _fwd_kernel_t[(dim // tcfg["BDP"], batch)](
                    u, delta, A, Bc, Cc, *optional, out, last, states, dts,
                    dim, length, n_state, n_chunks, *geometry, *strides, **opts,
                    BLOCK_L=bl, BNR=bn // ln, LN=ln, NW=nw, BD8=32 // ln, num_warps=nw,
                )
                saved = (states, dts)
            else:
                bd, bl, nw = pick_config("fwd", dim, length, n_state, gdims)
                n_chunks = triton.cdiv(length, bl)
                states = torch.empty(batch, dim, n_chunks, n_state, dtype=cdt, device=u.device) if save else last
                _fwd_kernel[(triton.cdiv(dim, bd), batch)](
                    u, delta, A, Bc, Cc, *optional, out, last, states,
                    dim, length, n_state, n_chunks, *geometry, *strides, **opts, B_FIXED=b_fixed, C_FIXED=c_fixed,
                    BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl, num_warps=nw,
                )
                saved = (states,)
        if save:
            # delta itself only where the backward reads it: the step kernels with dt stored and the
            # time-in-thread kernels read the stored dt instead (2-4 bytes per channel and step less)
            keep_delta = tcfg is None and (scfg is None or not scfg["store_dt"])
            ctx.save_for_backward(u, delta if keep_delta else None, A, B, C, D, z, delta_bias, *saved)
            ctx.delta_meta = (tuple(delta.shape), delta.dtype)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.fwd_chunk = bl
            ctx.tcfg = tcfg
            ctx.scfg = scfg
            ctx.pcfg = pcfg
            ctx.geometry = geometry
            ctx.spatial = spatial is not None
            ctx.rev_slot = rev_slot
        if not return_last_state:
            ctx.mark_non_differentiable(last)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, *saved = ctx.saved_tensors  # delta None where not needed
        (batch, dim, length), delta_dtype = ctx.delta_meta
        n_state = A.shape[1]
        bn = triton.next_power_of_2(n_state)
        fp64 = u.dtype == torch.float64
        cdt = torch.float64 if fp64 else torch.float32
        dev = u.device
        Bc, b_fixed, sbb, sbg, sbn, dpg_b = _bc_layout(B, dim)
        Cc, c_fixed, scb, scg, scn, dpg_c = _bc_layout(C, dim)
        strides = (sbb, sbg, sbn, dpg_b, scb, scg, scn, dpg_c)
        if ctx.pcfg is not None:
            dout = (torch.zeros((batch, u.shape[1] if ctx.spatial else dim, length), dtype=u.dtype, device=u.device)
                    if dout is None else dout.contiguous())
            du, ddelta, dA, dB, dC, dD, dz, dbias = _plane.plane_bwd(
                u, delta, A, Bc, Cc, D, z, delta_bias, ctx.delta_softplus, dout,
                dlast.contiguous() if dlast is not None else None, ctx.geometry[1:] if ctx.spatial else None,
                strides, ctx.pcfg, cdt)
            return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                    dD.to(D.dtype) if D is not None else None, dz,
                    dbias.to(delta_bias.dtype) if delta_bias is not None else None, None, None, None, None)
        bl = ctx.fwd_chunk  # the backward walks the forward's chunks (their entering states are stored)
        n_chunks = triton.cdiv(length, bl)
        dout = torch.zeros((batch, dim, length), dtype=u.dtype, device=dev) if dout is None else dout.contiguous()
        du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev)  # per direction when fused, summed below
        ddelta = torch.empty((batch, dim, length), dtype=delta_dtype, device=dev)
        dz = torch.empty_like(z) if z is not None else None
        dummy = u
        opts = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                    SOFTPLUS=ctx.delta_softplus, FP64=fp64, SPATIAL=ctx.spatial)
        tcfg, scfg = ctx.tcfg, ctx.scfg
        par = scfg is not None and _par_config(scfg, dim, length, n_state, z is not None, batch, dev)
        if par:
            states, dts = saved
            bdp, block_l, warps = par
            q = torch.zeros(2, batch, dim, n_state, dtype=cdt, device=dev)  # the adjoint carries, two slots
            if dlast is not None:
                q[triton.cdiv(length, block_l) % 2] = dlast
            dA_part = torch.empty(batch, dim, n_state, dtype=cdt, device=dev)
            dB = torch.zeros(Bc.shape, dtype=cdt, device=dev)
            dC = torch.zeros(Cc.shape, dtype=cdt, device=dev)
            dD_part = torch.empty(batch, dim, dtype=cdt, device=dev) if D is not None else None
            dbias_part = torch.empty(batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
            rev = bool(ctx.rev_slot)
            for rvk in (0, 1) if rev else (0,):  # the bidirectional mode: forward slots, then backward ones
                _bwd_kernel_p[(dim // (2 if rev else 1) // bdp, batch)](
                    u, A, Bc, Cc, D if D is not None else dummy, states, dts, dout, q,
                    du, ddelta, dA_part, dB, dC,
                    dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
                    dim, length, n_state, states.shape[1], ctx.rev_slot, *strides,
                    HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus, FP64=fp64,
                    BDP=bdp, BLOCK_L=block_l, SAVE_STEPS=4 * scfg["save_every"], REV=rev, RVK=rvk,
                    num_warps=warps,
                )
        elif scfg is not None:
            states, dts = saved
            if not scfg["store_dt"]:  # recomputed from delta
                dts = delta
            dt_opts = dict(DT_STORED=scfg["store_dt"], HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus)
            bias = delta_bias if delta_bias is not None else dummy
            span = scfg["NSUB"] * scfg["BD_bwd"]  # channels per program
            q = (dlast.to(cdt).contiguous() if dlast is not None
                 else torch.zeros(batch, dim, n_state, dtype=cdt, device=dev))
            segs, per = scfg["segs_bwd"], scfg["seg_chunks_bwd"]
            dA_part = torch.empty(segs * batch, dim, n_state, dtype=cdt, device=dev)  # per segment and batch

            def grad_buffer(x, dpg):  # (buffer, atomic, parts, part stride)
                parts = dpg // span
                if parts == 1:
                    return torch.empty(x.shape, dtype=cdt, device=dev), False, 1, 0
                if scfg["dbc"] == "atomic":
                    return torch.zeros(x.shape, dtype=cdt, device=dev), True, 1, 0
                return torch.empty((parts, *x.shape), dtype=cdt, device=dev), False, parts, x.numel()

            dB, b_atomic, b_parts, part_b = grad_buffer(Bc, dpg_b)
            dC, c_atomic, c_parts, part_c = grad_buffer(Cc, dpg_c)
            dD_part = torch.empty(segs * batch, dim, dtype=cdt, device=dev) if D is not None else None
            dbias_part = torch.empty(segs * batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
            step_opts = {k: v for k, v in opts.items() if k != "SPATIAL"}
            seg_g = seg_dt = q  # not read with one segment
            if segs > 1:
                seg_g = torch.empty(batch, segs - 1, dim, n_state, dtype=cdt, device=dev)
                seg_dt = torch.empty(batch, segs - 1, dim, dtype=cdt, device=dev)
                _bwd_local_kernel_s[(dim // scfg["BD_bwd"], batch, segs - 1)](
                    A, Cc, z if z is not None else dummy, dts, bias, dout, seg_g, seg_dt,
                    dim, length, n_state, n_chunks, per, segs, ctx.rev_slot, scb, scg, scn, dpg_c,
                    HAS_Z=z is not None, FP64=fp64, BD=scfg["BD_bwd"], BN=bn, REV=bool(ctx.rev_slot), **dt_opts,
                    SA=scfg["SA"], num_warps=1,
                )
            _bwd_kernel_s[(dim // span, batch, segs)](
                u, A, Bc, Cc, D if D is not None else dummy, z if z is not None else dummy, bias,
                states, dts, dout, q, seg_g, seg_dt,
                du, ddelta, dz if dz is not None else dummy, dA_part, dB, dC,
                dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
                dim, length, n_state, n_chunks, states.shape[1], 1, part_b, part_c, per, segs, batch, ctx.rev_slot,
                *strides, **step_opts,
                B_ATOMIC=b_atomic, C_ATOMIC=c_atomic, BD=scfg["BD_bwd"], BN=bn, NSUB=scfg["NSUB"],
                NUM_STAGES=scfg["stages_bwd"], SAVE_EVERY=scfg["save_every"], REV=bool(ctx.rev_slot),
                DT_STORED=scfg["store_dt"], SA=scfg["SA"], VEC=scfg["bwd_vec"], num_warps=1,
                **({"maxnreg": scfg["bwd_maxnreg"]} if scfg.get("bwd_maxnreg") else {}),
            )
            dB = dB.sum(0) if b_parts > 1 else dB
            dC = dC.sum(0) if c_parts > 1 else dC
        elif tcfg is not None:
            states, dts = saved
            ln, nw, n_sub = tcfg["LN"], tcfg["NW"], tcfg["n_sub"]
            span = n_sub * tcfg["BDP"]  # channels per program
            q = (dlast.to(cdt).contiguous().clone() if dlast is not None
                 else torch.zeros(batch, dim, n_state, dtype=cdt, device=dev))
            dA_part = torch.zeros(batch, dim, n_state, dtype=cdt, device=dev)
            b_atomic, c_atomic = dpg_b > span, dpg_c > span
            dB = (torch.zeros if b_atomic else torch.empty)(Bc.shape, dtype=cdt, device=dev)
            dC = (torch.zeros if c_atomic else torch.empty)(Cc.shape, dtype=cdt, device=dev)
            dD_part = torch.zeros(batch, dim, dtype=cdt, device=dev) if D is not None else None
            dbias_part = torch.zeros(batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
            _bwd_kernel_t[(dim // span, batch)](
                u, A, Bc, Cc, D if D is not None else dummy, z if z is not None else dummy,
                states, dts, dout, q,
                du, ddelta, dz if dz is not None else dummy, dA_part, dB, dC,
                dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
                dim, length, n_state, n_chunks, n_sub, *ctx.geometry, *strides, **opts,
                B_ATOMIC=b_atomic, C_ATOMIC=c_atomic,
                BLOCK_L=bl, BNR=bn // ln, LN=ln, NW=nw, BD8=32 // ln, num_warps=nw,
            )
        else:
            (states,) = saved
            gdims = _group_dims(dim, *([] if b_fixed else [dpg_b]), *([] if c_fixed else [dpg_c]), u.shape[1])
            bd, _, nw = pick_config("bwd", dim, length, n_state, gdims)
            dA_part = torch.empty(batch, dim, n_state, dtype=cdt, device=dev)
            b_atomic = not b_fixed and dpg_b > bd
            c_atomic = not c_fixed and dpg_c > bd

            def grad_buffer(x, fixed, atomic):  # fixed (dim, N): per-batch partials, summed below
                if fixed:
                    return torch.empty(batch, dim, n_state, dtype=cdt, device=dev)
                return (torch.zeros if atomic else torch.empty)(x.shape, dtype=cdt, device=dev)

            dB, dC = grad_buffer(Bc, b_fixed, b_atomic), grad_buffer(Cc, c_fixed, c_atomic)
            dD_part = torch.empty(batch, dim, dtype=cdt, device=dev) if D is not None else None
            dbias_part = torch.empty(batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
            _bwd_kernel[(triton.cdiv(dim, bd), batch)](
                u, delta, A, Bc, Cc,
                D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy,
                states, dout, dlast.contiguous() if dlast is not None else dummy,
                du, ddelta, dz if dz is not None else dummy, dA_part, dB, dC,
                dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
                dim, length, n_state, n_chunks, *ctx.geometry, *strides, **opts,
                B_FIXED=b_fixed, C_FIXED=c_fixed, HAS_DLAST=dlast is not None, B_ATOMIC=b_atomic, C_ATOMIC=c_atomic,
                BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl, num_warps=nw,
            )
            dB = dB.sum(0) if b_fixed else dB
            dC = dC.sum(0) if c_fixed else dC
        if ctx.spatial:  # the four directions read the same map
            du = du.view(batch, dim // u.shape[1], u.shape[1], length).sum(1)
        elif ctx.rev_slot:  # both scans of a sequence read it
            du = du.view(batch, dim // (2 * ctx.rev_slot), 2, ctx.rev_slot, length).sum(2).view(batch, dim // 2, length)
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
            None,
            None,
        )


def _interpreted_twin():
    """This module loaded a second time with ``TRITON_INTERPRET=1``: kernels that run on CPU tensors."""
    return interpreted_twin(_TWIN_NAME, __file__, __package__)


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


def cross_selective_scan_triton(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Fused four-direction scan of a ``(B, D, H, W)`` map (see :mod:`common.ops.cross_scan`).

    The kernels read ``x`` and the per-direction ``delta`` ``(B, 4, D, H*W)`` and ``B`` / ``C``
    ``(B, 4, N, H*W)`` at the map position of each scan step, so no copy of the map is made; the four
    outputs are written at the map's positions and summed. Same numbers as
    :func:`common.ops.cross_scan.cross_selective_scan_ref`.
    """
    if x.device.type != "cuda" and not INTERPRETED:
        return _interpreted_twin().cross_selective_scan_triton(x, delta, A, B, C, D, delta_bias, delta_softplus)
    b, d, h, w = x.shape
    length = h * w
    u = x.reshape(b, d, length)
    flat = delta.reshape(b, 4 * d, length)
    check_scan_inputs(flat, flat, A, B, C, D, None, delta_bias)  # the shapes (x's against delta: the caller)
    if length == 0:
        return torch.zeros_like(x)
    out, _ = SelectiveScanTriton.apply(u, flat, A, B, C, D, None, delta_bias,
                                       delta_softplus, False, (h, w))
    if out.shape[1] != d:  # the chunked kernels write each direction's output; the plane kernels sum them
        out = out.view(b, 4, d, length).sum(1)
    return out.view(b, d, h, w)


def bidirectional_selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Each of ``G`` sequences scanned forward and backward in time, with no reversed copies.

    The step kernels read a backward scan's inputs at position ``L - 1 - t`` at step ``t`` and write
    its output there (see :func:`common.ops.cross_scan.bidirectional_selective_scan`, whose reference
    composition gives the same numbers). ``u`` ``(batch, G, d, L)``; ``delta`` ``(batch, 2G, d, L)``,
    ``B`` / ``C`` ``(batch, 2G, N, L)`` (slot ``2g`` forward over sequence ``g``, ``2g + 1`` backward),
    at the sequences' positions; ``A`` ``(2G * d, N)``; ``D`` and ``delta_bias`` ``(2G * d,)``.
    Returns ``(batch, 2G, d, L)`` at the positions, in ``u``'s dtype.
    """
    if u.device.type != "cuda" and not INTERPRETED:
        return _interpreted_twin().bidirectional_selective_scan_triton(u, delta, A, B, C, D, delta_bias,
                                                                       delta_softplus)
    b, g, d, length = u.shape
    flat = delta.reshape(b, 2 * g * d, length)
    check_scan_inputs(flat, flat, A, B, C, D, None, delta_bias)
    if length == 0:
        return torch.zeros_like(delta, dtype=u.dtype)
    out, _ = SelectiveScanTriton.apply(u.reshape(b, g * d, length), flat, A, B, C, D, None, delta_bias,
                                       delta_softplus, False, None, d)
    return out.view(b, 2 * g, d, length)


def bidirectional_step_available(d: int, n_state: int, device: torch.device) -> bool:
    """Whether the step kernels (and so the bidirectional mode) apply to slots of ``d`` channels at ``N``."""
    key = (d, n_state, device.type, CONFIG_OVERRIDE.get("path"))
    ok = _BIDIRECTIONAL_OK.get(key)
    if ok is None:  # asked once per SS2D call: remembered (the answer depends on these only)
        ok = _BIDIRECTIONAL_OK[key] = _step_config(4 * d, 64, n_state, d, 1, False, False, device) is not None
    return ok


_BIDIRECTIONAL_OK: dict = {}


def _plane_path_allowed(spatial: bool) -> bool:
    """Whether ``CONFIG_OVERRIDE`` lets the plane kernels run: by default for the fused cross-scan, for plain
    scans only when asked (``"path": "plane"``; benchmarks/README.md says why); never with forced tile
    configurations."""
    if "fwd" in CONFIG_OVERRIDE or "bwd" in CONFIG_OVERRIDE:
        return False
    return CONFIG_OVERRIDE.get("path", "plane" if spatial else None) == "plane"


def plane_cross_scan_applies(d: int, height: int, width: int, n_state: int) -> bool:
    """Whether the fused cross-scan of a ``(batch, d, height, width)`` map runs on the plane kernels."""
    return _plane_path_allowed(True) and _plane.plane_config(4 * d, d, height * width, n_state, d,
                                                             (height, width)) is not None
