"""The bundles' own training iteration on the GPU: MONAI's eager SupervisedTrainer against the
CUDA-graph iteration of the training configs' ``cuda_graphs`` switch (``common.engines``).

    python benchmarks/gpu/bench_trainer.py [--bundles msvmunet_acdc ...] [--iterations 40] [--out results.json]

Each bundle's network, loss and optimizer come from its ``configs/train.json`` (paper batch and
image size, default scan backend); the batches are synthetic and already on the GPU, repeated, so
the data pipeline is not measured. images/s is timed over the iterations after the first
``--skip`` (warm-up and capture excluded); peak memory allocated and reserved are over the whole
run. Both runs start from the same weights and see the same batches, so their losses must agree.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import itertools
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from common.engines import graphed_train_iteration  # noqa: E402
from common.ops import layer_norm as _layer_norm  # noqa: E402

DEFAULT_NORM_SCOPE = _layer_norm.SCOPE

BUNDLES = ("msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms")


def _step_kind(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation the optimizer's step runs: fused, foreach or PyTorch's for-loop."""
    fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
    if fused:
        return "fused"
    if foreach or (fused is None and foreach is None and all(p.is_cuda for g in optimizer.param_groups
                                                              for p in g["params"])):
        return "foreach"
    return "for-loop"


def run(bundle: str, graphed: bool, precision: str, iterations: int, skip: int, default_step: bool = False,
        channel_norm: str | None = None, scan_path: str | None = None, compile_mode: str | None = None,
        inductor_config: dict | None = None) -> dict:
    from ignite.engine import Events

    from common.ops import layer_norm, scan_triton

    layer_norm.SCOPE = channel_norm or DEFAULT_NORM_SCOPE  # "all": the A/B of --norms both
    scan_triton.CONFIG_OVERRIDE.clear()
    bidirectional = None
    if scan_path and scan_path.startswith("{"):  # a whole override, e.g. other step-kernel blocks
        override = json.loads(scan_path)
        bidirectional = override.pop("bidirectional", None)  # False: SS2D's four-copy path (bidirectional_scan)
        scan_triton.CONFIG_OVERRIDE.update(override)
    elif scan_path:  # e.g. "tile": the chunked tile kernels where the plane kernels would run (before them)
        scan_triton.CONFIG_OVERRIDE["path"] = scan_path
    from monai.bundle import ConfigParser
    from monai.engines import SupervisedTrainer

    with open(os.path.join(REPO, bundle, "configs", "train.json")) as f:
        cfg = json.load(f)
    parser = ConfigParser(copy.deepcopy(cfg))
    parser["bundle_root"] = os.path.join(REPO, bundle)
    parser["compile_blocks"] = False  # compiled only where a row asks (compile_mode)
    if default_step:  # PyTorch's default optimizer step (foreach on CUDA) instead of the config's fused one;
        parser["optimizer"].pop("fused", None)  # not fused=False, which also turns foreach off (a for-loop step)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network")
    if bidirectional is not None:
        for m in network.modules():
            if hasattr(m, "bidirectional_scan"):
                m.bidirectional_scan = bool(bidirectional)
    if compile_mode:  # regional torch.compile of the blocks' training forward, compiled afresh for this row
        from common.networks import compile_blocks
        from common.networks.compile import compiled_function

        torch._dynamo.reset()
        compiled_function.cache_clear()
        compile_blocks(network, mode=compile_mode)
    loss = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    b, size = parser["batch_size"], parser["image_size"]
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(b, parser["in_channels"], size, size, generator=gen).cuda()
    label = torch.randint(0, parser["num_classes"], (b, 1, size, size), generator=gen).float().cuda()
    data = [{"image": image, "label": label}] * iterations
    amp = precision == "bf16"
    trainer = SupervisedTrainer(device=torch.device("cuda"), max_epochs=1, train_data_loader=data, network=network,
                                optimizer=optimizer, loss_function=loss, amp=amp,
                                amp_kwargs={"dtype": torch.bfloat16} if amp else None,
                                iteration_update=graphed_train_iteration(graphed), decollate=False)
    marks, losses = {}, []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _mark(engine):
        losses.append(engine.state.output["loss"].detach())
        if engine.state.iteration in (1, skip, iterations):
            torch.cuda.synchronize()
            marks[engine.state.iteration] = time.perf_counter()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    patch = torch._inductor.config.patch(inductor_config or {})  # read while the first iterations compile
    try:
        with patch:
            trainer.run()
    finally:
        scan_triton.CONFIG_OVERRIDE.clear()
    seconds = marks[iterations] - marks[skip]
    counts = getattr(trainer._process_function, "counts", None)
    return {
        "bundle": bundle, "precision": precision, "graphed": graphed,
        "optimizer_step": _step_kind(optimizer), "channel_norm_scope": layer_norm.SCOPE,
        "scan_path": scan_path or "default", "compile_blocks": compile_mode, "inductor_config": inductor_config,
        "batch": b,
        "first_iteration_s": round(marks[1] - start, 1), "image_size": size,
        "images_per_s": round((iterations - skip) * b / seconds, 1),
        "step_ms": round(seconds * 1000 / (iterations - skip), 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "losses": [round(float(x), 6) for x in losses],
        "iteration_counts": counts,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--unfused-too", action="store_true",
                    help="also run both iterations with PyTorch's default optimizer step (foreach on CUDA) "
                         "instead of the config's fused one")
    ap.add_argument("--norms", choices=["default", "both"], default="default",
                    help="both: also run the graphed iteration with every norm through the channel-norm kernels "
                         "(common.ops.layer_norm scope 'all', training included)")
    ap.add_argument("--scan-paths", nargs="+", default=[],
                    help="also run the graphed iteration (and each compiled row) with the triton scan forced onto "
                         "these kernel paths (scan_triton.CONFIG_OVERRIDE['path'], e.g. 'tile': the kernels before "
                         "the plane kernels; 'step': the step kernels at N < 8 too), or JSON objects merged into "
                         "CONFIG_OVERRIDE (e.g. '{\"step\": {\"bd_bwd\": 4, \"nsub\": 1}}'); a JSON key "
                         "\"bidirectional\": false sets SS2D's bidirectional_scan off (the four-copy path)")
    ap.add_argument("--graphed-only", action="store_true", help="skip MONAI's eager iteration")
    ap.add_argument("--compile-blocks", nargs="+", default=[], choices=["default", "max-autotune-no-cudagraphs"],
                    help="also run the graphed iteration with the blocks' training forward compiled in this "
                         "torch.compile mode (common.networks.compile_blocks)")
    ap.add_argument("--inductor-config", nargs="+", default=[], metavar="KEY=VALUE",
                    help="with --compile-blocks: also run each compiled row with these torch._inductor.config "
                         "settings (e.g. conv_1x1_as_mm=True; values are Python literals)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    extra = {}
    for item in args.inductor_config:
        key, _, value = item.partition("=")
        extra[key] = ast.literal_eval(value)
    rows = []
    for bundle in args.bundles:
        for precision in args.precisions:
            pair = {}
            for graphed in (True,) if args.graphed_only else (False, True):
                row = run(bundle, graphed, precision, args.iterations, args.skip)
                pair[graphed] = row
                rows.append(row)
                torch.cuda.empty_cache()
            for path in args.scan_paths:
                row = run(bundle, True, precision, args.iterations, args.skip, scan_path=path)
                rows.append(row)
                torch.cuda.empty_cache()
                g = pair[True]
                print(f"{bundle} {precision}: graphed, scan path {path!r} {row['images_per_s']} img/s "
                      f"({row['peak_allocated_gib']} GiB allocated) vs the default's {g['images_per_s']} "
                      f"({g['peak_allocated_gib']} GiB)", flush=True)
            for mode, options, path in itertools.product(args.compile_blocks, [None] + ([extra] if extra else []),
                                                         [None] + args.scan_paths):
                row = run(bundle, True, precision, args.iterations, args.skip, compile_mode=mode,
                          inductor_config=options, scan_path=path)
                rows.append(row)
                torch.cuda.empty_cache()
                g = pair[True]
                diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(g["losses"], row["losses"]))
                how = ", ".join([mode] + ([str(options)] if options else [])
                                + ([f"scan path {path!r}"] if path else []))
                print(f"{bundle} {precision}: graphed, blocks compiled ({how}) {row['images_per_s']} img/s "
                      f"({row['peak_allocated_gib']} GiB allocated; first iteration {row['first_iteration_s']} s) vs "
                      f"{g['images_per_s']} ({g['peak_allocated_gib']} GiB); losses within {diff:.2e}", flush=True)
            if args.unfused_too:
                for graphed in (False, True):
                    row = run(bundle, graphed, precision, args.iterations, args.skip, default_step=True)
                    rows.append(row)
                    torch.cuda.empty_cache()
                    mode = "graphed" if graphed else "eager"
                    print(f"{bundle} {precision}: {mode}, PyTorch's default optimizer step ({row['optimizer_step']}) "
                          f"{row['images_per_s']} img/s", flush=True)
            if args.norms == "both":
                row = run(bundle, True, precision, args.iterations, args.skip, channel_norm="all")
                rows.append(row)
                torch.cuda.empty_cache()
                print(f"{bundle} {precision}: graphed with the channel-norm kernels everywhere {row['images_per_s']} "
                      f"img/s ({row['peak_allocated_gib']} GiB allocated) vs the default's "
                      f"{pair[True]['images_per_s']} "
                      f"({pair[True]['peak_allocated_gib']} GiB)", flush=True)
            g = pair[True]
            if False in pair:
                e = pair[False]
                diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(g["losses"], e["losses"]))
                g["max_rel_loss_diff_vs_eager"] = diff
                print(f"{bundle} {precision} b{e['batch']}: eager {e['images_per_s']} img/s ({e['peak_reserved_gib']} "
                      f"GiB reserved), graphed {g['images_per_s']} img/s ({g['peak_reserved_gib']} GiB), "
                      f"x{g['images_per_s'] / e['images_per_s']:.2f}; losses within {diff:.2e} (relative); "
                      f"{g['iteration_counts']}", flush=True)
            else:
                print(f"{bundle} {precision} b{g['batch']}: graphed {g['images_per_s']} img/s "
                      f"({g['peak_allocated_gib']} GiB allocated, {g['peak_reserved_gib']} reserved); "
                      f"{g['iteration_counts']}", flush=True)
            if args.out:  # after every pair, so a cut-off run keeps what it measured
                meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "date": datetime.date.today().isoformat(), "iterations": args.iterations, "skip": args.skip}
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
