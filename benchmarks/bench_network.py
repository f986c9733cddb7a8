"""Whole-network speed: training step and inference latency per selective-scan backend.

For each backend available on the device: a training step (forward, loss, backward, AdamW step)
at the paper's batch and input size, in float32 and bfloat16 autocast, and inference latency for
one slice and a batch; images/s and peak GPU memory. Writes JSON under ``benchmarks/results/``.

    python benchmarks/bench_network.py --network msvmunet --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_scan import timed, write_results  # noqa: E402  (this folder is on sys.path when run as a script)

from common.networks.graphs import CUDAGraphInference, graphed_for_inference  # noqa: E402
from common.ops import available_backends  # noqa: E402

# slices of a typical 3D volume of each network's data set (ACDC ~10, Synapse 85-198, MS FLAIR ~20-60)
VOLUME_DEPTH = {"msvmunet": 10, "mssmamba": 148, "mambahunet": 48}
NETWORKS = {
    # name: (builder, classes, in_channels, size, paper batch)
    "msvmunet": ("common.networks.msvmunet:msvmunet_tiny", 4, 1, 224, 32),
    "mssmamba": ("common.networks.mssmamba:mssmamba", 9, 1, 224, 10),
    "mambahunet": ("common.networks.mambahunet:mambahunet", 2, 1, 256, 24),
}
# builders that need the input size (MSSMamba's token position embeddings)
_SIZED = {"mssmamba": "img_size"}


# SS2D's bidirectional scan (the default); False: the four-copy cross-scan, for comparisons (--four-copy)
BIDIRECTIONAL = True


def build(name: str, backend: str, size: int):
    target, classes, in_ch, _, _ = NETWORKS[name]
    module, fn = target.split(":")
    mod = __import__(module, fromlist=[fn])
    sized = {_SIZED[name]: size} if name in _SIZED else {}
    model = getattr(mod, fn)(in_channels=in_ch, num_classes=classes, scan_backend=backend, **sized)
    if not BIDIRECTIONAL:
        for m in model.modules():
            if hasattr(m, "bidirectional_scan"):
                m.bidirectional_scan = False
    return model


def measure(network: str, backend: str, precision: str, batch: int, size: int, device, repeat: int,
            compile_mode: str | None = None, graph_train: bool = False) -> dict:
    """Training step and inference timings of one network / backend / precision.

    ``graph_train``: the whole training step (forward, loss, backward, AdamW with ``capturable``)
    captured once in a CUDA graph and replayed (PyTorch's whole-network capture recipe)."""
    _, classes, in_ch, _, _ = NETWORKS[network]
    torch.manual_seed(0)
    model = build(network, backend, size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, capturable=graph_train)
    eager = model
    if compile_mode:
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    x = torch.randn(batch, in_ch, size, size, device=device)
    y = torch.randint(0, classes, (batch, size, size), device=device)
    amp = precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    if graph_train:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                static_loss = torch.nn.functional.cross_entropy(model(x), y)
            static_loss.backward()
            opt.step()
        ms = timed(graph.replay, device, repeat, 3)
    else:
        ms = timed(step, device, repeat, 3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        one = timed(lambda: model(x[:1]), device, repeat, 3)
        full = timed(lambda: model(x), device, repeat, 3)
    row = dict(backend=backend, precision=precision, batch=batch, size=size,
               train_step_ms=round(ms, 2), train_images_per_s=round(batch * 1000 / ms, 1),
               train_peak_gib=round(peak, 2) if peak is not None else None,
               infer_batch1_ms=round(one, 2), infer_images_per_s=round(batch * 1000 / full, 1))
    if compile_mode:
        row["compile"] = compile_mode
    if graph_train:
        row["graph_train"] = True
        row["graph_train_loss_finite"] = bool(torch.isfinite(static_loss).item())
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        row["tf32"] = True
    if device.type == "cuda" and not compile_mode:  # the same inference replayed from CUDA graphs
        graphed = CUDAGraphInference(eager).eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            one_g = timed(lambda: graphed(x[:1]), device, repeat, 3)
            full_g = timed(lambda: graphed(x), device, repeat, 3)
            err = (graphed(x[:1]).float() - model(x[:1]).float()).abs().max().item()
        row.update(graph_infer_batch1_ms=round(one_g, 2), graph_infer_images_per_s=round(batch * 1000 / full_g, 1),
                   graph_max_abs_diff=err)
        # one 3D volume through the bundles' inferer (SliceInferer, 16 slices a batch), eager and as the
        # inference configs run it (graphed_for_inference: batch buckets 1, 2, 4, 8, 16)
        from monai.inferers import SliceInferer

        depth = VOLUME_DEPTH[network]
        vol = torch.randn(1, in_ch, size, size, depth, device=device)
        inferer = SliceInferer(roi_size=(size, size), sw_batch_size=16, spatial_dim=2, progress=False)
        bucketed = graphed_for_inference(eager, max_batch=16).eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            vol_eager = timed(lambda: inferer(vol, eager), device, max(3, repeat // 3), 1)
            vol_graph = timed(lambda: inferer(vol, bucketed), device, max(3, repeat // 3), 1)
        row.update(volume_depth=depth, infer_volume_ms=round(vol_eager, 1), graph_infer_volume_ms=round(vol_graph, 1))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", choices=sorted(NETWORKS), default="msvmunet")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the paper's)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", default=None, choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                    help="torch.compile the network with this mode")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--graph-train", action="store_true", help="replay the whole training step from a CUDA graph")
    ap.add_argument("--time-config", default="", help="use the triton time-in-thread kernels, BLOCK_L,LN,NW,cap")
    ap.add_argument("--step-config", default="", help="JSON merged into the triton step kernels' STEP_CONFIG")
    ap.add_argument("--four-copy", action="store_true",
                    help="SS2D's four-direction copy around the scan instead of its bidirectional scan")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for float32 matmuls / convolutions")
    args = ap.parse_args(argv)
    if args.time_config:
        from common.ops import scan_triton

        scan_triton.CONFIG_OVERRIDE.update(time=tuple(int(x) for x in args.time_config.split(",")), path="time")
    if args.step_config:
        from common.ops import scan_triton

        scan_triton.STEP_CONFIG.update(json.loads(args.step_config))
    global BIDIRECTIONAL
    BIDIRECTIONAL = not args.four_copy
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    _, _, _, size, batch = NETWORKS[args.network]
    size, batch = args.size or size, args.batch or batch
    backends = args.backends or [b for b in available_backends(device) if b != "ref"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    rows = []
    for backend in backends:
        for precision in args.precisions:
            row = measure(args.network, backend, precision, batch, size, device, args.repeat, args.compile,
                          args.graph_train)
            rows.append(row)
            print(json.dumps(row), flush=True)
    today = dt.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"network_{args.network}_{device.type}_{today}.json")
    write_results(out, dict(benchmark="network", network=args.network, date=today, device=name,
                            torch=torch.__version__, results=rows))


if __name__ == "__main__":
    main()
