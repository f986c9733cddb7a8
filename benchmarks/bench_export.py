"""ONNX export of each bundle's network with a traceable scan: export time, file size, peak memory,
onnxruntime latency against eager PyTorch, and the largest difference.

Each (bundle, size, scan) runs in its own process (so that its peak memory is its own): random
weights, ``common.export.export_onnx`` at ``size`` (batch axis free), then an onnxruntime session on
the CPU and ``--repeat`` one-slice runs, against the eager network with its automatic scan.

    python benchmarks/bench_export.py --bundles mssmamba_synapse --sizes 64 224 --scans export ref

Writes JSON (``--out``) under ``benchmarks/results/``. The ``ref`` scan unrolls every step of the
sequence into the graph: at the bundles' sizes its exports take tens of minutes to hours.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def one(bundle: str, size: int, scan: str, repeat: int) -> dict:
    import numpy as np
    import onnxruntime
    import torch

    sys.path.insert(0, REPO)
    from common import export

    parser = export.read_bundle_config(os.path.join(REPO, bundle), {"image_size": size})
    torch.manual_seed(0)
    net = export.build_network(parser).eval()
    export.EXPORT_SCAN_BACKEND = scan
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        export.export_onnx(net, torch.randn(1, 1, size, size), path)
        export_s = time.perf_counter() - t0
        export_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t0 = time.perf_counter()
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        session_s = time.perf_counter() - t0
        file_mb = os.path.getsize(path) / 2**20
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    ort_times, eager_times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        ort_times.append(time.perf_counter() - t0)
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            want = net(x)
            eager_times.append(time.perf_counter() - t0)
    return {"bundle": bundle, "size": size, "scan": scan, "export_s": round(export_s, 1),
            "export_peak_rss_gib": round(export_peak, 2), "file_mib": round(file_mb, 1),
            "ort_session_s": round(session_s, 1), "ort_slice_s": [round(t, 3) for t in ort_times],
            "ort_slice_median_s": round(statistics.median(ort_times), 3),
            "eager_slice_median_s": round(statistics.median(eager_times), 3),
            "max_abs_diff": float(np.abs(got - want.numpy()).max()),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", default=["msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[0], help="0: the bundle's own image_size")
    ap.add_argument("--scans", nargs="+", default=["export"], choices=["export", "ref"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=3, metavar=("BUNDLE", "SIZE", "SCAN"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.repeat)))
        return 0
    rows = []
    for bundle in args.bundles:
        for size in args.sizes:
            if size == 0:
                with open(os.path.join(REPO, bundle, "configs", "inference.json")) as f:
                    size = json.load(f)["image_size"]
            for scan in args.scans:
                res = subprocess.run([sys.executable, __file__, "--one", bundle, str(size), scan,
                                      "--repeat", str(args.repeat)], capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:], file=sys.stderr)
                    return res.returncode
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{bundle} {size} px, {scan} scan: export {row['export_s']} s ({row['file_mib']} MiB, "
                      f"peak {row['export_peak_rss_gib']} GiB), onnxruntime session {row['ort_session_s']} s, "
                      f"slice {row['ort_slice_median_s']} s (eager {row['eager_slice_median_s']} s), "
                      f"max |diff| {row['max_abs_diff']:.2g}", flush=True)
    if args.out:
        sys.path.insert(0, HERE)
        import onnxruntime
        import torch
        from bench_scan import write_results

        write_results(args.out, {"date": dt.date.today().isoformat(), "machine": platform.processor() or
                                 platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                 "onnxruntime": onnxruntime.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
