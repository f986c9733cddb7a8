"""The channel LayerNorm kernels (``common.ops.layer_norm``) against PyTorch's norm, on the GPU.

    python benchmarks/gpu/bench_layer_norm.py [--batch 32] [--repeat 50] [--out results.json]

At MSVM-UNet's channel-first maps (224 x 224 input, batch 32: FLKPE's 96 x 224 x 224, the stem's
48 x 112 x 112, the four stages), three cases:

- ``bf16 in, bf16 out``: a norm after a bf16 convolution read by another (LKPE, FLKPE) under
  autocast. PyTorch: permute, ``F.layer_norm`` (float32 under autocast: a cast, the copy, the norm),
  permute back, the next convolution's cast to bf16;
- ``fp32 in, bf16 out``: a VSS block's norm of the float32 residual stream before ``in_proj`` / ``fc1``;
- ``fp32 in, fp32 out``: float32 training (no autocast).

For each: forward and forward + backward (median ms of ``--repeat`` runs, synchronised), both
implementations' outputs and gradients compared, and the kernels' bandwidth against the bytes
they must move (x in and y out forward; x, dy in and dx out backward).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from bench_scan import timed, write_results  # noqa: E402

from common.ops.layer_norm import layer_norm_channels  # noqa: E402

SHAPES = [(96, 224), (48, 112), (96, 56), (192, 28), (384, 14), (768, 7)]  # (channels, side) of MSVM-UNet maps
CASES = [("bf16 in, bf16 out", torch.bfloat16, torch.bfloat16), ("fp32 in, bf16 out", torch.float32, torch.bfloat16),
         ("fp32 in, fp32 out", torch.float32, torch.float32)]


def pytorch_norm(x, w, b, out_dtype):
    """What the networks ran before: LayerNorm2d (autocast's float32 norm) and the next layer's cast."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], w, b, 1e-5).permute(0, 3, 1, 2)
    return y.to(out_dtype)


def kernel_norm(x, w, b, out_dtype):
    return layer_norm_channels(x, w, b, 1e-5, 1, out_dtype)


def measure(fn, x0, w0, b0, g, out_dtype, dev, repeat):
    """Median forward and forward + backward ms of ``fn``, and its output and gradients (float32)."""
    x = x0.clone().requires_grad_()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    autocast = out_dtype != torch.float32

    def fwd():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return fn(x, w, b, out_dtype)

    def fwd_bwd():
        x.grad = w.grad = b.grad = None
        fwd().backward(g)

    with torch.no_grad():
        fwd_ms = timed(fwd, dev, repeat)
    fwd_bwd_ms = timed(fwd_bwd, dev, repeat)
    y = fwd()
    fwd_bwd()
    return fwd_ms, fwd_bwd_ms, (y.detach().float(), x.grad.float(), w.grad, b.grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda",
                    help="cuda; cpu (with TRITON_INTERPRET=1 and --small) only to try the script")
    ap.add_argument("--small", action="store_true", help="maps 16x smaller per side (trying the script)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    rows = []
    for name, in_dtype, out_dtype in CASES:
        for c, side in SHAPES:
            torch.manual_seed(0)
            side = max(1, side // 16) if args.small else side
            x0 = (torch.randn(args.batch, c, side, side, device=dev) * 2 + 0.5).to(in_dtype)
            w0 = torch.rand(c, device=dev) + 0.5
            b0 = torch.randn(c, device=dev)
            g = torch.randn(x0.shape, device=dev, dtype=out_dtype)
            row = {"case": name, "shape": [args.batch, c, side, side]}
            outs = {}
            for impl, fn in (("pytorch", pytorch_norm), ("kernel", kernel_norm)):
                fwd_ms, fwd_bwd_ms, outs[impl] = measure(fn, x0, w0, b0, g, out_dtype, dev, args.repeat)
                row[f"{impl}_fwd_ms"], row[f"{impl}_fwd_bwd_ms"] = round(fwd_ms, 4), round(fwd_bwd_ms, 4)
            p, k = outs["pytorch"], outs["kernel"]
            row["max_abs_diff"] = {n: float((a - r).abs().max()) for n, a, r in zip(("y", "dx", "dw", "db"), k, p)}
            row["max_rel_diff_dw_db"] = [float((k[i] - p[i]).norm() / p[i].norm()) for i in (2, 3)]
            n = x0.numel()
            fwd_bytes = n * (x0.element_size() + g.element_size())
            bwd_bytes = n * (2 * x0.element_size() + g.element_size())
            row["kernel_fwd_tb_s"] = round(fwd_bytes / row["kernel_fwd_ms"] / 1e9, 2)
            row["kernel_bwd_tb_s"] = round(bwd_bytes / max(row["kernel_fwd_bwd_ms"] - row["kernel_fwd_ms"], 1e-6)
                                           / 1e9, 2)
            row["speedup_fwd"] = round(row["pytorch_fwd_ms"] / row["kernel_fwd_ms"], 2)
            row["speedup_fwd_bwd"] = round(row["pytorch_fwd_bwd_ms"] / row["kernel_fwd_bwd_ms"], 2)
            rows.append(row)
            print(f"{name:18s} {tuple(row['shape'])}: fwd {row['pytorch_fwd_ms']} -> {row['kernel_fwd_ms']} ms "
                  f"(x{row['speedup_fwd']}), fwd+bwd {row['pytorch_fwd_bwd_ms']} -> {row['kernel_fwd_bwd_ms']} ms "
                  f"(x{row['speedup_fwd_bwd']}); kernel {row['kernel_fwd_tb_s']} / {row['kernel_bwd_tb_s']} TB/s; "
                  f"max |diff| {row['max_abs_diff']}", flush=True)
            torch.cuda.empty_cache()
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                "date": datetime.date.today().isoformat(), "repeat": args.repeat}
        write_results(args.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
