"""A driver for Nsight Compute: the triton scan's forward + backward at one N = 16 training shape, a few times.

    ncu --kernel-name regex:"_fwd_kernel_s|_bwd_kernel_s|_bwd_local" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \\
        python benchmarks/gpu/ncu_step_kernels.py --step '{"bwd_vec": false}' > $OUT/ncu.txt

The default shape is Mamba-HUNet's stage-1 training scan (batch 24, 4 x 192 channels, L 4096, N 16, bf16,
softplus, D, delta_bias), as in ``benchmarks/results/ncu_and_sass_step_kernels_2026-12-07.json``. The first
iteration compiles the kernels; ``--launch-skip 2`` above skips its two launches (the forward and the backward;
at small batches the sequence is split into time segments, and each pass then adds a local-pass launch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_scan import make  # noqa: E402  (this folder)

from common.ops import scan_triton, selective_scan  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--d-inner", type=int, default=192)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--step", default="", help="JSON merged into the step kernels' STEP_CONFIG for this run")
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args(argv)
    if args.step:
        scan_triton.CONFIG_OVERRIDE["step"] = json.loads(args.step)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ins = make(args.batch, args.d_inner, args.length, 16, dtype)
    leaves = [t.detach().clone().requires_grad_(i != 6) if t is not None else None for i, t in enumerate(ins)]
    wrt = [t for t in leaves if t is not None]
    gout = torch.randn(args.batch, 4 * args.d_inner, args.length, device="cuda", dtype=dtype)
    for _ in range(args.iterations):
        torch.autograd.grad(selective_scan(*leaves, True, backend="triton"), wrt, gout)
    torch.cuda.synchronize()
    print("ran", args.iterations, "iterations of", vars(args))


if __name__ == "__main__":
    main()
