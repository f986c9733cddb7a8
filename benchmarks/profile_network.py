"""Where a network's training step spends GPU time: torch.profiler kernel table by category.

    python benchmarks/profile_network.py --network msvmunet --precision bf16 --backend triton
    python benchmarks/profile_network.py --network mssmamba --inference   # one slice, no gradient

Prints the top kernels and a breakdown by category (selective scan, matmul, convolution,
normalisation, elementwise / copies, optimizer) of a few training steps, and writes it as JSON
(``--out``). Categories are matched on kernel names, so they are approximate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_network import NETWORKS, build  # noqa: E402

CATEGORIES = [  # first match wins
    ("selective scan", ("_fwd_kernel", "_bwd_kernel", "selective_scan", "scan_")),
    ("compiled (Inductor)", ("triton_poi", "triton_per", "triton_red", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "matmul", "sgemm", "nvjet", "xmma_gemm", "splitk")),
    ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad", "fprop")),
    ("normalisation", ("norm", "welford")),
    ("softmax / loss", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("reduction", ("reduce",)),
    ("copy / layout", ("copy", "cat", "flip", "transpose", "permute", "index", "gather", "scatter")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", choices=sorted(NETWORKS), default="msvmunet")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--inference", action="store_true", help="profile the forward under no_grad (batch 1 by default)")
    ap.add_argument("--graphed", action="store_true", help="with --inference: replay the forward from a CUDA graph "
                    "(CUDAGraphInference, weights cast once under autocast): the kernels a deployed slice runs")
    ap.add_argument("--ops", type=int, default=0, help="also list the N aten ops with the most device time "
                    "(which op launched the copies), with their input shapes")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="torch.compile the blocks' training forward (common.networks.compile_blocks)")
    ap.add_argument("--fold-bn", action="store_true", help="with --inference: fold the batch norms into their "
                    "convolutions, as the bundles' inference does (fuse_conv_bn)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.graphed and not args.inference:
        ap.error("--graphed profiles inference: add --inference")
    device = torch.device("cuda")
    _, classes, in_ch, size, batch = NETWORKS[args.network]
    batch = args.batch or (1 if args.inference else batch)
    torch.manual_seed(0)
    model = build(args.network, args.backend, size).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if args.compile_blocks:
        from common.networks import compile_blocks

        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    x = torch.randn(batch, in_ch, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch, size, size), device=device)

    forward = model
    if args.graphed:
        from common.networks.graphs import CUDAGraphInference

        forward = CUDAGraphInference(model).eval()

    def step():
        if args.inference:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                forward(x)
            return
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if args.inference:
        model.eval()
        if args.fold_bn:
            from common.networks.blocks.layers import fuse_conv_bn_for_inference

            fuse_conv_bn_for_inference(model)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=args.ops > 0) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        # the optimizer's record_function range also shows as a GPU "kernel" spanning its kernels
        # (a user annotation): counting it would count that time twice
        if ev.device_type == torch.autograd.DeviceType.CUDA and t > 0 and not ev.key.startswith("Optimizer."):
            k = kernels.setdefault(ev.key, [0.0, 0])
            k[0] += t / 1000 / args.steps
            k[1] += ev.count // args.steps
    total = sum(v[0] for v in kernels.values())
    cats: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    what = "inference" if args.inference else "training"
    print(f"{args.network} {what} {args.backend} {args.precision} batch {batch}: GPU kernel time {total:.1f} ms/step, "
          f"{sum(v[1] for v in kernels.values())} kernels/step")
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:16s} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
    for name, (ms, n) in top:
        print(f"  {ms:8.2f} ms {n:5d}x  [{category(name)}] {name[:110]}")
    ops = []
    if args.ops:
        for ev in prof.key_averages(group_by_input_shape=True):
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if ev.device_type == torch.autograd.DeviceType.CPU and t > 0 and ev.key.startswith("aten::"):
                ops.append((t / 1000 / args.steps, ev.count // args.steps, ev.key, str(ev.input_shapes)[:90]))
        ops.sort(reverse=True)
        print("  top aten ops by self device time (ms/step, calls/step, input shapes):")
        for ms, n, key, shapes in ops[: args.ops]:
            print(f"  {ms:8.3f} ms {n:5d}x  {key:28s} {shapes}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(network=args.network, mode=what, backend=args.backend, precision=args.precision, batch=batch,
                           channels_last=args.channels_last, compile_blocks=args.compile_blocks,
                           kernel_ms_per_step=round(total, 2),
                           categories={k: round(v, 2) for k, v in cats.items()},
                           top=[dict(name=n, ms=round(ms, 3), calls=c) for n, (ms, c) in top],
                           ops=[dict(op=k, ms=round(ms, 3), calls=c, shapes=sh) for ms, c, k, sh in ops[: args.ops]]),
                      f, indent=1)


if __name__ == "__main__":
    main()
