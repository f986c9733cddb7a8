"""Offline sm_90 SASS of the step kernels: registers, spills and the main loop's instruction mix, no GPU.

    python benchmarks/offline_sass.py [--module common.ops.scan_triton] [--json out.json]

Compiles ``_fwd_kernel_s`` and ``_bwd_kernel_s`` (the N = 16 scans' kernels) with the installed
Triton for an H100 (``GPUTarget("cuda", 90, 64)``; Triton's own ptxas and cuobjdump) at the shipped
launch options (8-channel blocks, 16 states, D, delta_bias, softplus, states every 2nd chunk, stored
dt, 2 blocks per backward program), with the integer arguments marked divisible by 16 as Triton's
runtime specialization marks them at the networks' shapes (L 64 ... 12544), and prints per kernel
and input dtype: registers, stack bytes (spills), and the instruction count and mix of the longest
loop (the chunk loop: 4 steps of one block in the forward, of 2 blocks in the backward); the backward
with its B / C reads and dB / dC writes per step and as 4-step vectors (``STEP_CONFIG["bwd_vec"]``), and
in module copies that have them, both kernels with B / C chunk-interleaved (``IL``, tried and removed
2026-12-07). Layout
decisions show here first: a loop with 64 SHFL where 8 are needed, BAR / STS / LDS from shared-
memory layout conversions, MUFU counted twice where a recurrence was computed in two layouts. Run it
once per Triton version (each in its own virtual environment) to see where versions differ.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOAT32_POINTERS = {"A_ptr", "D_ptr", "bias_ptr", "states_ptr", "dts_ptr", "seg_h_ptr", "seg_dt_ptr", "last_ptr",
                    "q_ptr", "seg_g_ptr", "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr"}
# integer arguments that are multiples of 16 at the networks' training shapes (st_n is unspecialized)
DIVISIBLE = {"dim", "L", "n_state", "n_chunks", "n_saved", "seg_chunks", "bc_chunk"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, dtype: str, constexprs: dict):
    sig, names = {}, list(fn.arg_names)
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") or n in DIVISIBLE or n[:3] in ("sb_", "sc_", "dpg")}
    src = ASTSource(fn, sig, constexprs={k: v for k, v in constexprs.items() if k in names}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=1))


def sass_stats(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    ins, loops = [], []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d\s+)?BRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            loops.append((int(m.group(2), 16), int(m.group(1), 16)))
    lo, hi = max(loops, key=lambda x: x[1] - x[0])
    body = [op for pc, op in ins if lo <= pc <= hi]
    mix = collections.Counter(body)
    return dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
                loop_instructions=len(body),
                loop_mix={k: mix[k] for k in ("SHFL", "MUFU", "LDG", "STG", "BAR", "STS", "LDS", "STSM", "LDSM",
                                             "FFMA", "FMUL", "FADD") if mix[k]})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--module", default="common.ops.scan_triton")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--json", default=None, help="append the rows to this JSON list")
    args = ap.parse_args(argv)
    st = importlib.import_module(args.module)
    common = dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=True, FP64=False, BD=8, BN=16, NUM_STAGES=1,
                  SAVE_EVERY=2, REV=False)
    step = st._step_config(768, 4096, 16, 192, 24, False, False, __import__("torch").device("cpu")) \
        if hasattr(st, "_step_config") else {}
    fwd = dict(common, SAVE_STATES=True, LOCAL=False, STORE_DT=True, SA=step.get("SA"),
               PREFETCH=step.get("prefetch_fwd"))
    bwd = dict(common, B_ATOMIC=False, C_ATOMIC=False, NSUB=2, DT_STORED=True, SA=step.get("SA"))
    if "IL" in st._fwd_kernel_s.arg_names:  # B / C chunk-interleaved (bc_chunks): off in the shipped rows
        fwd, bwd = dict(fwd, IL=False), dict(bwd, IL=False)
    kernels = [("forward", st._fwd_kernel_s, fwd)]
    if "VEC" in st._bwd_kernel_s.arg_names:  # the backward's scalar and vector B / C accesses (bwd_vec)
        kernels += [("backward", st._bwd_kernel_s, dict(bwd, VEC=False)),
                    ("backward, bwd_vec", st._bwd_kernel_s, dict(bwd, VEC=True))]
    else:
        kernels.append(("backward", st._bwd_kernel_s, bwd))
    if "IL" in st._fwd_kernel_s.arg_names:
        kernels += [("forward, bc_chunks", st._fwd_kernel_s, dict(fwd, IL=True)),
                    ("backward, bwd_vec + bc_chunks", st._bwd_kernel_s, dict(bwd, VEC=True, IL=True))]
    rows = []
    for name, fn, consts in kernels:
        consts = {k: v for k, v in consts.items() if v is not None}
        for dtype in args.dtypes:
            row = dict(module=args.module, triton=triton.__version__, kernel=name, dtype=dtype,
                       **sass_stats(compile_kernel(fn, dtype, consts)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        old = json.load(open(args.json)) if os.path.exists(args.json) else []
        with open(args.json, "w") as fh:
            json.dump(old + rows, fh, indent=1)


if __name__ == "__main__":
    main()
