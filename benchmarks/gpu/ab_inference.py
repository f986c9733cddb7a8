"""A/B of one network's inference latency on CUDA: the current code against an older copy of its
module, and the current code with inference options (channels-last weights, TF32, ...).

    git show HEAD~1:common/networks/mssmamba.py > /tmp/mssmamba_before.py
    python benchmarks/gpu/ab_inference.py --network mssmamba --before /tmp/mssmamba_before.py

Every variant gets the same weights (the first variant's state dict) and the same input. For each
variant and precision (float32, bfloat16 autocast) it prints and writes (``--out``, JSON) the
latency of one slice, eager and replayed from a CUDA graph (``CUDAGraphInference``), the median over
``--repeat`` calls, in ``--rounds`` interleaved rounds (so that drift of the machine hits every
variant alike), and the largest difference of the output from the first variant's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from bench_network import NETWORKS, build  # noqa: E402
from bench_scan import timed, write_results  # noqa: E402

from common.networks.blocks.layers import (  # noqa: E402
    fuse_conv_bn_for_inference,
    fuse_conv_relu_for_inference,
    layer_norms_in_input_dtype,
)
from common.networks.graphs import CUDAGraphInference  # noqa: E402
from common.ops import layer_norm, scan_triton  # noqa: E402

DEFAULT_NORM_SCOPE = layer_norm.SCOPE
FOLDED = ("fold_bn", "fold_bn_ln_input_dtype", "fold_bn_compile", "fold_bn_channels_last", "fold_bn_conv_relu",
          "fold_bn_channels_last_conv_relu", "bundle_inference")
CHANNELS_LAST = ("channels_last", "fold_bn_channels_last", "fold_bn_channels_last_conv_relu")  # weights and input
CHANNELS_LAST_WEIGHTS = CHANNELS_LAST + ("bundle_inference",)
CONV_RELU = ("fold_bn_conv_relu", "fold_bn_channels_last_conv_relu", "bundle_inference")


def _load_module_copy(path: str, network: str):
    """An older copy of the network's module, imported inside ``common.networks`` (relative imports work)."""
    target = NETWORKS[network][0].split(":")
    name = target[0] + "_ab_copy"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot be imported as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return getattr(mod, target[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", choices=sorted(NETWORKS), default="mssmamba")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--before", default=None, help="an older copy of the network's module file")
    ap.add_argument("--variants", nargs="+", default=["current", "channels_last", "tf32"],
                    help="current, channels_last (weights and input), tf32 (float32 matmuls / convs), "
                         "compile (torch.compile, then graphed), graph_casts_each_call (the graphs cast "
                         "the weights at every call under autocast, as before they were cast once), "
                         "segments_before (the step scan's time segments as before 2026-12-02: split to "
                         "6 programs per multiprocessor, segments of at least 32 chunks), ln_input_dtype (nn.LayerNorm "
                         "in the input's dtype under autocast instead of float32 in and out; changes the numbers), "
                         "four_copy (SS2D's four-direction copy around the scan, as before its bidirectional scan), "
                         "unfused_scan (SS2D's written-out cross-scan where the plane kernels' fused one runs), "
                         "unfused_io (SS2D's conv / cross-scan copy and merge / norm / gate as separate ops, "
                         "and the norms before linear layers in float32 then cast), float32_norm_cast (only the "
                         "latter), channel_norm_all (every LayerNorm2d too through the channel-norm kernel, "
                         "common.ops.layer_norm scope 'all'), "
                         "fold_bn (batch norms folded into their convolutions), fold_bn_ln_input_dtype (both opt-ins), "
                         "fold_bn_compile (folded, then torch.compile, then graphed), fold_bn_channels_last (folded, "
                         "channels-last weights and input: cuDNN's bf16 kernels then need no layout conversions), "
                         "bundle_inference (what MSSMamba's inference config does: folded, conv + ReLU fused, weights "
                         "channels-last, the input as it comes), "
                         "fold_bn_conv_relu (folded, then each 3x3 convolution + ReLU as one cuDNN call: "
                         "fuse_conv_relu_for_inference), fold_bn_channels_last_conv_relu (both), "
                         "step=JSON (the step kernels with these STEP_CONFIG keys, e.g. "
                         "'step={\"fwd_maxnreg\": 112}', batch norms folded)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script: no graphs there)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    builder, classes, in_ch, size, _ = NETWORKS[args.network]
    torch.manual_seed(0)
    base = build(args.network, args.backend, size).to(device).eval()
    state = base.state_dict()
    x = torch.randn(1, in_ch, size, size, device=device)
    models = {}
    if args.before:
        fn = _load_module_copy(args.before, args.network)
        sized = {"img_size": size} if args.network == "mssmamba" else {}
        old = fn(in_channels=in_ch, num_classes=classes, scan_backend=args.backend, **sized).to(device).eval()
        old.load_state_dict(state)
        models["before"] = old
    for v in args.variants:
        m = build(args.network, args.backend, size).to(device).eval()
        m.load_state_dict(state)
        if v == "unfused_io":
            for mod in m.modules():
                if hasattr(mod, "fused_io"):
                    mod.fused_io = False
        if v == "unfused_scan":
            for mod in m.modules():
                if hasattr(mod, "fused_scan"):
                    mod.fused_scan = False
        if v == "four_copy":
            for mod in m.modules():
                if hasattr(mod, "bidirectional_scan"):
                    mod.bidirectional_scan = False
        if v in ("ln_input_dtype", "fold_bn_ln_input_dtype"):  # the bundles' amp_input_dtype_norms
            layer_norms_in_input_dtype(m)
        if v in FOLDED or v.startswith("step="):  # fuse_conv_bn
            fuse_conv_bn_for_inference(m)
        if v in CONV_RELU:  # 3x3 convolution + ReLU pairs as one cuDNN call each
            fuse_conv_relu_for_inference(m)
        if v in CHANNELS_LAST_WEIGHTS:  # after folding, so that the folded weights are channels-last too
            m = m.to(memory_format=torch.channels_last)
        if v in ("compile", "fold_bn_compile"):
            torch._dynamo.config.cache_size_limit = 64
            m = torch.compile(m, dynamic=False)
        models[v] = m
    def options(name):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        layer_norm.SCOPE = ("off" if name in ("unfused_io", "float32_norm_cast")
                            else "all" if name == "channel_norm_all" else DEFAULT_NORM_SCOPE)
        if name == "segments_before":
            scan_triton.CONFIG_OVERRIDE["step"] = {"seg_fwd_aim": 6, "min_seg_fwd": 32}
        elif name.startswith("step="):
            scan_triton.CONFIG_OVERRIDE["step"] = json.loads(name[len("step="):])
        else:
            scan_triton.CONFIG_OVERRIDE.pop("step", None)
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions

    def inp(name):
        return x.contiguous(memory_format=torch.channels_last) if name in CHANNELS_LAST else x

    graphs = {name: CUDAGraphInference(m, cast_weights_once=name != "graph_casts_each_call").eval()
              for name, m in models.items()}
    rows: dict[tuple, dict] = {}
    for precision in args.precisions:
        amp = precision == "bf16"
        first = None
        for rnd in range(args.rounds):
            for name, m in models.items():
                options(name)
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    if rnd == 0:
                        start = time.perf_counter()
                        out = m(inp(name)).float()
                        first_call_s = time.perf_counter() - start  # compile variants: the compilation
                        first = out if first is None else first
                    eager = timed(lambda m=m, name=name: m(inp(name)), device, max(5, args.repeat // 5), 3)
                    graphed = timed(lambda name=name: graphs[name](inp(name)), device, args.repeat, 3)
                row = rows.setdefault((name, precision), dict(variant=name, precision=precision, eager_ms=[],
                                                               graphed_ms=[]))
                row["eager_ms"].append(round(eager, 3))
                row["graphed_ms"].append(round(graphed, 3))
                if rnd == 0:
                    row["max_abs_diff_vs_first"] = (out - first).abs().max().item()
                    row["first_call_s"] = round(first_call_s, 2)
                    row["output_scale"] = first.abs().max().item()
                print(json.dumps(row), flush=True)
    options("current")
    today = dt.date.today().isoformat()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(benchmark="ab_inference", network=args.network, backend=args.backend, date=today, device=name,
                  torch=torch.__version__, batch=1, size=size, results=list(rows.values()))
    if args.out:
        write_results(args.out, result)


if __name__ == "__main__":
    main()
