"""A / B of two versions of the Triton scan module in one run, on a GPU.

    cp <earlier scan_triton.py> common/ops/scan_triton_b.py
    python benchmarks/gpu/ab_scan_module.py --b common.ops.scan_triton_b --out $OUT

At the issue's N = 16 shapes and at Mamba-HUNet's and MSSMamba's N = 16 training scans (paper
batches, every stage; compare_scan.py's shapes and inputs: four directions, softplus, D, delta_bias),
forward and forward + backward ms of ``selective_scan_triton`` from the working tree's
``common.ops.scan_triton`` ("a") and from the module named by ``--b`` ("b"), as CUDA-graph replays
(kernels only), the two timed alternately per shape; with the floor of each shape (compare_scan.py's
bytes / the copy bandwidth measured in the same run). Outputs and gradients of a and b are compared
(largest relative difference), so that a faster version that computes something else shows.
``--variants '{"name": {...}}'`` adds versions of a with ``CONFIG_OVERRIDE["step"]`` set to each dict.
Writes ab_scan_module.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_batch1_scan import graph_replay  # noqa: E402
from compare_scan import ISSUE_SHAPES, STEP_TRAIN_SHAPES, bench, copy_bandwidth, floor_ms, label, make  # noqa: E402


def with_step(mod, step, fn):
    """fn run (and captured) with mod's step-kernel override set to step."""
    def call():
        old = mod.CONFIG_OVERRIDE.get("step")
        mod.CONFIG_OVERRIDE["step"] = dict(step)
        try:
            return fn()
        finally:
            if old is None:
                mod.CONFIG_OVERRIDE.pop("step")
            else:
                mod.CONFIG_OVERRIDE["step"] = old
    return call


def run_case(mod, shape, step=None):
    batch, d_inner, length, n, dtype = shape
    ins = make(batch, d_inner, length, n, dtype)
    leaves = [t.detach().clone().requires_grad_(i != 6) if t is not None else None for i, t in enumerate(ins)]
    wrt = [t for t in leaves if t is not None]
    gout = torch.randn(batch, 4 * d_inner, length, device="cuda", dtype=dtype,
                       generator=torch.Generator(device="cuda").manual_seed(1))

    def fwd():
        with torch.no_grad():
            mod.selective_scan_triton(*leaves, True)

    def fwd_bwd():
        return torch.autograd.grad(mod.selective_scan_triton(*leaves, True), wrt, gout)

    if step is not None:
        fwd, fwd_bwd = with_step(mod, step, fwd), with_step(mod, step, fwd_bwd)
    with torch.no_grad():
        y = with_step(mod, step or {}, lambda: mod.selective_scan_triton(*leaves, True))()
    grads = fwd_bwd()
    return (fwd, fwd_bwd), [y.float()] + [g.float() for g in grads]


def rel(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--b", required=True, help="module name of version b, e.g. common.ops.scan_triton_b")
    ap.add_argument("--shapes", choices=["issue", "train", "both"], default="both")
    ap.add_argument("--variants", default="{}", help="JSON {name: step override} of extra versions of a")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timings per version (fastest kept)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args(argv)
    mod_a = importlib.import_module("common.ops.scan_triton")
    versions = {"a": (mod_a, None), "b": (importlib.import_module(args.b), None)}
    versions.update({k: (mod_a, v) for k, v in json.loads(args.variants).items()})
    shapes = STEP_TRAIN_SHAPES if args.shapes != "issue" else []
    shapes += [s for s in ISSUE_SHAPES if s[3] == 16] if args.shapes != "train" else []
    bw = copy_bandwidth()
    import triton

    rows = [dict(kind="meta", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 date=dt.date.today().isoformat(), b=args.b, bandwidth_tb_s=round(bw / 1e12, 3))]
    print(json.dumps(rows[0]), flush=True)
    for shape in shapes:
        fns, outs = {}, {}
        for k, (mod, step) in versions.items():
            fns[k], outs[k] = run_case(mod, shape, step)
        best = {k: [float("inf"), float("inf")] for k in versions}
        for _ in range(args.rounds):
            for k in versions:
                for i, fn in enumerate(fns[k]):
                    best[k][i] = min(best[k][i], bench(graph_replay(fn)))
        floor = floor_ms(shape, bw)
        row = dict(kind="ab", shape=label(shape), floor=[round(t, 4) for t in floor],
                   **{k: [round(t, 4) for t in best[k]] for k in versions},
                   **{f"{k}_over_b": [round(best[k][i] / best["b"][i], 3) for i in range(2)] for k in versions
                      if k != "b"},
                   a_fwd_bwd_x_floor=round(best["a"][1] / floor[1], 2),
                   max_rel_diff={k: float(f"{rel(outs[k], outs['b']):.2e}") for k in versions if k != "b"})
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "ab_scan_module.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
        del fns, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
