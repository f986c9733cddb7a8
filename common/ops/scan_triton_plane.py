"""Plane kernels of the Triton selective scan, for small state counts (N <= 4; MSVM-UNet's N = 1).

At N = 1 a scan is memory-bound. These kernels save nothing for the backward, which recomputes the
forward from the inputs, and read SS2D's map in place:

- Plane mode (SS2D's fused cross-scan, :func:`common.ops.cross_scan.cross_selective_scan`): a program
  holds ``BD`` channels of the ``(H, W)`` map and runs all four scan directions over it (row-major,
  column-major, both reversed), adding each direction's output to the map's output (the directions'
  sum). Each direction reads the map and its own ``delta`` / ``B`` / ``C`` planes at the map's positions:
  the row-major orders in bands of ``RB`` rows, the column-major ones in bands of ``CB`` columns, each
  band a ``(BD, rows, columns)`` tile loaded along its rows, so neither the ``(B, 4, D, L)`` copy of the
  cross-scan nor a transposed copy is made. The state is carried from band to band.
- Plain mode (opt-in, ``scan_triton.CONFIG_OVERRIDE["path"] = "plane"``): a row of ``L`` steps laid out
  as a row-major map of ``PLANE_CONFIG["line"]``-step lines, one direction.

Inside a band, ``h[t] = a[t] h[t-1] + b[t]`` is scanned with ``tl.associative_scan`` along the band's
lines; each line's total is composed across the lines by a second, short scan (:func:`_scan`). The
backward makes a first pass over the bands for the state entering each, then walks them in reverse. It
needs ``h[t-1]`` and the adjoint ``q[t] = C[t] dy[t] + a[t+1] q[t+1]`` (the next step's decay): both come
from scans of pairs of affine maps, the prefix with and without its last step (:func:`_excl_combine`),
so there are no shifted re-reads, no extra ``exp`` and no ``h[t] - b[t]`` cancellation. With ``s[t] =
a[t] q[t]`` (the map ``x -> a[t] (x + C[t] dy[t])`` scanned backward), ``q[t] = C[t] dy[t] + s[t+1]`` and
``d loss / d(dt[t] A) = s[t] h[t-1]``. ``dB`` / ``dC`` (sums over a group's channels) are added with
float atomics; the 1-D grid puts the batch first so that the programs running together add into
different rows.

Padding (outside the ``H x W`` map, or ``t >= L``) is the identity step ``a = 1, b = 0``, which carries the
state through unchanged, forward and backward.

Measured on an H100 (benchmarks/README.md): with the fused cross-scan one graphed MSVM-UNet slice takes
13-20 % less time (fp32 3.41 -> 2.85-2.96 ms, bf16 3.61 -> 2.91-2.95). Its backward is about 2x slower than
the written-out path, so SS2D trains with that path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["plane_fwd", "plane_bwd", "plane_config", "PLANE_CONFIG"]

_LOG2E = tl.constexpr(1.4426950408889634)

# Each direction walks the map in chunks of about "chunk" elements (with 8 warps, 2 per thread: the
# backward then fits in 128 registers, sm_90, Triton 3.6/3.9: two programs per multiprocessor; a whole
# 64 x 64 map per program needed twice the register file and spilled). A plain row is laid out as a map
# of "line"-step rows; maps with a side over "max_side", rows of more than "max_chunks" chunks, and maps
# walked in bands of fewer than "min_band" rows or columns (sides over 128 at the default chunk) are left
# to the chunked tile kernels: forced bands of one column gave wrong outputs compiled with Triton 3.6 on
# an H100 (tests/test_cross_scan.py), bands of 8 and 16 matched. "warps": by the elements of a chunk.
PLANE_CONFIG = {"chunk": 512, "line": 64, "max_side": 4096, "max_chunks": 64, "min_band": 4,
                "warps": {64: 1, 128: 2, 256: 4, 512: 8, 1024: 8, 2048: 16, 4096: 16}}


@triton.jit
def _sum_keep(x, axis: tl.constexpr):
    # as scan_triton._sum (the combine the interpreter sums with NumPy), keeping the axis
    return tl.reduce(x, axis, tl.standard._sum_combine, keep_dims=True)


@triton.jit
def _softplus(x):
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _combine(a1, b1, a2, b2):
    # the affine maps x -> a1 x + b1, then x -> a2 x + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _excl_combine(a1, b1, x1, y1, a2, b2, x2, y2):
    # segments S1 then S2, each as (its full map, its map without the last step): the full maps compose;
    # S1 S2 without its last step is S1 then S2 without its last step
    return a1 * a2, a2 * b1 + b2, a1 * x2, x2 * b1 + y2


@triton.jit
def _line_last(x, idx, last, AX: tl.constexpr):
    # the value at index `last` of each line along AX (kept as a size-1 axis)
    return _sum_keep(tl.where(idx == last, x, 0.0), AX)


@triton.jit
def _scan(a, b, h0, ih, iw, HP: tl.constexpr, WP: tl.constexpr, ROWS: tl.constexpr, REV: tl.constexpr,
          PREV: tl.constexpr):
    """h[t] = a[t] h[t-1] + b[t] over a (BD, HP, WP) tile, from the state h0 before the first step, in
    row-major order (ROWS) or column-major order, backward with REV. Returns (h, h[t-1]) with PREV,
    else (h, h)."""
    IN_AX: tl.constexpr = 2 if ROWS else 1
    OUT_AX: tl.constexpr = 1 if ROWS else 2
    LINES: tl.constexpr = HP if ROWS else WP
    if PREV:
        one = tl.full(a.shape, 1.0, a.dtype)
        zero = tl.full(a.shape, 0.0, a.dtype)
        af, bf, ax, bx = tl.associative_scan((a, b, one, zero), axis=IN_AX, combine_fn=_excl_combine, reverse=REV)
    else:
        af, bf = tl.associative_scan((a, b), axis=IN_AX, combine_fn=_combine, reverse=REV)
    if LINES > 1:
        # the state entering each line: the lines before it composed, applied to h0. A line's total is
        # its last step in scan order (padding is the identity)
        if ROWS:
            ta = _line_last(af, iw, 0 if REV else WP - 1, IN_AX)
            tb = _line_last(bf, iw, 0 if REV else WP - 1, IN_AX)
        else:
            ta = _line_last(af, ih, 0 if REV else HP - 1, IN_AX)
            tb = _line_last(bf, ih, 0 if REV else HP - 1, IN_AX)
        one_l = tl.full(ta.shape, 1.0, ta.dtype)
        zero_l = tl.full(ta.shape, 0.0, ta.dtype)
        _, _, cx, cy = tl.associative_scan((ta, tb, one_l, zero_l), axis=OUT_AX, combine_fn=_excl_combine,
                                           reverse=REV)
        carry = cx * h0 + cy
    else:
        carry = h0
    h = bf + af * carry
    if PREV:
        hp = bx + ax * carry
    else:
        hp = h
    return h, hp


# The kernels take the map's width W unspecialised: with W and L both divisible by 16 (a plain row laid out
# in 64-step lines, or a 64-wide map) Triton 3.6 marks the loads along a line as 16-element aligned and its
# ConvertTritonGPUToLLVM pass fails on these kernels ("PassManager::run failed", sm_90; reproduced offline
# with triton.compile and those divisibility attributes; Triton 3.9 compiles them).
_NO_W_DIVISIBILITY = True


@triton.jit
def _program_rows(batch, gsize, rows, BD: tl.constexpr):
    # (first channel, batch element) of this program. The grid is 1-D with the batch fastest, then the
    # groups of `gsize` channels, then the blocks of BD channels inside a group: the programs that run at
    # the same time add their dB / dC (sums over a group's channels) into different rows
    pid = tl.program_id(0)
    pid_b = pid % batch
    blk = pid // batch
    groups = rows // gsize
    d0 = (blk % groups) * gsize + (blk // groups) * BD
    return d0, pid_b.to(tl.int64)


@triton.jit
def _program_channels(batch, gsize, dim, u_dim, L, PLANE: tl.constexpr, BD: tl.constexpr):
    # (first channel, batch element, the BD channels' offsets, the rows of u) of this program
    d0, pid_b = _program_rows(batch, gsize, (u_dim if PLANE else dim), BD)
    od = tl.arange(0, BD)[:, None, None]
    return d0, pid_b, od, (pid_b * u_dim + d0 + od).to(tl.int64) * L


@triton.jit
def _pick(x, ih, iw, r, c):
    # x at tile row r, column c (kept as size-1 axes)
    return _sum_keep(_sum_keep(tl.where((ih == r) & (iw == c), x, 0.0), 2), 1)


@triton.jit
def _at(x, idx, i):
    # x at index i of its last axis (kept as a size-1 axis)
    return _sum_keep(tl.where(idx == i, x, 0.0), 2)


@triton.jit
def _chunk(c, ih, iw, W, H, L, ROWS: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    # positions and mask of chunk c of a direction: a band of TR rows (ROWS) or of TC columns of the map
    if ROWS:
        gh = ih + c * TR
        gw = iw
    else:
        gh = ih
        gw = iw + c * TC
    pos = gh * W + gw
    return pos, (gh < H) & (gw < W) & (pos < L)


@triton.jit
def _inputs(u_ptr, dt_ptr, bias_ptr, urow, row, ch, pos, m, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            CDT: tl.constexpr):
    # u and the step sizes dt (bias, softplus; 0 where padded) of a chunk
    u = tl.load(u_ptr + urow + pos, mask=m, other=0.0).to(CDT)
    dt = tl.load(dt_ptr + row + pos, mask=m, other=0.0).to(CDT)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + ch).to(CDT)
    if SOFTPLUS:
        dt = _softplus(dt)
    return u, tl.where(m, dt, 0.0)


@triton.jit
def _fwd_direction(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    urow, orow, row, ch, b_base, c_base, L, H, W, n_state, sb_n, sc_n, nch, last_off,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    LAST: tl.constexpr, ACCUM: tl.constexpr, CDT: tl.constexpr, ROWS: tl.constexpr, REV: tl.constexpr,
    BD: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr, NP: tl.constexpr,
):
    """One scan direction over the map (plain: the row laid out as a map), chunk by chunk in scan order,
    the state of every channel and state carried from chunk to chunk; writes (ACCUM: adds) the output."""
    ih = tl.arange(0, TR)[None, :, None]
    iw = tl.arange(0, TC)[None, None, :]
    inp = tl.arange(0, NP)[None, None, :]
    A2 = tl.load(A_ptr + ch * n_state + inp, mask=inp < n_state, other=0.0).to(CDT) * _LOG2E  # (BD, 1, NP)
    hc = tl.full((BD, 1, NP), 0.0, dtype=CDT)
    for i in range(0, nch):
        c = i
        if REV:
            c = nch - 1 - i
        pos, m = _chunk(c, ih, iw, W, H, L, ROWS, TR, TC)
        u, dt = _inputs(u_ptr, dt_ptr, bias_ptr, urow, row, ch, pos, m, HAS_BIAS, SOFTPLUS, CDT)
        dtu = dt * u
        y = tl.full((BD, TR, TC), 0.0, dtype=CDT)
        for n in range(0, n_state):
            Bv = tl.load(B_ptr + b_base + n * sb_n + pos, mask=m, other=0.0).to(CDT)
            Cv = tl.load(C_ptr + c_base + n * sc_n + pos, mask=m, other=0.0).to(CDT)
            a = tl.exp2(dt * _at(A2, inp, n))  # 1 where padded (dt = 0)
            h, _ = _scan(a, dtu * Bv, _at(hc, inp, n), ih, iw, TR, TC, ROWS, REV, False)
            y += h * Cv
            # the state after the chunk's last step in scan order (padding carries it to the corner)
            hc = tl.where(inp == n, _pick(h, ih, iw, 0 if REV else TR - 1, 0 if REV else TC - 1), hc)
        if HAS_D:
            y += u * tl.load(D_ptr + ch).to(CDT)
        if HAS_Z:
            zv = tl.load(z_ptr + row + pos, mask=m, other=0.0).to(CDT)
            y = y * zv / (1.0 + tl.exp(-zv))
        if ACCUM:  # the directions before this one wrote theirs
            y += tl.load(out_ptr + orow + pos, mask=m, other=0.0).to(CDT)
        tl.store(out_ptr + orow + pos, y.to(out_ptr.dtype.element_ty), mask=m)
    if LAST:
        tl.store(last_ptr + last_off + inp, hc, mask=inp < n_state)


@triton.jit(do_not_specialize=["W"])  # see _NO_W_DIVISIBILITY
def _plane_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    dim, u_dim, L, H, W, n_state, batch, gsize, nch_r, nch_c,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    LAST: tl.constexpr, FP64: tl.constexpr, PLANE: tl.constexpr,
    BD: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr,
):
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    K: tl.constexpr = 4 if PLANE else 1
    d0, pid_b, od, urow = _program_channels(batch, gsize, dim, u_dim, L, PLANE, BD)
    for k in tl.static_range(K):
        # direction k: row-major when even (plain rows: the row laid out row-major), backward from k = 2
        ch = k * u_dim + d0 + od  # (BD, 1, 1) channel rows of this direction
        row = (pid_b * dim + ch).to(tl.int64) * L
        b_base = pid_b * sb_batch + ((k * u_dim + d0) // dpg_b) * sb_group
        c_base = pid_b * sc_batch + ((k * u_dim + d0) // dpg_c) * sc_group
        _fwd_direction(
            u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
            urow, urow if PLANE else row, row, ch, b_base, c_base, L, H, W, n_state, sb_n, sc_n,
            nch_r if k % 2 == 0 else nch_c, (pid_b * dim + ch) * n_state,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, LAST, PLANE and k > 0, CDT, (not PLANE) or (k % 2 == 0),
            PLANE and k >= 2, BD, RB if k % 2 == 0 else HP, WP if k % 2 == 0 else CB, NP,
        )
        if PLANE:  # the next direction adds to these outputs, which other threads of the program wrote
            tl.debug_barrier()


@triton.jit
def _bwd_direction(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    urow, orow, row, ch, b_off, c_off, L, H, W, n_state, sb_n, sc_n, nch, ns_off, nd_off,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, ACCUM: tl.constexpr, B_ATOMIC: tl.constexpr, C_ATOMIC: tl.constexpr,
    CDT: tl.constexpr, ROWS: tl.constexpr, REV: tl.constexpr,
    BD: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr, NP: tl.constexpr, NCHP: tl.constexpr,
):
    """The gradients of one direction: a pass over the chunks in scan order for the state entering each,
    then the chunks in reverse, the adjoint carried back from chunk to chunk; du written (ACCUM: added)."""
    ih = tl.arange(0, TR)[None, :, None]
    iw = tl.arange(0, TC)[None, None, :]
    inp = tl.arange(0, NP)[None, None, :]
    icn = tl.arange(0, NCHP)[None, :, None]  # the chunks, for hin (BD, NCHP, NP)
    A = tl.load(A_ptr + ch * n_state + inp, mask=inp < n_state, other=0.0).to(CDT)  # (BD, 1, NP)
    A2 = A * _LOG2E
    # pass 1: the state entering every chunk, per state
    hin = tl.full((BD, NCHP, NP), 0.0, dtype=CDT)
    hc = tl.full((BD, 1, NP), 0.0, dtype=CDT)
    for i in range(0, nch):
        c = i
        if REV:
            c = nch - 1 - i
        hin = tl.where(icn == c, hc, hin)
        pos, m = _chunk(c, ih, iw, W, H, L, ROWS, TR, TC)
        u, dt = _inputs(u_ptr, dt_ptr, bias_ptr, urow, row, ch, pos, m, HAS_BIAS, SOFTPLUS, CDT)
        dtu = dt * u
        for n in range(0, n_state):
            Bv = tl.load(B_ptr + b_off + n * sb_n + pos, mask=m, other=0.0).to(CDT)
            a = tl.exp2(dt * _at(A2, inp, n))
            h, _ = _scan(a, dtu * Bv, _at(hc, inp, n), ih, iw, TR, TC, ROWS, REV, False)
            hc = tl.where(inp == n, _pick(h, ih, iw, 0 if REV else TR - 1, 0 if REV else TC - 1), hc)
    # pass 2: the chunks in reverse scan order; the adjoint s[t] = a[t] (C[t] dy[t] + s[t+1]) runs backward
    if HAS_DLAST:
        sc = tl.load(dlast_ptr + ns_off + inp, mask=inp < n_state, other=0.0).to(CDT)
    else:
        sc = tl.full((BD, 1, NP), 0.0, dtype=CDT)
    dA = tl.full((BD, 1, NP), 0.0, dtype=CDT)
    dD = tl.full((BD, 1, 1), 0.0, dtype=CDT)
    dbias = tl.full((BD, 1, 1), 0.0, dtype=CDT)
    for i in range(0, nch):
        c = nch - 1 - i
        if REV:
            c = i
        pos, m = _chunk(c, ih, iw, W, H, L, ROWS, TR, TC)
        u, dt = _inputs(u_ptr, dt_ptr, bias_ptr, urow, row, ch, pos, m, HAS_BIAS, SOFTPLUS, CDT)
        dtu = dt * u
        dout = tl.load(dout_ptr + orow + pos, mask=m, other=0.0).to(CDT)
        if HAS_Z:
            zv = tl.load(z_ptr + row + pos, mask=m, other=0.0).to(CDT)
            sig = 1.0 / (1.0 + tl.exp(-zv))
            dy = dout * zv * sig
            y = tl.full((BD, TR, TC), 0.0, dtype=CDT)
        else:
            dy = dout
        du = tl.full((BD, TR, TC), 0.0, dtype=CDT)
        ddt = tl.full((BD, TR, TC), 0.0, dtype=CDT)
        h_in = _sum_keep(tl.where(icn == c, hin, 0.0), 1)  # the states entering chunk c, (BD, 1, NP)
        for n in range(0, n_state):
            # the adjoint first (it needs no state), then the states: fewer values live at once
            An = _at(A, inp, n)
            a = tl.exp2(dt * _at(A2, inp, n))
            Cv = tl.load(C_ptr + c_off + n * sc_n + pos, mask=m, other=0.0).to(CDT)
            rhs = dy * Cv
            s, s_next = _scan(a, a * rhs, _at(sc, inp, n), ih, iw, TR, TC, ROWS, not REV, True)
            # carried to the chunk before: s at this chunk's first step in scan order
            sc = tl.where(inp == n, _pick(s, ih, iw, TR - 1 if REV else 0, TC - 1 if REV else 0), sc)
            q = rhs + s_next  # d loss / d h[t]
            dB_t = _sum_keep(q * dtu, 0)
            if B_ATOMIC:
                tl.atomic_add(dB_ptr + b_off + n * sb_n + pos, dB_t, mask=m)
            else:
                tl.store(dB_ptr + b_off + n * sb_n + pos, dB_t, mask=m)
            Bv = tl.load(B_ptr + b_off + n * sb_n + pos, mask=m, other=0.0).to(CDT)
            qB = q * Bv
            du += qB * dt
            ddt += qB * u
            h, hp = _scan(a, dtu * Bv, _at(h_in, inp, n), ih, iw, TR, TC, ROWS, REV, True)
            dC_t = _sum_keep(dy * h, 0)
            if C_ATOMIC:
                tl.atomic_add(dC_ptr + c_off + n * sc_n + pos, dC_t, mask=m)
            else:
                tl.store(dC_ptr + c_off + n * sc_n + pos, dC_t, mask=m)
            if HAS_Z:
                y += h * Cv
            x = s * hp  # d loss / d(dt A) = q[t] a[t] h[t-1]
            ddt += x * An
            dA = tl.where(inp == n, dA + _sum_keep(_sum_keep(x * dt, 2), 1), dA)
        if HAS_D:
            Dv = tl.load(D_ptr + ch).to(CDT)
            du += dy * Dv
            dD += _sum_keep(_sum_keep(dy * u, 2), 1)
            if HAS_Z:
                y += u * Dv
        if HAS_Z:
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(dz_ptr + row + pos, dz.to(dz_ptr.dtype.element_ty), mask=m)
        if SOFTPLUS:  # d softplus(x) / dx = sigmoid(x); x re-read (a cache hit) rather than kept in registers
            x_raw = tl.load(dt_ptr + row + pos, mask=m, other=0.0).to(CDT)
            if HAS_BIAS:
                x_raw = x_raw + tl.load(bias_ptr + ch).to(CDT)
            ddt = ddt / (1.0 + tl.exp(-x_raw))
        ddt = tl.where(m, ddt, 0.0)
        dbias += _sum_keep(_sum_keep(ddt, 2), 1)
        tl.store(ddt_ptr + row + pos, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
        if ACCUM:  # the directions before this one wrote theirs
            du += tl.load(du_ptr + orow + pos, mask=m, other=0.0).to(CDT)
        tl.store(du_ptr + orow + pos, du.to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dA_ptr + ns_off + inp, dA, mask=inp < n_state)
    if HAS_D:
        tl.store(dD_ptr + nd_off, dD)
    if HAS_BIAS:
        tl.store(dbias_ptr + nd_off, dbias)


@triton.jit(do_not_specialize=["W"])  # see _NO_W_DIVISIBILITY
def _plane_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, u_dim, L, H, W, n_state, batch, gsize, nch_r, nch_c,
    sb_batch, sb_group, sb_n, dpg_b,
    sc_batch, sc_group, sc_n, dpg_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, FP64: tl.constexpr, PLANE: tl.constexpr, B_ATOMIC: tl.constexpr,
    C_ATOMIC: tl.constexpr, BD: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, RB: tl.constexpr,
    CB: tl.constexpr, NP: tl.constexpr, NCHP: tl.constexpr,
):
    CDT: tl.constexpr = tl.float64 if FP64 else tl.float32
    K: tl.constexpr = 4 if PLANE else 1
    d0, pid_b, od, urow = _program_channels(batch, gsize, dim, u_dim, L, PLANE, BD)
    for k in tl.static_range(K):
        ch = k * u_dim + d0 + od
        row = (pid_b * dim + ch).to(tl.int64) * L
        b_off = pid_b * sb_batch + ((k * u_dim + d0) // dpg_b) * sb_group
        c_off = pid_b * sc_batch + ((k * u_dim + d0) // dpg_c) * sc_group
        # plane mode: the four directions' outputs were summed, so each gets the summed output's gradient,
        # and du sums the four directions' contributions
        _bwd_direction(
            u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr,
            du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
            urow, urow if PLANE else row, row, ch, b_off, c_off, L, H, W, n_state, sb_n, sc_n,
            nch_r if k % 2 == 0 else nch_c, (pid_b * dim + ch) * n_state, pid_b * dim + ch,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DLAST, PLANE and k > 0, B_ATOMIC, C_ATOMIC, CDT,
            (not PLANE) or (k % 2 == 0), PLANE and k >= 2, BD, RB if k % 2 == 0 else HP, WP if k % 2 == 0 else CB,
            NP, NCHP,
        )
        if PLANE:  # the next direction adds to du, which other threads of the program wrote
            tl.debug_barrier()


def plane_config(dim: int, u_dim: int, length: int, n_state: int, gdims: int, spatial, override=None):
    """Launch parameters of the plane kernels, or None where they do not apply.

    They apply to time-varying B and C (the caller checks) with N <= 4. A plain row is laid out as a
    map of ``LINE``-step rows. Each direction walks the map in chunks of about ``PLANE_CONFIG["chunk"]``
    elements: bands of ``RB`` rows for the row-major orders, of ``CB`` columns for the column-major
    ones, with ``BD`` channels of one group per program (several where a whole map fits a chunk).
    Returns dict(BD, H, W, HP, WP, RB, CB, nch_r, nch_c, NCHP, num_warps), or None for maps whose sides
    exceed ``PLANE_CONFIG["max_side"]`` or rows of more than ``max_chunks`` chunks (the chunked tile
    kernels take those). ``override`` = (chunk elements, num_warps) forces those (benchmarks).
    """
    if triton.next_power_of_2(n_state) > 4:
        return None
    chunk, nw = override if override is not None else (PLANE_CONFIG["chunk"], None)
    if spatial is not None:
        h, w = spatial
    else:  # a row of L steps as a row-major map of LINE-step rows (no longer than a chunk)
        w = min(triton.next_power_of_2(length), PLANE_CONFIG["line"], chunk)
        h = triton.cdiv(length, w)
    hp, wp = triton.next_power_of_2(h), triton.next_power_of_2(w)
    if max(hp, wp) > PLANE_CONFIG["max_side"]:
        return None
    cap = gdims & -gdims  # the largest power of two dividing gdims
    bd = min(cap, max(1, chunk // (hp * wp)))
    rb = max(1, min(hp, chunk // (bd * wp)))
    cb = max(1, min(wp, chunk // (bd * hp)))
    nch_r = triton.cdiv(h, rb)
    nch_c = triton.cdiv(w, cb) if spatial is not None else 1
    if max(nch_r, nch_c) > PLANE_CONFIG["max_chunks"]:
        return None
    narrow = (nch_r > 1 and rb < PLANE_CONFIG["min_band"]) or (nch_c > 1 and cb < PLANE_CONFIG["min_band"])
    if narrow and override is None:
        return None
    if nw is None:
        elems = bd * max(rb * wp, hp * cb)
        warps = PLANE_CONFIG["warps"]
        nw = warps[min((k for k in warps if k >= elems), default=max(warps))]
    return dict(BD=bd, H=h, W=w, HP=hp, WP=wp, RB=rb, CB=cb, nch_r=nch_r, nch_c=nch_c,
                NCHP=triton.next_power_of_2(max(nch_r, nch_c)), num_warps=nw)


def _optional(x, dummy):
    return x if x is not None else dummy


def _group_size(rows: int, strides) -> int:
    """Channels per B / C group among the ``rows`` a launch walks (the programs interleave the groups)."""
    return math.gcd(rows, strides[3], strides[7])


def plane_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, want_last, spatial, strides, cfg, cdt):
    """The forward: ``(out, last)``. ``u`` ``(batch, u_dim, L)``; plane mode (``spatial = (H, W)``):
    ``delta`` ``(batch, 4 * u_dim, L)`` at the map's positions and ``out`` ``(batch, u_dim, L)``, the
    directions summed; plain: ``delta`` and ``out`` ``(batch, dim, L)``. ``B`` / ``C`` as laid out by
    ``scan_triton._bc_layout``, whose strides and channels per group are ``strides``."""
    batch, dim, length = delta.shape
    u_dim = u.shape[1]
    n_state = A.shape[1]
    rows = u_dim if spatial is not None else dim
    out = torch.empty((batch, rows, length), dtype=u.dtype, device=u.device)
    last = torch.empty(batch, dim, n_state, dtype=cdt, device=u.device)
    bd = cfg["BD"]
    _plane_fwd_kernel[(batch * (rows // bd),)](
        u, delta, A, B, C, _optional(D, u), _optional(z, u), _optional(delta_bias, u), out, last,
        dim, u_dim, length, cfg["H"], cfg["W"], n_state, batch, _group_size(rows, strides), cfg["nch_r"],
        cfg["nch_c"], *strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        LAST=bool(want_last), FP64=cdt == torch.float64, PLANE=spatial is not None,
        BD=bd, HP=cfg["HP"], WP=cfg["WP"], RB=cfg["RB"], CB=cfg["CB"], NP=triton.next_power_of_2(n_state),
        num_warps=cfg["num_warps"],
    )
    return out, last


def plane_bwd(u, delta, A, B, C, D, z, delta_bias, softplus, dout, dlast, spatial, strides, cfg, cdt):
    """The backward: ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, the per-channel ones summed over
    the batch, ``dB`` / ``dC`` in float (``cdt``) with ``B`` / ``C``'s layout. Recomputes the forward."""
    batch, dim, length = delta.shape
    u_dim = u.shape[1]
    n_state = A.shape[1]
    dev = u.device
    bd = cfg["BD"]
    dpg_b, dpg_c = strides[3], strides[7]
    b_atomic, c_atomic = dpg_b > bd, dpg_c > bd
    rows = u_dim if spatial is not None else dim
    du = torch.empty((batch, rows, length), dtype=u.dtype, device=dev)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, dim, n_state, dtype=cdt, device=dev)
    dB = (torch.zeros if b_atomic else torch.empty)(B.shape, dtype=cdt, device=dev)
    dC = (torch.zeros if c_atomic else torch.empty)(C.shape, dtype=cdt, device=dev)
    dD = torch.empty(batch, dim, dtype=cdt, device=dev) if D is not None else None
    dbias = torch.empty(batch, dim, dtype=cdt, device=dev) if delta_bias is not None else None
    _plane_bwd_kernel[(batch * (rows // bd),)](
        u, delta, A, B, C, _optional(D, u), _optional(z, u), _optional(delta_bias, u), dout, _optional(dlast, u),
        du, ddelta, _optional(dz, u), dA, dB, dC, _optional(dD, u), _optional(dbias, u),
        dim, u_dim, length, cfg["H"], cfg["W"], n_state, batch, _group_size(rows, strides), cfg["nch_r"],
        cfg["nch_c"], *strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_DLAST=dlast is not None, FP64=cdt == torch.float64, PLANE=spatial is not None,
        B_ATOMIC=b_atomic, C_ATOMIC=c_atomic, BD=bd, HP=cfg["HP"], WP=cfg["WP"], RB=cfg["RB"], CB=cfg["CB"],
        NP=triton.next_power_of_2(n_state), NCHP=cfg["NCHP"], num_warps=cfg["num_warps"],
    )
    return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if dD is not None else None, dz,
            dbias.sum(0) if dbias is not None else None)
