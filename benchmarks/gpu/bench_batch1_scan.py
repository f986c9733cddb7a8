"""One-slice (batch 1) scan timings of the networks' SS2D shapes, float32 and bfloat16 inputs, and
the step kernels' time-segment settings (``STEP_CONFIG`` seg_fwd_aim, min_seg_fwd), each timed as a
replayed CUDA graph (no launch gaps); also the PyTorch cross-scan and cross-merge of each shape.

    python benchmarks/gpu/bench_batch1_scan.py --network mssmamba [--aim 6 12 24] [--min-seg 32 16 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.ops import scan_triton  # noqa: E402
from common.ops.cross_scan import cross_merge, cross_scan  # noqa: E402

SHAPES = {  # (d_inner, H, W, N, calls per slice) of one slice's SS2D scans
    "mssmamba": [(192, 112, 112, 16, 2), (384, 56, 56, 16, 2), (768, 28, 28, 16, 9)],
    "mambahunet": [(192, 64, 64, 16, 4), (384, 32, 32, 16, 4), (768, 16, 16, 16, 4), (1536, 8, 8, 16, 2)],
    "msvmunet": [(96, 56, 56, 1, 4), (192, 28, 28, 1, 4), (384, 14, 14, 1, 10), (768, 7, 7, 1, 2)],
}


def graph_replay(fn, warmup=3):
    """The replay of a CUDA graph of ``fn``, captured after ``warmup`` calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def graphed_ms(fn, reps=50):
    replay = graph_replay(fn)
    for _ in range(5):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--network", choices=sorted(SHAPES), default="mssmamba")
    ap.add_argument("--aim", type=int, nargs="+", default=[12], help="STEP_CONFIG['seg_fwd_aim'] values")
    ap.add_argument("--min-seg", type=int, nargs="+", default=[32])
    ap.add_argument("--batch", type=int, default=1, help="slices per call (small batches split too)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for d, h, w, n, calls in SHAPES[args.network]:
        L, k = h * w, 4
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(args.batch, d, h, w, device=dev, generator=g)
        dt = torch.randn(args.batch, k * d, L, device=dev, generator=g) * 0.5
        A = -torch.rand(k * d, n, device=dev, generator=g) - 0.5
        B = torch.randn(args.batch, k, n, L, device=dev, generator=g)
        C = torch.randn(args.batch, k, n, L, device=dev, generator=g)
        D = torch.ones(k * d, device=dev)
        bias = torch.zeros(k * d, device=dev)
        for dtype in (torch.float32, torch.bfloat16):
            xs = cross_scan(x.to(dtype)).reshape(args.batch, k * d, L)
            dti, Bi, Ci = dt.to(dtype), B.to(dtype), C.to(dtype)
            row = dict(batch=args.batch, d_inner=d, H=h, W=w, N=n, calls=calls, dtype=str(dtype).split(".")[-1])
            for seg in args.aim:
                for ms in args.min_seg:
                    scan_triton.CONFIG_OVERRIDE["step"] = {"seg_fwd_aim": seg, "min_seg_fwd": ms}
                    conf = scan_triton._step_config(k * d, L, n, d, args.batch, False, False, dev)
                    t = graphed_ms(
                        functools.partial(scan_triton.selective_scan_triton, xs, dti, A, Bi, Ci, D, None, bias, True)
                    )
                    row[f"scan_aim{seg}_min{ms}_ms"] = round(t, 4)
                    row[f"segs_aim{seg}_min{ms}"] = conf["segs_fwd"] if conf else None
            scan_triton.CONFIG_OVERRIDE.pop("step", None)
            xd = x.to(dtype)
            row["cross_scan_ms"] = round(graphed_ms(functools.partial(cross_scan, xd)), 4)
            ys = torch.randn(args.batch, k, d, L, device=dev, dtype=dtype)
            row["cross_merge_ms"] = round(graphed_ms(functools.partial(cross_merge, ys, h, w)), 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
