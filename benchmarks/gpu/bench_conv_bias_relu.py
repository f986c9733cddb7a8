"""Convolution + bias + ReLU at batch 1: PyTorch's eager ops against cuDNN's fused kernel.

    python benchmarks/gpu/bench_conv_bias_relu.py [--out results.json]

In eval mode with the batch norms folded (``fuse_conv_bn_for_inference``), each of MSSMamba's
convolutions has a bias, and PyTorch's cuDNN path runs it as the convolution plus a broadcast
``add_`` of the bias (a separate, non-vectorised kernel), then the ReLU (a third kernel). cuDNN's
``torch.cudnn_convolution_relu`` does all three in one call. This times, per shape of a batch-1
MSSMamba slice (from ``profile_network.py --network mssmamba --inference --fold-bn --ops``) and per
dtype, 20 of each replayed from one CUDA graph (a slice is launch-bound): the convolution alone, with
its bias, with bias and ReLU, and the fused call, and the largest difference of the fused output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_batch1_scan import graph_replay  # noqa: E402  (this folder)

# (input channels, map size, output channels, kernel size)
SHAPES = [(256, 14, 256, 3), (128, 56, 128, 3), (128, 28, 128, 3), (64, 56, 64, 3), (256, 14, 1024, 1),
          (128, 28, 128, 1), (1024, 14, 256, 1)]


def graph_ms(fn, reps=20, replays=50):
    """ms per call of ``fn``: ``reps`` calls captured in one CUDA graph, the median of 5 timings of ``replays``."""
    replay = graph_replay(lambda: [fn() for _ in range(reps)])
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays / reps)
    return sorted(times)[len(times) // 2]


def time_shape(cin, size, cout, k, dtype):
    x = torch.randn(1, cin, size, size, device="cuda", dtype=dtype)
    w = torch.randn(cout, cin, k, k, device="cuda", dtype=dtype) / (cin * k * k) ** 0.5
    b = torch.randn(cout, device="cuda", dtype=dtype)
    pad = k // 2
    row = dict(shape=f"{cin}->{cout} k{k} @ {size}x{size}", dtype=str(dtype).replace("torch.", ""))
    row["conv_ms"] = graph_ms(lambda: F.conv2d(x, w, None, 1, pad))
    row["conv_bias_ms"] = graph_ms(lambda: F.conv2d(x, w, b, 1, pad))
    row["conv_bias_relu_ms"] = graph_ms(lambda: F.relu(F.conv2d(x, w, b, 1, pad)))
    try:
        fused = torch.cudnn_convolution_relu(x, w, b, (1, 1), (pad, pad), (1, 1), 1)
        row["fused_ms"] = graph_ms(lambda: torch.cudnn_convolution_relu(x, w, b, (1, 1), (pad, pad), (1, 1), 1))
        ref = F.relu(F.conv2d(x.float(), w.float(), b.float(), 1, pad))
        row["fused_max_abs_diff"] = (fused.float() - ref).abs().max().item()
        row["eager_max_abs_diff"] = (F.relu(F.conv2d(x, w, b, 1, pad)).float() - ref).abs().max().item()
    except RuntimeError as err:
        row["fused_error"] = str(err).splitlines()[0][:200]
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in SHAPES:
            row = time_shape(*shape, dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="conv_bias_relu", device=torch.cuda.get_device_name(), torch=torch.__version__,
                           date=dt.date.today().isoformat(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
