"""SS2D's bidirectional scan against its four-direction copy, on CUDA, at the networks' SS2D shapes.

For each shape (one SS2D block, channels-last, VMamba v0 settings) and precision (float32, bfloat16
autocast): the forward replayed from a CUDA graph at batch 1 and the paper batch, and forward +
backward at the paper batch; with ``bidirectional_scan`` on (the default) and off, in the same
run. It also checks that both give the float64 numbers (the largest difference, relative to the
output's scale), values and input gradients.

    python benchmarks/gpu/bench_ss2d_bidirectional.py [--network mssmamba mambahunet] [--out results.json]
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

from common.networks.blocks.ss2d import SS2D  # noqa: E402

SHAPES = {  # (d_model, H, W, paper batch) of the SS2D blocks with N = 16
    "mssmamba": [(96, 112, 112, 10), (192, 56, 56, 10), (384, 28, 28, 10)],
    "mambahunet": [(96, 64, 64, 24), (192, 32, 32, 24), (384, 16, 16, 24), (768, 8, 8, 24)],
}


def fwd_bwd_ms(m, x, amp, reps=20):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = m(x)
        y.float().square().mean().backward()

    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for net in args.network:
        for d_model, h, w, batch in SHAPES[net]:
            torch.manual_seed(0)
            m = SS2D(d_model, d_state=16, scan_backend="triton").to(dev)
            # correctness: both paths against float64 (the four-copy path with the reference scan)
            x64 = torch.randn(2, h, w, d_model, device=dev, dtype=torch.float64, requires_grad=True)
            ref = SS2D(d_model, d_state=16, scan_backend="torch").to(dev).double()
            ref.load_state_dict(m.state_dict())
            y64 = ref(x64)
            (gx64,) = torch.autograd.grad(y64.square().sum(), x64)
            check = {}
            for bidi in (True, False):
                m.bidirectional_scan = bidi
                x32 = x64.detach().float().requires_grad_()
                y = m(x32)
                (gx,) = torch.autograd.grad(y.square().sum(), x32)
                check["bidirectional" if bidi else "four_copy"] = dict(
                    out_rel=((y.double() - y64).abs().max() / y64.abs().max()).item(),
                    grad_rel=((gx.double() - gx64).abs().max() / gx64.abs().max()).item())
            del ref, x64, y64, gx64
            for precision in ("fp32", "bf16"):
                amp = precision == "bf16"
                row = dict(network=net, d_model=d_model, d_inner=2 * d_model, H=h, W=w, batch=batch,
                           precision=precision, check_vs_float64=check)
                for bidi in (True, False):
                    m.bidirectional_scan = bidi
                    key = "bidirectional" if bidi else "four_copy"
                    for b in (1, batch):
                        x = torch.randn(b, h, w, d_model, device=dev)

                        def fwd(x=x, m=m, amp=amp):
                            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                                m(x)

                        row[f"{key}_fwd_graphed_ms_b{b}"] = round(graphed_ms(fwd), 4)
                    xg = torch.randn(batch, h, w, d_model, device=dev, requires_grad=True)
                    row[f"{key}_fwd_bwd_ms_b{batch}"] = round(fwd_bwd_ms(m, xg, amp), 3)
                m.bidirectional_scan = True
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        result = dict(benchmark="ss2d_bidirectional", date=dt.date.today().isoformat(),
                      device=torch.cuda.get_device_name(dev), torch=torch.__version__, results=rows)
        write_results(args.out, result)


if __name__ == "__main__":
    main()
