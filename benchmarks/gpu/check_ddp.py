"""Each bundle's ``multi_gpu_train.json`` on the GPUs of this machine (NCCL), then resumed; with timings.

    python benchmarks/gpu/check_ddp.py [--bundles msvmunet_acdc ...] [--json out.json]

For every bundle, on a fresh copy of the bundle with its generated sample data: single-process
``train.json`` (the reference speed), ``torchrun --nproc_per_node <GPUs>`` with
``multi_gpu_train.json`` (NCCL), then the distributed run resumed for one more epoch from its
training checkpoint (``--resume True``). Prints and records the wall time of each training, images
per second from the trainer's epoch times (first epoch excluded: warm-up), and whether the resumed
run picked up the checkpoint. With one GPU it checks the NCCL path of the distributed config; the
speed-up needs several.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.bundle_run import REPO, bundle_command  # noqa: E402

SETTINGS = {  # sample-data trainings of a few epochs, at each network's GPU-friendly size
    "msvmunet_acdc": {"image_size": 224, "batch_size": 16, "epochs": 4, "val_interval": 100},
    "mssmamba_synapse": {"image_size": 224, "batch_size": 8, "epochs": 4, "val_interval": 100},
    "mambahunet_ms": {"image_size": 256, "batch_size": 12, "max_iterations": 60, "val_interval": 100},
}


def _train(root: str, configs: list[str], settings: dict, nproc: int) -> tuple[float, str]:
    cmd = bundle_command(root, "training", {**settings, "num_workers": 4, "show_progress": False})
    cmd[cmd.index("--config_file") + 1] = str(configs)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")]))}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return wall, out


def _images_per_s(log: str, batch: int, nproc: int) -> float | None:
    """From ignite's "Epoch[k] Complete. Time taken: hh:mm:ss.sss" of the trainer and iterations per epoch."""
    times = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in
             re.findall(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)", log)]
    iters = re.findall(r"Epoch: \d+/\d+, Iter: \d+/(\d+)", log)
    if len(times) < 2 or not iters:
        return None
    per_epoch = int(iters[-1]) * batch * max(1, nproc)
    return per_epoch * (len(times) - 1) / sum(times[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", default=list(SETTINGS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("no CUDA device")
        return 1
    results = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "bundles": {}}
    for name in args.bundles:
        settings = SETTINGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            root = os.path.join(tmp, name)
            shutil.copytree(os.path.join(REPO, name), root, ignore=shutil.ignore_patterns("eval", "*.pt"))
            single, log1 = _train(root, ["configs/train.json"], settings, 0)
            for f in os.listdir(os.path.join(root, "models")):
                if f.endswith(".pt"):
                    os.remove(os.path.join(root, "models", f))
            dist, log2 = _train(root, ["configs/train.json", "configs/multi_gpu_train.json"], settings, gpus)
            more = {**settings, "resume": True}
            if "epochs" in settings:
                more["epochs"] = settings["epochs"] + 1
            else:
                more["max_iterations"] = settings["max_iterations"] * 2
            resumed, log3 = _train(root, ["configs/train.json", "configs/multi_gpu_train.json"], more, gpus)
            state = torch.load(os.path.join(root, "models", "checkpoint_last.pt"), map_location="cpu",
                               weights_only=True)
            row = {"settings": settings, "single_process_wall_s": round(single, 1),
                   "single_process_images_per_s": _images_per_s(log1, settings["batch_size"], 0),
                   f"torchrun_{gpus}_wall_s": round(dist, 1),
                   f"torchrun_{gpus}_images_per_s": _images_per_s(log2, settings["batch_size"], gpus),
                   "resumed": "resumed from" in log3, "resumed_wall_s": round(resumed, 1),
                   "final_iteration": int(state["trainer"]["iteration"]), "dist_backend": "nccl"}
            results["bundles"][name] = row
            print(name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["resumed"] for r in results["bundles"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
