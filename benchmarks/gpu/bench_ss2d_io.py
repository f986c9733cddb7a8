"""The fused kernels around SS2D's bidirectional scan (common.ops.ss2d_io) against the unfused ops, on CUDA.

For each SS2D shape with N = 16 (MSSMamba, Mamba-HUNet; batch 1 and the paper batch) and precision
(float32, bfloat16 autocast), replayed from CUDA graphs:

- ``conv_cross``: depth-wise conv + bias + SiLU written as the two scan sequences, fused
  (``--tiles`` sweeps launch tiles) against ``conv_cross_ref``;
- ``merge_norm``: merge + LayerNorm + SiLU(z) gate to channels-last, fused against ``merge_norm_ref``;
- the whole SS2D block's forward with ``fused_io`` on and off;

with the largest difference from the unfused result relative to its scale.

    python benchmarks/gpu/bench_ss2d_io.py [--network mssmamba mambahunet] [--tiles] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_batch1_scan import graphed_ms  # noqa: E402
from bench_scan import write_results  # noqa: E402
from bench_ss2d_bidirectional import SHAPES  # noqa: E402

from common.networks.blocks.ss2d import SS2D  # noqa: E402
from common.ops import ss2d_io_triton as kt  # noqa: E402
from common.ops.ss2d_io import conv_cross_ref, merge_norm_ref  # noqa: E402

TILES = [(16, 16, 32, 8), (8, 8, 32, 4), (8, 8, 64, 4), (8, 8, 128, 8), (8, 16, 32, 4), (4, 4, 64, 4),
         (4, 4, 128, 4), (4, 4, 128, 8), (2, 4, 128, 4)]


def rel(a, b):
    return round(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item(), 7)


def case(net, d_model, h, w, batch, precision, tiles):
    """One shape and precision: the timings and differences as a dict."""
    dev = torch.device("cuda")
    d = 2 * d_model
    amp = precision == "bf16"
    dtype = torch.bfloat16 if amp else torch.float32
    torch.manual_seed(0)
    xz = torch.randn(batch, h, w, 2 * d, device=dev, dtype=dtype)
    x, z = xz[..., :d], xz[..., d:]
    conv = torch.nn.Conv2d(d, d, 3, padding=1, groups=d).to(dev)
    ys = torch.randn(batch, 4, d, h * w, device=dev, dtype=dtype)
    ln = torch.nn.LayerNorm(d).to(dev)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    row = dict(network=net, d_inner=d, h=h, w=w, batch=batch, precision=precision)

    def run(fn):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return fn()

    def ms(fn):
        return round(graphed_ms(lambda: run(fn)), 4)

    def conv_ref():
        return conv_cross_ref(x, conv.weight, conv.bias)

    def conv_fused():
        return kt.conv_cross_triton(x, conv.weight, conv.bias)

    def merge_ref():
        return merge_norm_ref(ys, h, w, z, ln.weight, ln.bias, ln.eps)

    def merge_fused():
        return kt.merge_norm_triton(ys, h, w, z, ln.weight, ln.bias, ln.eps, True, True, dtype)

    row["conv_ref_ms"], row["conv_fused_ms"] = ms(conv_ref), ms(conv_fused)
    row["conv_rel_diff"] = rel(run(conv_fused), run(conv_ref))
    row["conv_tiles"] = list(kt.pick_tiles("conv", batch, h, w, d))
    row["merge_ref_ms"], row["merge_fused_ms"] = ms(merge_ref), ms(merge_fused)
    row["merge_rel_diff"] = rel(run(merge_fused), run(merge_ref))
    row["merge_tiles"] = kt.pick_tiles("merge", batch, h, w, d)  # None: SS2D runs the unfused merge here
    if tiles:
        for kind, fn in (("conv", conv_fused), ("merge", merge_fused)):
            sweep = {}
            for t in TILES:
                kt.TILE_OVERRIDE[kind] = t
                try:
                    sweep["x".join(map(str, t))] = ms(fn)
                except Exception as err:  # a tile too large for the registers / shared memory
                    sweep["x".join(map(str, t))] = f"{type(err).__name__}"
                kt.TILE_OVERRIDE.clear()
            row[f"{kind}_tile_sweep_ms"] = sweep
    block = SS2D(d_model, d_state=16, scan_backend="triton").to(dev).eval()
    xin = torch.randn(batch, h, w, d_model, device=dev)
    outs = {}
    for fused in (True, False):
        block.fused_io = fused
        row[f"ss2d_fused_io_{fused}_ms"] = ms(lambda: block(xin))
        outs[fused] = run(lambda: block(xin))
    row["ss2d_rel_diff"] = rel(outs[True], outs[False])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    ap.add_argument("--tiles", action="store_true", help="also time the fixed tile choices in TILES")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for net in args.network:
        for d_model, h, w, paper_batch in SHAPES[net]:
            for batch in sorted({1, paper_batch}):
                for precision in ("fp32", "bf16"):
                    row = case(net, d_model, h, w, batch, precision, args.tiles)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    dev = torch.device("cuda")
    result = dict(benchmark="bench_ss2d_io", date=dt.date.today().isoformat(), device=torch.cuda.get_device_name(dev),
                  torch=torch.__version__, results=rows)
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
