"""A bundle's inference on the GPU with and without CUDA-graph replay: same labels, wall time of each.

    python benchmarks/gpu/check_bundle_graphs.py msvmunet_acdc [--image_size 96]

Needs a trained checkpoint in ``<bundle>/models/model.pt`` (``python -m common.bundle_run <bundle>``
writes one). Runs ``monai.bundle run inference`` twice (``--cuda_graphs True`` / ``False``) into two
folders and compares every label volume voxel by voxel.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common.bundle_run import QUICK, REPO, run_workflow  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--image_size", type=int, default=None)
    args = ap.parse_args(argv)
    root = os.path.join(REPO, args.bundle)
    size = args.image_size or QUICK[args.bundle]["inference"]["image_size"]
    out, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for graphs in (True, False):
            out[graphs] = os.path.join(tmp, f"graphs_{graphs}")
            t0 = time.perf_counter()
            run_workflow(root, "inference", {"image_size": size, "cuda_graphs": graphs, "output_dir": out[graphs]},
                         capture=True)
            times[graphs] = time.perf_counter() - t0
        files = sorted(glob.glob(os.path.join(out[True], "**", "*.nii.gz"), recursive=True))
        worst = 1.0
        for f in files:
            a = np.asarray(nib.load(f).dataobj)
            b = np.asarray(nib.load(f.replace(out[True], out[False])).dataobj)
            worst = min(worst, float((a == b).mean()))
    print(f"{args.bundle}: {len(files)} volumes, label agreement graphed vs eager (worst volume) {worst:.6f}; "
          f"inference workflow wall time graphed {times[True]:.1f} s, eager {times[False]:.1f} s")
    return 0 if files and worst > 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
