"""A/B of the compiled CPU scan: another revision's C kernel against this tree's, in one process.

    python benchmarks/ab_scan_cpu.py --old bc1268e [--old-flags "-O3 -march=native ..."] [--threads 1]
                                     [--rounds 5] [--out results.json]

The old kernel is ``git show REV:common/ops/csrc/selective_scan_cpu.c`` compiled with ``--old-flags``
(default: the flags this tree builds with) into a temporary folder; the new one is this tree's
library as :mod:`common.ops.scan_cpu` builds it. Both run through this tree's autograd wrapper, so
only the kernels differ, alternating round by round (this machine is shared and noisy: compare
within one run). Shapes: the networks' SS2D scans at the bundles' CPU learning-check sizes (4
directions, grouped B / C, softplus, delta bias, D); the old library is asked for 8 channels per
task (it has no 16-lane blocks). Prints and optionally writes, per shape, the median forward and
backward ms of each, the speed-ups and the largest relative difference of the outputs and
gradients between the two.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common.ops import scan_cpu  # noqa: E402

# (label, batch, 4 * d_inner, L, N): Mamba-HUNet at 96 x 96 and MSSMamba at 64 x 64 (batch 4), MSVM-UNet
# at 96 x 96 (batch 8)
SHAPES = [
    ("Mamba-HUNet 96 px stage 1", 4, 768, 2304, 16),
    ("Mamba-HUNet 96 px stage 2", 4, 1536, 576, 16),
    ("Mamba-HUNet 96 px stage 3", 4, 3072, 144, 16),
    ("MSSMamba 64 px stage 1", 4, 768, 1024, 16),
    ("MSSMamba 64 px stage 2", 4, 1536, 256, 16),
    ("MSVM-UNet 96 px stage 1 (N 1)", 8, 384, 576, 1),
]
# the flags this tree builds with, so that by default only the sources differ. Revisions before FMA contraction
# (bc1268e and older) built with "-O3 -march=native -fopenmp -fno-math-errno -Wno-psabi" (pass it as --old-flags);
# built that way a recent kernel runs ~1.3-1.7x slower on this project's AVX2 machine.
OLD_FLAGS = " ".join(scan_cpu._FLAG_SETS[0])


def build_old(rev: str, flags: str, folder: str) -> ctypes.CDLL:
    source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:common/ops/csrc/selective_scan_cpu.c"],
                            capture_output=True, text=True, check=True).stdout
    src, lib = os.path.join(folder, "selective_scan_cpu.c"), os.path.join(folder, "old.so")
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["cc", *flags.split(), "-shared", "-fPIC", "-std=c11", src, "-o", lib, "-lm"], check=True)
    old = ctypes.CDLL(lib)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd, bwd = getattr(old, f"ss_fwd_{suffix}"), getattr(old, f"ss_bwd_{suffix}")
        fwd.argtypes, fwd.restype = [p] * 11 + [i64] * 7 + [i32] * 3, i32
        bwd.argtypes, bwd.restype = [p] * 19 + [i64] * 7 + [i32] * 3, i32
    if not hasattr(old, "ss_wide_lanes"):
        old.ss_wide_lanes = lambda: 8
    return old


def inputs(batch: int, dim: int, length: int, n: int, groups: int = 4):
    torch.manual_seed(0)
    u = torch.randn(batch, dim, length, requires_grad=True)
    delta = (torch.randn(batch, dim, length) * 0.5).requires_grad_()
    A = (-torch.rand(dim // groups, n).repeat(groups, 1) * 3).requires_grad_()
    B = torch.randn(batch, groups, n, length, requires_grad=True)
    C = torch.randn(batch, groups, n, length, requires_grad=True)
    D = torch.randn(dim, requires_grad=True)
    bias = (torch.randn(dim) * 0.1).requires_grad_()
    return (u, delta, A, B, C, D), bias


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision of the old kernel")
    ap.add_argument("--old-flags", default=OLD_FLAGS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    new = scan_cpu.load_library()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        libs = {"old": build_old(args.old, args.old_flags, folder), "new": new}
        loader = scan_cpu.load_library
        try:
            for label, batch, dim, length, n in SHAPES:
                ins, bias = inputs(batch, dim, length, n)
                times = {k: [] for k in libs}
                results = {}
                for _ in range(args.rounds):
                    for name, lib in libs.items():
                        scan_cpu.load_library = lambda lib=lib: lib
                        t0 = time.perf_counter()
                        out = scan_cpu.selective_scan_cpu(*ins, delta_bias=bias, delta_softplus=True)
                        t1 = time.perf_counter()
                        grads = torch.autograd.grad(out, ins, torch.ones_like(out))
                        t2 = time.perf_counter()
                        times[name].append((t1 - t0, t2 - t1))
                        results[name] = (out, *grads)
                diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                           for a, b in zip(results["new"], results["old"]))
                row = dict(scan=label, batch=batch, dim=dim, L=length, N=n, groups=4)
                for name, ts in times.items():
                    row[f"{name}_fwd_ms"] = round(sorted(t[0] for t in ts)[len(ts) // 2] * 1e3, 2)
                    row[f"{name}_bwd_ms"] = round(sorted(t[1] for t in ts)[len(ts) // 2] * 1e3, 2)
                row["fwd_speedup"] = round(row["old_fwd_ms"] / row["new_fwd_ms"], 2)
                row["bwd_speedup"] = round(row["old_bwd_ms"] / row["new_bwd_ms"], 2)
                row["max_rel_diff"] = float(f"{diff:.2e}")
                print(row, flush=True)
                rows.append(row)
        finally:
            scan_cpu.load_library = loader
    cpu = "x86_64 CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    meta = dict(benchmark="ab_scan_cpu", date=str(datetime.date.today()), device=f"{cpu}, {args.threads} thread(s)",
                new_wide_lanes=new.ss_wide_lanes(), torch=torch.__version__, old=args.old, old_flags=args.old_flags,
                rounds=args.rounds, command=" ".join(["python benchmarks/ab_scan_cpu.py", *(argv or sys.argv[1:])]),
                note="median ms per call; backward = autograd of sum(out) w.r.t. u, delta, A, B, C, D")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
