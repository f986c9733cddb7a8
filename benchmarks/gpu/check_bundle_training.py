"""A short real training of a bundle from its ``configs/train.json`` on the GPU: the whole workflow
(data pipeline, handlers, validation, checkpoints) with the config's CUDA-graph iteration, printing
how many iterations were replayed, captured and run eagerly, and the final metrics.

    python benchmarks/gpu/check_bundle_training.py msvmunet_acdc [--epochs 3] [--batch-size 4]

It trains on the bundle's synthetic sample data (written on first use) and writes the bundle's
``models/`` and ``eval/`` as a normal run does. TensorBoard and MLflow handlers are dropped, so the
device needs neither package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    from monai.bundle import ConfigParser

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", choices=["msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cuda-graphs", choices=["true", "false"], default="true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    root = os.path.join(REPO, args.bundle)
    with open(os.path.join(root, "configs", "train.json")) as f:
        parser = ConfigParser(json.load(f))
    parser["bundle_root"] = root
    parser.update({"epochs": args.epochs, "batch_size": args.batch_size, "num_workers": 2, "val_interval": 1,
                   "show_progress": False, "cuda_graphs": args.cuda_graphs == "true"})
    for key in ("train#handlers", "validate#handlers"):
        if key in parser:
            parser[key] = [h for h in parser[key]
                           if not any(s in str(h.get("_target_", "")) for s in ("TensorBoard", "MLflow", "MLFlow"))]
    start = time.time()
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    iteration = parser.get_parsed_content("train#trainer#iteration_update")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    print(json.dumps({
        "bundle": args.bundle, "seconds": round(time.time() - start, 1),
        "iteration_counts": getattr(iteration, "counts", None),
        "optimizer_fused": parser.get_parsed_content("optimizer").defaults.get("fused"),
        "train_metrics": {k: float(v) for k, v in trainer.state.metrics.items()},
        "val_metrics": {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))},
        "models": sorted(os.listdir(parser.get_parsed_content("ckpt_dir"))),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
