"""Build mamba-ssm's ``selective_scan_cuda`` extension from its PyPI sdist, for comparison runs.

For benchmarking on a GPU machine with no internet: carry the sdist (``mamba_ssm-*.tar.gz``) in,
then::

    python benchmarks/gpu/build_mamba_ssm_scan.py .whl/mamba_ssm-2.3.2.post1.tar.gz /tmp/mamba_build

It extracts the package, compiles only the selective-scan CUDA extension (for the local GPU's
architecture, with the nvcc flags of mamba-ssm's setup.py) and trims the package ``__init__`` to
the scan interface, so that ``import mamba_ssm.ops.selective_scan_interface`` works without
mamba-ssm's other dependencies. Put the printed folder on ``PYTHONPATH``. The build is a
measurement aid, never part of this repository.
"""

from __future__ import annotations

import glob
import os
import sys
import tarfile
import time

import torch
from torch.utils.cpp_extension import load

NVCC_FLAGS = [
    "-O3", "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
]


def main(sdist: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(out_dir, filter="data")
    root = glob.glob(os.path.join(out_dir, "mamba_ssm-*"))[0]
    init = os.path.join(root, "mamba_ssm", "__init__.py")
    with open(init, "w") as f:
        f.write("# trimmed for the selective-scan comparison build\n")
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    src = os.path.join(root, "csrc", "selective_scan")
    sources = [os.path.join(src, "selective_scan.cpp")] + sorted(glob.glob(os.path.join(src, "*.cu")))
    build = os.path.join(out_dir, "build")
    os.makedirs(build, exist_ok=True)
    t0 = time.time()
    load(name="selective_scan_cuda", sources=sources, extra_cuda_cflags=NVCC_FLAGS,
         extra_cflags=["-O3", "-std=c++17"], build_directory=build, verbose=False)
    print(f"built selective_scan_cuda in {time.time() - t0:.0f} s; PYTHONPATH={root}:{build}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
