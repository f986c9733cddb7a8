"""SS2D's thin per-direction projections (x_proj, dt_projs): einsum vs broadcast matmul, fwd + bwd.

    python benchmarks/gpu/bench_projections.py

At MSVM-UNet's four stage shapes (batch 32, 4 directions), fp32 and bf16 autocast: the einsum
``bkdl,kcd->bkcl`` the SS2D block uses, and ``W @ x`` as a broadcast matmul over (batch, direction).
"""

from __future__ import annotations

import functools
import json
import math

import torch
import triton.testing

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # (d_inner, side) of VMamba-Tiny 0230s at 224


def bench(fn, *args):
    def run():
        out = fn(*args)
        out.float().sum().backward()
    return triton.testing.do_bench(run, warmup=5, rep=50)


def main():
    rows = []
    for d, side in STAGES:
        b, k, length = 32, 4, side * side
        r = math.ceil(d / 16)
        c = r + 2  # N = 1
        for amp in (False, True):
            x = torch.randn(b, k, d, length, device="cuda", requires_grad=True)
            w = torch.randn(k, c, d, device="cuda", requires_grad=True)
            dts = torch.randn(b, k, r, length, device="cuda", requires_grad=True)
            wd = torch.randn(k, d, r, device="cuda", requires_grad=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                t = {
                    "x_proj einsum": bench(functools.partial(torch.einsum, "bkdl,kcd->bkcl"), x, w),
                    "x_proj matmul": bench(torch.matmul, w, x),
                    "dt_proj einsum": bench(functools.partial(torch.einsum, "bkrl,kdr->bkdl"), dts, wd),
                    "dt_proj matmul": bench(torch.matmul, wd, dts),
                }
            a = torch.einsum("bkdl,kcd->bkcl", x, w)
            m = torch.matmul(w, x)
            row = dict(d_inner=d, L=length, c=c, r=r, amp=amp, **{k_: round(v, 3) for k_, v in t.items()},
                       max_rel_diff=float((a - m).abs().max() / a.abs().max()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
