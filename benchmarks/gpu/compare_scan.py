"""Issue 6 measurements on a GPU: our Triton scan against mamba-ssm and the memory floor, same run.

    python benchmarks/gpu/compare_scan.py --sweep --compare --ss2d --out $OUT

- ``--step``: at the issue's N = 16 shapes, the step kernels (the default for N = 16) in each
  backward variant (1 or 2 channel blocks per program; dB / dC summed with atomics or per-program
  partials) against the time-in-thread kernels; writes the fastest variant.
- ``--segments``: the step kernels with the sequence split into time segments (automatic, and forced
  counts) against one segment, the tile kernels (N = 1) and mamba-ssm, at the issue's shapes and at
  batch 1 (one slice of inference: the channels alone give too few programs).
- ``--plane``: at MSVM-UNet's N = 1 shapes, the plane kernels (whole sequences per program; the
  default there) in several (BD, num_warps) launch configurations against their automatic choice, the
  tile kernels (the default before them), mamba-ssm and the floor.
- ``--tile``: at MSVM-UNet's training scans (N = 1, batch 32, each stage, fp32 and bf16), the shipped
  tile kernels against the step kernels in blocks of 32 channels (``STEP_CONFIG["small_n"]``, several
  variants), mamba-ssm and the floor; ``--tile-configs`` adds the tile kernels' forward and backward
  in every (BLOCK_D, num_warps) at each BLOCK_L.
- ``--step-blocks``: at the N = 16 training scans of Mamba-HUNet and MSSMamba (paper batches, every
  stage), the step kernels' channel blocks (``STEP_CONFIG`` ``bd_fwd``, ``bd_bwd``, ``nsub``) against
  the shipped 8-channel blocks, mamba-ssm and the floor.
- ``--sweep``: forward and forward + backward ms of the time-in-thread kernels for several
  (BLOCK_L, LN, NW, cap) launch configurations and of the tile kernels, at N = 16 SS2D shapes.
- ``--compare``: at the issue's shapes (batch 16, 4 directions, softplus, D, delta_bias): the
  ``triton`` backend, ``mamba_ssm`` when it imports (``build_mamba_ssm_scan.py``), and the floor =
  minimal bytes (forward reads u, delta, B, C and writes out; backward also reads dout and writes
  du, ddelta, dB, dC) / the device-to-device copy bandwidth measured in the same run; ratios.
- ``--ss2d``: one SS2D scan (projections, cross-scan, scan, merge) forward + backward at the networks'
  stage shapes: triton as SS2D chooses by default (at N = 1: the plane kernels' fused cross-scan where
  no gradient is needed, so in the forward timing; the written-out path with the tile kernels in
  training), fused triton (N = 1: the plane kernels in training too; N = 16: the chunked kernels' fused
  mode), unfused triton (PyTorch cross-scan / merge; at N = 1 with the tile kernels and with the plane
  kernels' plain rows), unfused mamba-ssm. ``--ss2d-n`` picks the state counts; ``--ss2d-sweep`` adds
  plane launch configurations at N = 1.

Times are medians of CUDA-event timings (``triton.testing.do_bench``); with ``--graphs`` of CUDA-graph
replays, so that the CPU's launch and autograd costs (about 0.3-0.5 ms per forward + backward call,
which made small shapes look alike) stay out. Gradients are returned, not accumulated. Writes
compare_scan.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scan_floors  # noqa: E402  (benchmarks/)
from bench_batch1_scan import graph_replay  # noqa: E402  (this folder: the script's own)

from common.ops import available_backends, selective_scan  # noqa: E402
from common.ops import scan_triton as st  # noqa: E402

# (batch, d_inner, L, N, dtype): the issue's table (scan_floors.ISSUE_SHAPES, element sizes as dtypes), plus
# MSSMamba's level-1 scan at its paper batch
ISSUE_SHAPES = [(b, d, length, n, {4: torch.float32, 2: torch.bfloat16}[elem])
                for b, d, length, n, elem in scan_floors.ISSUE_SHAPES] + [(10, 192, 12544, 16, torch.bfloat16)]
SWEEP_SHAPES = [(16, 192, 3136, 16, torch.float32), (16, 768, 196, 16, torch.float32),
                (10, 192, 12544, 16, torch.bfloat16)]
# (BLOCK_L, LN, NW, cap) of the time-in-thread kernels
TIME_CONFIGS = [(2, 1, 1, 8), (4, 1, 1, 8), (8, 1, 1, 8), (4, 2, 1, 8), (8, 2, 1, 8), (8, 4, 1, 8),
                (16, 4, 1, 8), (16, 16, 1, 8), (4, 1, 2, 8), (8, 2, 2, 8), (8, 4, 1, 1), (16, 8, 1, 1),
                (4, 2, 1, 1), (8, 8, 1, 8)]
# SS2D stages (batch, d_inner, H, W, N): MSVM-UNet stage 1 and 3, Mamba-UNet / Mamba-HUNet stage 1, MSSMamba level 1
OUT_DIR = ["/tmp"]
SS2D_SHAPES = [(32, 96, 56, 56, 1), (32, 192, 28, 28, 1), (32, 384, 14, 14, 1), (32, 768, 7, 7, 1),
               (24, 192, 64, 64, 16), (16, 192, 56, 56, 16), (10, 192, 112, 112, 16)]
# MSVM-UNet's scans (N = 1) at the issue's batch 16, and its stage 1 at its paper batch 32
PLANE_SHAPES = [(16, 96, 3136, 1, torch.float32), (16, 96, 3136, 1, torch.bfloat16), (16, 192, 784, 1, torch.float32),
                (16, 384, 196, 1, torch.float32), (16, 768, 49, 1, torch.float32), (32, 96, 3136, 1, torch.bfloat16)]


def emit(rows, row):
    """Keep a result: printed, and the JSON rewritten (a run cut off by its time limit keeps what it measured)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT_DIR[0], "compare_scan.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def make(batch, d_inner, length, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dim = 4 * d_inner

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale + shift

    return [rnd(batch, dim, length).to(dtype), rnd(batch, dim, length, scale=0.5, shift=-2.0).to(dtype),
            -torch.exp(rnd(dim, n, scale=0.5)), rnd(batch, 4, n, length).to(dtype),
            rnd(batch, 4, n, length).to(dtype), rnd(dim), None, rnd(dim, scale=0.1)]


GRAPHS = [False]  # --graphs: time replays of CUDA graphs (no CPU launch cost in the numbers)


def time_scan(backend, shape):
    batch, d_inner, length, n, dtype = shape
    ins = make(batch, d_inner, length, n, dtype)
    leaves = [t.detach().clone().requires_grad_(i != 6) if t is not None else None for i, t in enumerate(ins)]
    wrt = [t for t in leaves if t is not None]
    gout = torch.randn(batch, 4 * d_inner, length, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            selective_scan(*leaves, True, backend=backend)

    def fwd_bwd():  # the gradients returned, not accumulated into .grad
        torch.autograd.grad(selective_scan(*leaves, True, backend=backend), wrt, gout)

    if GRAPHS[0]:
        return bench(graph_replay(fwd)), bench(graph_replay(fwd_bwd))
    return bench(fwd), bench(fwd_bwd)


def floor_ms(shape, bandwidth):
    """The memory floor (forward, forward + backward) in ms at ``bandwidth`` bytes/s (``scan_floors.bytes_moved``)."""
    batch, d_inner, length, n, dtype = shape
    fwd, bwd = scan_floors.bytes_moved(batch, d_inner, length, n, torch.finfo(dtype).bits // 8)
    return fwd / bandwidth * 1e3, (fwd + bwd) / bandwidth * 1e3


def label(shape):
    b, d, length, n, dtype = shape
    return f"b{b} d{d} L{length} N{n} {str(dtype).split('.')[-1]}"


def time_with(shape, override, repeats):
    """Fastest (forward, forward + backward) ms of the triton backend over ``repeats`` timings with
    ``CONFIG_OVERRIDE`` set to ``override``; None for a configuration that does not compile or runs out
    of resources."""
    st.CONFIG_OVERRIDE.clear()
    st.CONFIG_OVERRIDE.update(override)
    try:
        times = [time_scan("triton", shape) for _ in range(repeats)]
    except Exception as err:
        print("FAIL", label(shape), override, type(err).__name__, str(err)[:300], flush=True)
        return None
    finally:
        st.CONFIG_OVERRIDE.clear()
    return min(t[0] for t in times), min(t[1] for t in times)


def sweep(rows, configs, repeats):
    best = {}
    for shape in SWEEP_SHAPES:
        for cfg in [None] + configs:
            timed = time_with(shape, {"path": "tile"} if cfg is None else {"time": cfg, "path": "time"}, repeats)
            if timed is None:
                continue
            f, fb = timed
            row = dict(kind="sweep", shape=label(shape), kernels="tile" if cfg is None else "time",
                       config=cfg, fwd_ms=round(f, 4), fwd_bwd_ms=round(fb, 4))
            emit(rows, row)
            if cfg is not None:
                best.setdefault(cfg, []).append(fb)
    st.CONFIG_OVERRIDE.clear()
    scored = {cfg: sum(v) for cfg, v in best.items() if len(v) == len(SWEEP_SHAPES)}  # fwd+bwd summed
    if scored:
        win = min(scored, key=scored.get)
        print("best time-in-thread config over the sweep shapes:", win, flush=True)
        emit(rows, dict(kind="sweep_best", config=win))
        with open(os.path.join(OUT_DIR[0], "best_config.txt"), "w") as fh:
            fh.write(",".join(str(v) for v in win))
        return win
    return None


# (the runs of 2026-12-01, results/scan_triton_step_cuda_2026-12-01.json, also measured 1 block,
# atomics and 2-3 pipelining stages: all slower)
STEP_VARIANTS = [dict(nsub=2, dbc="partial", stages_fwd=1, stages_bwd=1, save_every=e) for e in (1, 2, 4)]


def step_sweep(rows, repeats):
    shapes = [s for s in ISSUE_SHAPES if s[3] == 16]
    score = {}
    for shape in shapes:
        for variant in [None] + STEP_VARIANTS:
            timed = time_with(shape, {"path": "time"} if variant is None else {"step": dict(variant)}, repeats)
            if timed is None:
                continue
            f, fb = timed
            v = variant or {}
            name = ("time-in-thread" if variant is None else
                    f"step nsub{v['nsub']} {v['dbc']} stages {v['stages_fwd']}/{v['stages_bwd']} "
                    f"save_every {v.get('save_every', 1)}")
            emit(rows, dict(kind="step", shape=label(shape), kernels=name, fwd_ms=round(f, 4),
                            fwd_bwd_ms=round(fb, 4)))
            score.setdefault(name, []).append(fb)
    st.CONFIG_OVERRIDE.clear()
    full = {k: sum(v) for k, v in score.items() if len(v) == len(shapes)}
    if full:
        emit(rows, dict(kind="step_best", kernels=min(full, key=full.get), summed_fwd_bwd_ms=full))


# batch-1 stage-1 scans of the three networks (one slice of inference) and MSVM-UNet's training batch
SEGMENT_SHAPES = [(1, 96, 3136, 1, torch.float32), (1, 192, 4096, 16, torch.float32),
                  (1, 192, 12544, 16, torch.float32), (1, 192, 4096, 16, torch.bfloat16),
                  (32, 96, 3136, 1, torch.float32), (32, 96, 3136, 1, torch.bfloat16)]


def segments(rows, repeats):
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for shape in ISSUE_SHAPES + SEGMENT_SHAPES:
        variants = [("step auto", {}), ("step 1 segment", {"step": {"segs_fwd": 1, "segs_bwd": 1}})]
        variants += [(f"step {k} segments", {"step": {"segs_fwd": k, "segs_bwd": k}}) for k in (2, 4, 16)]
        if shape[3] == 1:
            variants.append(("tile", {"path": "tile"}))
        res = dict(kind="segments", shape=label(shape))
        for name, override in variants:
            timed = time_with(shape, override, repeats)
            if timed is not None:
                res[name] = [round(timed[0], 4), round(timed[1], 4)]
        if have_mamba:
            res["mamba_ssm"] = [round(t, 4) for t in time_scan("mamba_ssm", shape)]
        emit(rows, res)


# MSVM-UNet's training scans (N = 1, paper batch 32, four directions of each stage)
TILE_SHAPES = [(32, d, length, 1, dtype) for dtype in (torch.bfloat16, torch.float32)
               for d, length in ((96, 3136), (192, 784), (384, 196), (768, 49))]
STEP_N1_VARIANTS = [("step", {}), ("step nsub1", {"nsub": 1}), ("step save_every 1", {"save_every": 1}),
                    ("step save_every 4", {"save_every": 4}), ("step 1 segment", {"segs_fwd": 1, "segs_bwd": 1}),
                    ("step 4 segments", {"segs_fwd": 4, "segs_bwd": 4}),
                    ("step 8/4 segments", {"segs_fwd": 8, "segs_bwd": 4})]
TILE_BLOCKS = [(bd, nw) for bd in (4, 8, 16, 32) for nw in (1, 2, 4)]


def tile_sweep(rows, configs=False):
    """At MSVM-UNet's training scans: the shipped choice (the tile kernels), the step kernels at N = 1
    (``STEP_CONFIG["small_n"]``) in several variants, mamba-ssm and the floor; with ``configs``, then
    the tile kernels in every (BLOCK_D, num_warps) for forward and backward at each BLOCK_L (the
    backward walks the forward's chunks, so both share it): forward ms alone, backward ms as forward +
    backward minus the forward of the default forward configuration. Tiles with fewer elements than
    threads, or over 4096 elements, are skipped."""
    bw = copy_bandwidth()
    emit(rows, dict(kind="bandwidth", tb_s=round(bw / 1e12, 3)))
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for shape in TILE_SHAPES:
        _, d, length, n, _ = shape
        res = dict(kind="tile_step", shape=label(shape), auto=st.pick_config("fwd", 4 * d, length, n, d),
                   floor=[round(t, 4) for t in floor_ms(shape, bw)])
        timed = time_with(shape, {}, 1)
        res["default"] = [round(timed[0], 4), round(timed[1], 4)] if timed else None
        if have_mamba:
            res["mamba_ssm"] = [round(t, 4) for t in time_scan("mamba_ssm", shape)]
        for name, step in STEP_N1_VARIANTS:
            timed = time_with(shape, {"path": "step", "step": step}, 1)
            res[name] = [round(timed[0], 4), round(timed[1], 4)] if timed else None
        emit(rows, res)
    for shape in TILE_SHAPES if configs else []:
        res = dict(kind="tile", shape=label(shape))
        for bl in (16, 32, 64, 128):
            if bl > max(32, 2 * shape[2]):
                continue
            ok = [(bd, nw) for bd, nw in TILE_BLOCKS if 32 * nw <= bd * bl <= 4096]
            base = time_with(shape, {"fwd": (8, bl, 4), "bwd": (8, bl, 4)}, 1)
            if base is None:
                continue
            fwd, bwd = {}, {}
            for bd, nw in ok:
                t = time_with(shape, {"fwd": (bd, bl, nw), "bwd": (8, bl, 4)}, 1)
                if t is not None:
                    fwd[f"{bd},{nw}"] = round(t[0], 4)
                t = time_with(shape, {"fwd": (8, bl, 4), "bwd": (bd, bl, nw)}, 1)
                if t is not None:
                    bwd[f"{bd},{nw}"] = round(t[1] - base[0], 4)
            best_f, best_b = min(fwd, key=fwd.get), min(bwd, key=bwd.get)
            res[f"bl{bl}"] = dict(fwd=fwd, bwd=bwd, best_fwd=[best_f, fwd[best_f]], best_bwd=[best_b, bwd[best_b]],
                                  best_sum=round(fwd[best_f] + bwd[best_b], 4))
        emit(rows, res)


# The N = 16 scans of Mamba-HUNet (batch 24, 256 x 256: stages at 64, 32, 16, 8) and MSSMamba (batch 10,
# 224 x 224: 112, 56, 28) at their paper batches, four directions, bf16 (and fp32 at stage 1)
STEP_TRAIN_SHAPES = ([(24, d, length, 16, torch.bfloat16) for d, length in ((192, 4096), (384, 1024), (768, 256),
                                                                             (1536, 64))]
                     + [(10, d, length, 16, torch.bfloat16) for d, length in ((192, 12544), (384, 3136), (768, 784))]
                     + [(24, 192, 4096, 16, torch.float32), (10, 192, 12544, 16, torch.float32)])
STEP_FWD_BLOCKS = [2, 4]
STEP_BWD_BLOCKS = [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1)]  # (channels per block, blocks per program)


def step_blocks(rows):
    """At the N = 16 training scans: the step kernels' channel blocks. The shipped choice (8 channels,
    2 blocks per backward program), mamba-ssm and the floor; then forward ms in each forward block size
    (the backward as shipped) and backward ms (forward + backward minus the shipped forward) in each
    (block size, blocks per program). The step backward throughout (``bwd_par`` False: the default takes the
    parallel backward at some of these shapes)."""
    bw = copy_bandwidth()
    emit(rows, dict(kind="bandwidth", tb_s=round(bw / 1e12, 3)))
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for shape in STEP_TRAIN_SHAPES:
        res = dict(kind="step_blocks", shape=label(shape), floor=[round(t, 4) for t in floor_ms(shape, bw)])
        base = time_with(shape, {"step": {"bwd_par": False}}, 1)
        if base is None:
            continue
        res["shipped"] = [round(base[0], 4), round(base[1], 4), round(base[1] - base[0], 4)]
        if have_mamba:
            res["mamba_ssm"] = [round(t, 4) for t in time_scan("mamba_ssm", shape)]
        fwd, bwd = {}, {}
        for bd in STEP_FWD_BLOCKS:
            t = time_with(shape, {"step": {"bd_fwd": bd, "bwd_par": False}}, 1)
            if t is not None:
                fwd[str(bd)] = round(t[0], 4)
        for bd, nsub in STEP_BWD_BLOCKS:
            t = time_with(shape, {"step": {"bd_bwd": bd, "nsub": nsub, "bwd_par": False}, "min_programs": 0}, 1)
            if t is not None:
                bwd[f"{bd}x{nsub}"] = round(t[1] - base[0], 4)
        res.update(fwd=fwd, bwd=bwd)
        emit(rows, res)


# step-kernel settings (STEP_CONFIG keys) other than the default, for --step-variants (timed on an H100,
# 2026-12-07: the vector backward became the default; the register caps were slower)
STEP_VARIANTS = {
    "scalar_bwd": {"bwd_vec": False},
    "bwd_maxnreg224": {"bwd_maxnreg": 224},
    "fwd_maxnreg112": {"fwd_maxnreg": 112},
    # the parallel backward (_bwd_kernel_p: time across the threads, the states in sequence), written 2026-12-07,
    # taken by default where _par_wins ("auto"): the step backward everywhere; the parallel one everywhere at its
    # default blocks (256 steps, one warp, 8 steps a thread), two channels a program, 2048-step blocks of 8 warps,
    # one-warp programs of 256 steps and of 512 (16 a thread)
    "step_bwd": {"bwd_par": False},
    "par": {"bwd_par": True},
    "par_bdp2": {"bwd_par": True, "par_bdp": 2},
    "par_block2048": {"bwd_par": True, "par_block": 2048},
    "par_256w1": {"bwd_par": True, "par_block": 256},
    "par_512w1": {"bwd_par": True, "par_block": 512, "par_steps": 16},
}


def step_variants(rows, names=None):
    """At the N = 16 training scans: forward and forward + backward ms of the step kernels as shipped and
    with each of ``STEP_VARIANTS`` (the backward's scalar B / C accesses as before 2026-12-07, register caps
    that fit one more program per multiprocessor), in the plain mode. The networks' SS2D
    runs the bidirectional mode (reversed blocks); ``bench_trainer.py --scan-paths '{"step": {...}}'`` times a
    setting there."""
    for shape in STEP_TRAIN_SHAPES:
        res = dict(kind="step_variants", shape=label(shape))
        base = time_with(shape, {}, 1)
        if base is None:
            continue
        res["shipped"] = [round(base[0], 4), round(base[1], 4)]
        for name in names or STEP_VARIANTS:
            t = time_with(shape, {"step": STEP_VARIANTS[name]}, 1)
            if t is not None:
                res[name] = [round(t[0], 4), round(t[1], 4)]
        emit(rows, res)


def plane_configs(auto):
    """(chunk elements, num_warps) of the plane kernels: the shipped choice and its neighbours."""
    return [(256, 4), (512, 4), (512, 8), (1024, 8), (1024, 16), (2048, 16)]


def plane(rows, repeats):
    bw = copy_bandwidth()
    emit(rows, dict(kind="bandwidth", tb_s=round(bw / 1e12, 3)))
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for shape in PLANE_SHAPES:
        batch, d, length, n, _ = shape
        auto = st._plane.plane_config(4 * d, 4 * d, length, n, d, None)
        res = dict(kind="plane", shape=label(shape), auto=auto)
        for cfg in plane_configs(auto):
            timed = time_with(shape, {"plane": cfg}, repeats)
            if timed is not None:
                res[f"plane {cfg[0]},{cfg[1]}"] = [round(timed[0], 4), round(timed[1], 4)]
        timed = time_with(shape, {"path": "tile"}, repeats)
        res["tile"] = [round(timed[0], 4), round(timed[1], 4)] if timed else None
        if have_mamba:
            res["mamba_ssm"] = [round(t, 4) for t in time_scan("mamba_ssm", shape)]
        res["floor"] = [round(t, 4) for t in floor_ms(shape, bw)]
        emit(rows, res)


def compare(rows, config):
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    emit(rows, dict(kind="bandwidth", tb_s=round(bw / 1e12, 3)))
    if config is not None:
        st.CONFIG_OVERRIDE.update(time=tuple(config), path="time")  # a time-in-thread config: that path
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for shape in ISSUE_SHAPES:
        f, fb = time_scan("triton", shape)
        fl_f, fl_fb = floor_ms(shape, bw)
        row = dict(kind="compare", shape=label(shape), triton_fwd_ms=round(f, 4), triton_fwd_bwd_ms=round(fb, 4),
                   floor_fwd_ms=round(fl_f, 4), floor_fwd_bwd_ms=round(fl_fb, 4),
                   triton_over_floor=round(fb / fl_fb, 2))
        if have_mamba:
            mf, mfb = time_scan("mamba_ssm", shape)
            row.update(mamba_fwd_ms=round(mf, 4), mamba_fwd_bwd_ms=round(mfb, 4),
                       speedup_vs_mamba_fwd=round(mf / f, 2), speedup_vs_mamba_fwd_bwd=round(mfb / fb, 2))
        emit(rows, row)
    st.CONFIG_OVERRIDE.clear()


def time_ss2d(m, x, amp):
    """(output, forward ms, forward + backward ms, extra peak MiB) of one SS2D scan."""

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return m.ssm(x)

    y = forward()
    gy = torch.randn_like(y)

    def fwd_bwd():
        forward().backward(gy)

    def fwd_only():
        with torch.no_grad():
            forward()

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_fb = bench(fwd_bwd)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return y.detach().float(), bench(fwd_only), t_fb, peak


def ss2d(rows, config, states=(1, 16), sweep_plane=False):
    from common.networks.blocks import SS2D

    base = dict(time=tuple(config), path="time") if config is not None else {}  # a time-in-thread config
    have_mamba = "mamba_ssm" in available_backends("cuda")
    for batch, d_inner, h, w, n in SS2D_SHAPES:
        if n not in states:
            continue
        # (backend, fused_scan, CONFIG_OVERRIDE, name)
        variants = [("triton", None, base, "triton default")]
        if n == 1:
            variants += [("triton", True, {}, "triton fused, plane kernels (training too)"),
                         ("triton", False, {"path": "plane"}, "triton unfused, plane rows"),
                         ("triton", False, {}, "triton unfused, tile kernels")]
            if sweep_plane and h * w >= 56 * 56:  # the largest stage, where most of the time goes
                auto = st._plane.plane_config(4 * d_inner, d_inner, h * w, n, d_inner, (h, w))
                variants += [("triton", None, {"plane": c}, f"triton plane {c[0]},{c[1]}") for c in plane_configs(auto)]
        else:
            variants += [("triton", True, base, "triton fused (chunked)"), ("triton", False, base, "triton unfused")]
        if have_mamba:
            variants.append(("mamba_ssm", False, {}, "mamba_ssm + torch cross-scan"))
        for dtype in (torch.float32, torch.bfloat16):
            res = dict(kind="ss2d", shape=f"b{batch} d{d_inner} {h}x{w} N{n}", dtype=str(dtype).split(".")[-1])
            ref = None
            for backend, fused, override, name in variants:
                st.CONFIG_OVERRIDE.clear()
                st.CONFIG_OVERRIDE.update(override)
                torch.manual_seed(0)
                m = SS2D(d_inner, d_state=n, ssm_ratio=1.0, scan_backend=backend, fused_scan=fused).cuda()
                x = torch.randn(batch, d_inner, h, w, device="cuda", dtype=dtype, requires_grad=True)
                try:
                    y, t_f, t_fb, peak = time_ss2d(m, x, dtype == torch.bfloat16)
                except Exception as err:
                    print("FAIL", res["shape"], name, type(err).__name__, str(err)[:300], flush=True)
                    continue
                diff = 0.0 if ref is None else ((y - ref).norm() / ref.norm()).item()
                ref = y if ref is None else ref
                res[name] = dict(fwd_ms=round(t_f, 4), fwd_bwd_ms=round(t_fb, 4), peak_extra_mib=round(peak, 1),
                                 rel_diff_vs_first=float(f"{diff:.2e}"))
            emit(rows, res)
    st.CONFIG_OVERRIDE.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--step-config", default="", help="JSON merged into the step kernels' STEP_CONFIG, e.g. "
                                                     "'{\"save_every\": 1}'")
    ap.add_argument("--segments", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--ss2d", action="store_true")
    ap.add_argument("--ss2d-n", type=int, nargs="+", default=[1, 16], help="--ss2d: the state counts to run")
    ap.add_argument("--ss2d-sweep", action="store_true",
                    help="--ss2d: plane launch configurations at N = 1 too (56 x 56 and larger)")
    ap.add_argument("--plane", action="store_true")
    ap.add_argument("--tile", action="store_true", help="launch configurations of the tile kernels at MSVM-UNet's "
                                                        "training scans (N = 1, batch 32)")
    ap.add_argument("--tile-configs", action="store_true", help="--tile: also sweep the tile kernels' launch "
                                                                "configurations")
    ap.add_argument("--step-blocks", action="store_true", help="the step kernels' channel blocks at the N = 16 "
                                                               "training scans of Mamba-HUNet and MSSMamba")
    ap.add_argument("--step-variants", nargs="*", default=None, choices=sorted(STEP_VARIANTS),
                    help="candidate STEP_CONFIG settings at the N = 16 training scans (all when none is named)")
    ap.add_argument("--graphs", action="store_true", help="time the scans as CUDA-graph replays (kernels only)")
    ap.add_argument("--config", default="", help="time-in-thread config BLOCK_L,LN,NW,cap: --compare and --ss2d "
                                                 "then use those kernels (also after --sweep: its best)")
    ap.add_argument("--configs", default="", help="';'-separated configs for --sweep (default: TIME_CONFIGS)")
    ap.add_argument("--repeats", type=int, default=1, help="--sweep: timings per case (the fastest is kept)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    OUT_DIR[0] = args.out
    GRAPHS[0] = args.graphs
    if args.step_config:
        st.STEP_CONFIG.update(json.loads(args.step_config))
    rows = [dict(kind="meta", device=torch.cuda.get_device_name(), torch=torch.__version__,
                 triton=__import__("triton").__version__, date=dt.date.today().isoformat(),
                 shipped_time_config={str(k): v for k, v in st.TIME_IN_THREAD_CONFIG.items()},
                 shipped_step_config=dict(st.STEP_CONFIG), plane_config=dict(st._plane.PLANE_CONFIG),
                 graphs=args.graphs)]
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    if args.plane:
        plane(rows, args.repeats)
    if args.tile:
        tile_sweep(rows, args.tile_configs)
    if args.step:
        step_sweep(rows, args.repeats)
    if args.step_blocks:
        step_blocks(rows)
    if args.step_variants is not None:
        step_variants(rows, args.step_variants or None)
    if args.segments:
        segments(rows, args.repeats)
    if args.sweep:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c] or TIME_CONFIGS
        config = sweep(rows, configs, args.repeats) or config
    if args.compare:
        compare(rows, config)
    if args.ss2d:
        ss2d(rows, config, tuple(args.ss2d_n), args.ss2d_sweep)


if __name__ == "__main__":
    main()
