"""Forward/backward demo of the shared blocks on this machine: ``python -m common.demo``.

Builds the VSS blocks that the three networks use (MSVM-UNet's VMamba-Tiny v2 block, the
Mamba-UNet / VM-UNet v0 block), runs a forward and a backward pass on a random image-sized
feature map with the automatically chosen scan backend, checks the output against the
sequential reference scan, and writes a small JSON report (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from common.networks.blocks import VSSBlock
from common.ops import available_backends, resolve_backend

BLOCKS = {
    # name: (constructor kwargs, input shape (B, C, H, W) or (B, H, W, C))
    "msvmunet_vmamba_tiny_stage1": (
        dict(hidden_dim=96, channel_first=True, ssm_d_state=1, ssm_ratio=1.0, ssm_with_z=False,
             ssm_conv_bias=False, mlp_ratio=4.0),
        (1, 96, 56, 56),
    ),
    "mambaunet_vss_stage1": (
        dict(hidden_dim=96, ssm_d_state=16, ssm_ratio=2.0, norm_eps=1e-6),
        (1, 56, 56, 96),
    ),
}


def run(device: str, out: str | None) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    backend = resolve_backend(None, dev)
    print(f"device {dev}, scan backends available: {available_backends(dev)}, automatic choice: {backend}")
    report = {"device": str(dev), "backend": backend, "blocks": {}}
    for name, (kwargs, shape) in BLOCKS.items():
        block = VSSBlock(**kwargs).to(dev)
        x = torch.randn(*shape, device=dev, requires_grad=True)
        t0 = time.perf_counter()
        y = block(x)
        t1 = time.perf_counter()
        y.square().mean().backward()
        t2 = time.perf_counter()
        with torch.no_grad():
            block.op.scan_backend = "ref"
            err = (block(x) - y).abs().max().item()
            block.op.scan_backend = None
        params = sum(p.numel() for p in block.parameters())
        row = dict(input=list(shape), output=list(y.shape), params=params, forward_ms=round((t1 - t0) * 1e3, 1),
                   backward_ms=round((t2 - t1) * 1e3, 1), max_abs_diff_vs_reference_scan=err,
                   grad_finite=bool(torch.isfinite(x.grad).all()))
        report["blocks"][name] = row
        print(f"{name}: {tuple(shape)} -> {tuple(y.shape)}, {params:,} params, forward {row['forward_ms']} ms, "
              f"backward {row['backward_ms']} ms, |y - y_ref| = {err:.2e}")
        if not row["grad_finite"] or err > 1e-3:
            raise SystemExit(f"{name}: the block disagrees with the reference scan ({err:.2e}) or gave NaN grads")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(out + ".tmp", out)
        print(f"wrote {out}")
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="outputs/demo/report.json")
    args = ap.parse_args(argv)
    run(args.device, args.out)


if __name__ == "__main__":
    main()
