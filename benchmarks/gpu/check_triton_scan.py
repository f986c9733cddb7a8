"""Device check of the Triton selective scan: correctness at the issue's shapes, and a config sweep.

    python benchmarks/gpu/check_triton_scan.py --check --sweep

Correctness: the triton backend (float32 / bf16 inputs) against the ``torch`` backend run on float64
copies of the same inputs (the torch backend is itself checked against ``selective_scan_ref``), as
relative errors ||x - ref|| / ||ref|| of out and every gradient. Sweep: forward and forward+backward
ms (CUDA events, median) for several (BLOCK_D, BLOCK_L, num_warps) launch configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.ops import scan_triton as st  # noqa: E402
from common.ops import selective_scan, selective_scan_ref  # noqa: E402

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make(batch, dim, length, n, groups, dtype, seed=0, delta_shift=-2.0, with_z=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale + shift

    return [
        rnd(batch, dim, length).to(dtype),
        rnd(batch, dim, length, scale=0.5, shift=delta_shift).to(dtype),
        -torch.exp(rnd(dim, n, scale=0.5)),
        rnd(batch, groups, n, length).to(dtype),
        rnd(batch, groups, n, length).to(dtype),
        rnd(dim),
        rnd(batch, dim, length).to(dtype) if with_z else None,
        rnd(dim, scale=0.1),
    ]


def run(fn, ins, seed=1, last_state=False):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ins]
    res = fn(*leaves, True, last_state)
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = res[0] if last_state else res
    loss = (out.double() * torch.randn(out.shape, generator=g, device="cuda").double()).sum()
    if last_state:
        loss = loss + (res[1].double() * torch.randn(res[1].shape, generator=g, device="cuda").double()).sum()
    loss.backward()
    vals = {"out": out.detach().double()}
    if last_state:
        vals["last"] = res[1].detach().double()
    for name, leaf in zip(NAMES, leaves):
        if leaf is not None:
            vals[name] = leaf.grad.double()
    return vals


def backend(name):
    def fn(u, dl, A, B, C, D, z, bias, sp, ls):
        return selective_scan(u, dl, A, B, C, D, z, bias, sp, ls, backend=name)
    return fn


def check(shapes, out_rows):
    worst = 0.0
    for (batch, d_inner, length, n, dtype, z, ls, ref_kind) in shapes:
        ins = make(batch, 4 * d_inner, length, n, 4, dtype, with_z=z)
        got = run(backend("triton"), ins, last_state=ls)
        ins64 = [t.double() if t is not None else None for t in ins]
        want = run(selective_scan_ref if ref_kind == "ref" else backend("torch"), ins64, last_state=ls)
        # relative error; absolute where the reference is ~0 (dA at L=1: no previous state)
        errs = {k: ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-3)).item() for k in want}
        finite = all(torch.isfinite(v).all().item() for v in got.values())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok = finite and max(errs.values()) < tol
        worst = max(worst, max(errs.values()) / tol)
        row = dict(batch=batch, d_inner=d_inner, L=length, N=n, dtype=str(dtype).split(".")[-1], z=z, last_state=ls,
                   reference=ref_kind, ok=ok, finite=finite, rel_err={k: float(f"{v:.2e}") for k, v in errs.items()})
        out_rows.append(row)
        print(("OK  " if ok else "BAD ") + json.dumps(row), flush=True)
    return worst


def bench(fn, reps=50):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def time_case(be, batch, d_inner, length, n, dtype):
    ins = make(batch, 4 * d_inner, length, n, 4, dtype)
    ins[6] = None
    leaves = [t.detach().clone().requires_grad_(i in (0, 1, 2, 3, 4, 5, 7)) if t is not None else None
              for i, t in enumerate(ins)]

    def fwd():
        with torch.no_grad():
            selective_scan(*leaves[:8], True, backend=be)

    def fwd_bwd():
        out = selective_scan(*leaves[:8], True, backend=be)
        out.backward(gout)

    gout = torch.randn(batch, 4 * d_inner, length, device="cuda", dtype=dtype)
    return bench(fwd), bench(fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--configs", default="")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (compiles cost seconds each)")
    ap.add_argument("--time-config", default="", help="--check the time-in-thread kernels with BLOCK_L,LN,NW,cap")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    rows = []
    if args.time_config:
        st.CONFIG_OVERRIDE.update(time=tuple(int(x) for x in args.time_config.split(",")), path="time")
    if args.check:
        f32, bf = torch.float32, torch.bfloat16
        small = [(2, 2, 1, 16, f32, True, True, "ref"), (2, 4, 100, 4, f32, True, True, "ref"),
                 (2, 8, 333, 16, f32, False, True, "ref"), (2, 8, 1000, 1, bf, True, False, "ref")]
        issue = [(16, 96, 3136, 1, f32, False, False, "torch"), (16, 384, 196, 1, f32, False, False, "torch"),
                 (16, 192, 3136, 16, f32, False, False, "torch"), (16, 192, 3136, 16, bf, False, False, "torch"),
                 (4, 192, 4096, 16, f32, True, True, "torch")]
        if args.quick:
            small, issue = small[:1], [issue[0], issue[2]]
        worst = check(small + issue, rows)
        print(f"worst error / tolerance: {worst:.3f}")
    if args.sweep:
        shapes = [(16, 96, 3136, 1, torch.float32), (16, 384, 196, 1, torch.float32),
                  (16, 192, 3136, 16, torch.float32), (16, 192, 3136, 16, torch.bfloat16)]
        if args.quick:
            shapes = [shapes[0], shapes[2]]
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c] or [None]
        for shape in shapes:
            for cfg in configs:
                st.CONFIG_OVERRIDE.clear()
                if cfg:
                    st.CONFIG_OVERRIDE.update(fwd=cfg[:3], bwd=cfg[3:] if len(cfg) > 3 else cfg[:3])
                try:
                    f, fb = time_case("triton", *shape)
                except Exception as err:  # a config that does not compile
                    print("FAIL", shape, cfg, type(err).__name__, str(err)[:200], flush=True)
                    continue
                row = dict(shape=[*shape[:4], str(shape[4]).split(".")[-1]], config=cfg, fwd_ms=round(f, 4),
                           fwd_bwd_ms=round(fb, 4))
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "check_triton_scan.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
