"""Run a bundle's workflows end to end through the MONAI bundle CLI: ``python -m common.bundle_run``.

``python -m common.bundle_run msvmunet_acdc`` trains briefly on the bundle's synthetic sample
data, evaluates the best checkpoint on the sample test volumes and segments the sample NIfTI
volumes, each step as ``python -m monai.bundle run <workflow> ...`` in a subprocess (exactly what a
user types), then prints where the outputs are. Extra ``--key value`` pairs override config values
of every step (for example ``--epochs 10``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

__all__ = ["bundle_command", "run_workflow", "BUNDLES", "QUICK"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = {
    "msvmunet_acdc": {
        "training": ["configs/train.json"],
        "evaluating": ["configs/train.json", "configs/evaluate.json"],
        "inference": ["configs/inference.json"],
    },
    "mssmamba_synapse": {
        "training": ["configs/train.json"],
        "evaluating": ["configs/train.json", "configs/evaluate.json"],
        "inference": ["configs/inference.json"],
    },
    "mambahunet_ms": {
        "training": ["configs/train.json"],
        "evaluating": ["configs/train.json", "configs/evaluate.json"],
        "inference": ["configs/inference.json"],
    },
}
# small settings for a CPU run on the sample data (the sample slices are 96 x 96)
QUICK = {
    "msvmunet_acdc": {
        "training": {"image_size": 96, "epochs": 8, "batch_size": 8, "val_interval": 2, "num_workers": 0,
                     "show_progress": False},
        "evaluating": {"image_size": 96, "num_workers": 0},
        "inference": {"image_size": 96, "save_overlays": True},
    },
    "mssmamba_synapse": {
        "training": {"image_size": 64, "epochs": 6, "batch_size": 8, "val_interval": 2, "num_workers": 0,
                     "show_progress": False},
        "evaluating": {"image_size": 64, "num_workers": 0},
        "inference": {"image_size": 64, "save_overlays": True},
    },
    "mambahunet_ms": {
        "training": {"image_size": 96, "max_iterations": 120, "batch_size": 8, "val_interval": 5, "num_workers": 0,
                     "show_progress": False},
        "evaluating": {"image_size": 96, "num_workers": 0},
        "inference": {"image_size": 96, "save_overlays": True},
    },
}


def bundle_command(bundle_root: str, workflow: str, overrides: dict | None = None) -> list[str]:
    """The ``python -m monai.bundle run`` command line of one workflow of a bundle in this repo."""
    name = os.path.basename(os.path.normpath(bundle_root))
    configs = BUNDLES[name][workflow]
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", config_arg,
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--bundle_root", "."]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return cmd


def run_workflow(bundle_root: str, workflow: str, overrides: dict | None = None, env: dict | None = None,
                 capture: bool = False) -> subprocess.CompletedProcess:
    """Run one workflow in ``bundle_root`` with the repository importable; raise on failure."""
    environ = dict(os.environ if env is None else env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, environ.get("PYTHONPATH", "")]))
    cmd = bundle_command(bundle_root, workflow, overrides)
    res = subprocess.run(cmd, cwd=bundle_root, env=environ, text=True, capture_output=capture)
    if res.returncode != 0:
        tail = (res.stdout or "")[-3000:] + (res.stderr or "")[-3000:] if capture else ""
        raise RuntimeError(f"{workflow} of {bundle_root} failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", choices=sorted(BUNDLES))
    ap.add_argument("--workflows", nargs="+", default=["training", "evaluating", "inference"])
    args, extra = ap.parse_known_args(argv)
    if len(extra) % 2:
        ap.error(f"overrides come in --key value pairs, got {extra}")
    overrides = {extra[i].lstrip("-"): extra[i + 1] for i in range(0, len(extra), 2)}
    root = os.path.join(REPO, args.bundle)
    for workflow in args.workflows:
        settings = {**QUICK[args.bundle].get(workflow, {}), **overrides}
        print(f"== {args.bundle}: {workflow} ({' '.join(f'{k}={v}' for k, v in settings.items())})", flush=True)
        run_workflow(root, workflow, settings)
    print(f"\noutputs of {args.bundle}:")
    for label, rel in (("checkpoints", "models"), ("evaluation tables", "eval/summary.csv"),
                       ("per-volume metrics", "eval/per_volume.csv"),
                       ("segmentations + PNG overlays", "eval/predictions")):
        path = os.path.join(root, rel)
        if os.path.exists(path):
            print(f"  {label:<20} {path}")
    summary = os.path.join(root, "eval", "metrics.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            means = [s for s in json.load(f)["summary"] if s["class"] == "mean"]
        for s in means:
            print(f"  {s['metric']:<20} {s['mean']:.4f} (mean over classes and volumes)")


if __name__ == "__main__":
    main()
