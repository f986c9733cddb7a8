"""Selective-scan benchmark at the SS2D shapes of the three networks.

Prints milliseconds per call (forward, and forward+backward) for every backend available on the
device, and the speed-up over the sequential reference loop (``selective_scan_ref``, forward), and
writes the results as JSON (device, date, versions) under ``benchmarks/results/``.

Examples::

    python benchmarks/bench_scan.py                      # CPU, batch 1, all network shapes
    python benchmarks/bench_scan.py --preset target      # the issue's CPU target shape only
    python benchmarks/bench_scan.py --device cuda --batch 1 16 --no-ref
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.ops import available_backends, selective_scan, selective_scan_ref  # noqa: E402

# (network, d_inner, H*W, N): the SS2D scans of each network at its paper input size, 4 directions
SHAPES = {
    "msvmunet": [(96, 56 * 56, 1), (192, 28 * 28, 1), (384, 14 * 14, 1), (768, 7 * 7, 1)],
    "mambaunet_224": [(192, 56 * 56, 16), (384, 28 * 28, 16), (768, 14 * 14, 16), (1536, 7 * 7, 16)],
    "mambahunet_256": [(192, 64 * 64, 16), (384, 32 * 32, 16), (768, 16 * 16, 16), (1536, 8 * 8, 16)],
    "mssmamba": [(192, 112 * 112, 16), (384, 56 * 56, 16), (768, 28 * 28, 16)],
}
PRESETS = {
    "all": [(net, *s) for net, shapes in SHAPES.items() for s in shapes],
    "target": [("mambaunet_224", 192, 3136, 16)],
    "quick": [("msvmunet", 96, 3136, 1), ("mambaunet_224", 192, 3136, 16), ("mambahunet_256", 192, 4096, 16)],
}


def make_inputs(batch, d_inner, length, n, dtype, device, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    dim = 4 * d_inner

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    tensors = dict(
        u=rnd(batch, dim, length).to(dtype),
        delta=rnd(batch, dim, length, scale=0.5, shift=-2.0).to(dtype),
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1).to(device),
        B=rnd(batch, 4, n, length).to(dtype),
        C=rnd(batch, 4, n, length).to(dtype),
        D=torch.ones(dim, device=device),
        delta_bias=rnd(dim, scale=0.1),
    )
    if requires_grad:
        for key in ("u", "delta", "A", "B", "C", "D", "delta_bias"):
            tensors[key].requires_grad_(True)
    return tensors


def write_results(path: str, payload: dict) -> None:
    """Write a results JSON atomically (a temporary file, then renamed), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def timed(fn, device, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def time_reference(t, device):
    """One forward call of the sequential loop (it takes seconds at the larger shapes)."""
    return round(timed(lambda: selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None,
                                                  t["delta_bias"], True), device, 1, warmup=0), 1)


def run_case(backend, t, device, repeat, backward):
    def fwd():
        with torch.no_grad():
            selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True,
                           backend=backend)

    def fwd_bwd():
        out = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True,
                             backend=backend)
        out.float().sum().backward()

    res = {"fwd_ms": round(timed(fwd, device, repeat), 3)}
    if backward:
        res["fwd_bwd_ms"] = round(timed(fwd_bwd, device, max(1, repeat // 2)), 3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="all")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--backends", nargs="+", default=None, help="default: every available backend but ref")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the sequential reference loop")
    ap.add_argument("--ref-max-elements", type=float, default=2e8,
                    help="time the reference only where batch*dim*L*N is at most this (it is slow)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scan_<device>_<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    backends = args.backends or [b for b in available_backends(device) if b != "ref"]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; backends: {', '.join(backends)}")
    rows = []
    header = f"{'network':<16}{'batch':>6}{'d_inner':>8}{'L':>7}{'N':>4}{'dtype':>10}{'backend':>11}" \
             f"{'fwd ms':>10}{'fwd+bwd ms':>12}{'ref fwd ms':>12}{'x ref':>8}"
    print(header)
    for net, d_inner, length, n in PRESETS[args.preset]:
        for batch in args.batch:
            for dtype_name in args.dtype:
                dtype = getattr(torch, dtype_name)
                ref_ms = None
                size = batch * 4 * d_inner * length * n
                if not args.no_ref and size <= args.ref_max_elements:
                    ref_ms = time_reference(make_inputs(batch, d_inner, length, n, dtype, device), device)
                for backend in backends:
                    t = make_inputs(batch, d_inner, length, n, dtype, device, requires_grad=not args.no_backward)
                    res = run_case(backend, t, device, args.repeat, not args.no_backward)
                    row = dict(network=net, batch=batch, d_inner=d_inner, directions=4, L=length, N=n,
                               dtype=dtype_name, backend=backend, **res, ref_fwd_ms=ref_ms,
                               speedup_vs_ref=round(ref_ms / res["fwd_ms"], 1) if ref_ms else None)
                    rows.append(row)
                    print(f"{net:<16}{batch:>6}{d_inner:>8}{length:>7}{n:>4}{dtype_name:>10}{backend:>11}"
                          f"{res['fwd_ms']:>10.2f}{res.get('fwd_bwd_ms', float('nan')):>12.2f}"
                          f"{ref_ms if ref_ms is not None else float('nan'):>12.1f}"
                          f"{row['speedup_vs_ref'] or float('nan'):>8.1f}", flush=True)
    today = dt.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"scan_{device.type}_{today}.json")
    payload = dict(benchmark="selective_scan", date=today, device=device_name, device_type=device.type,
                   torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                   preset=args.preset, note="ms per call, median; fwd+bwd = forward + backward of sum(out)",
                   results=rows)
    write_results(out, payload)
    return payload


if __name__ == "__main__":
    main()
