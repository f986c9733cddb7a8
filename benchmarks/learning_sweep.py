"""Sweep short training runs of a bundle on its sample data: which settings learn, and how fast.

Each setting is one ``python -m monai.bundle run training`` of a fresh copy of the bundle (the same
command the tests and users run), with the setting's config overrides; the validation metric the
trainer logs after each validation round is the learning curve, and the run's wall time, steps and
final metric are recorded. Several settings run at once (``--parallel``), which suits a GPU
machine with many CPU cores; on this 2-core CPU run one at a time.

``settings`` is a JSON file: ``{"name": {"override": value, ...}, ...}`` (nested config keys with
``#``, for example ``"optimizer#lr": 0.05``; a whole dict replaces a config section). Results go to
``--out`` as JSON (device, date, per-setting curve, best, final, seconds)::

    python benchmarks/learning_sweep.py mssmamba_synapse settings.json --base '{"image_size": 64}' \
        --parallel 6 --out benchmarks/results/learning_mssmamba_cuda.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.bundle_run import REPO, bundle_command  # noqa: E402

_VAL = re.compile(r"Epoch\[(\d+)\] Metrics -- .*?val_mean_dice: ([-0-9.eE]+|nan)")
_STEPS = re.compile(r"Epoch\[(\d+)\] Complete")


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def run_setting(bundle: str, name: str, overrides: dict, work: str, evaluate: bool = False) -> dict:
    """Train a fresh copy of ``bundle`` with ``overrides``; the logged validation curve and timings.

    With ``evaluate``, the bundle's evaluation then runs on the best checkpoint and its per-class
    summary (``eval/metrics.json``) is added as ``summary``: ``{metric: {class: mean}}``.
    """
    root = os.path.join(work, name, bundle)
    shutil.copytree(os.path.join(REPO, bundle), root,
                    ignore=shutil.ignore_patterns("sample_data", "eval", "*.pt", "__pycache__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    res = subprocess.run(bundle_command(root, "training", overrides), cwd=root, env=env, text=True,
                         capture_output=True)
    seconds = time.perf_counter() - t0
    log = res.stdout + res.stderr
    curve = [(int(e), float(v)) for e, v in _VAL.findall(log)]
    out = {"overrides": overrides, "seconds": round(seconds, 1), "returncode": res.returncode, "curve": curve}
    if curve:
        out["final"] = curve[-1][1]
        out["best"] = max(v for _, v in curve)
    if res.returncode != 0:
        out["error"] = log[-2000:]
    if evaluate and res.returncode == 0:
        ev = subprocess.run(bundle_command(root, "evaluating", overrides), cwd=root, env=env, text=True,
                            capture_output=True)
        log += ev.stdout + ev.stderr
        if ev.returncode == 0:
            with open(os.path.join(root, "eval", "metrics.json")) as f:
                summary = json.load(f)["summary"]
            out["summary"] = {}
            for row in summary:
                out["summary"].setdefault(row["metric"], {})[row["class"]] = row["mean"]
        else:
            out["error"] = log[-2000:]
    with open(os.path.join(work, name, "log.txt"), "w") as f:
        f.write(log)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("settings", help="JSON file: {name: {override: value}}")
    ap.add_argument("--base", default="{}", help="JSON overrides common to every setting")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--evaluate", action="store_true", help="also run the bundle's evaluation of each run")
    ap.add_argument("--keep", default=None, help="folder to keep the runs in (default: a temporary one)")
    args = ap.parse_args(argv)
    with open(args.settings) as f:
        settings = json.load(f)
    base = json.loads(args.base)
    work = args.keep or tempfile.mkdtemp(prefix="sweep_")
    os.makedirs(work, exist_ok=True)
    results: dict[str, dict] = {}
    with cf.ThreadPoolExecutor(max_workers=args.parallel) as pool:  # each copy generates its own sample data
        futures = {pool.submit(run_setting, args.bundle, n, {**base, **o}, work, args.evaluate): n
                   for n, o in settings.items()}
        report = {"bundle": args.bundle, "device": _device_name(), "date": datetime.date.today().isoformat(),
                  "parallel_runs": args.parallel, "base": base, "results": results}
        for fut in cf.as_completed(futures):
            n = futures[fut]
            results[n] = fut.result()
            print(n, json.dumps(results[n])[:400], flush=True)
            if args.out:  # after every run, so that a sweep cut short keeps what finished
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    for n, r in results.items():
        print(f"{n:<28} final {r.get('final', float('nan')):.3f} best {r.get('best', float('nan')):.3f} "
              f"{r['seconds']:7.1f} s  rc {r['returncode']}")


if __name__ == "__main__":
    main()
