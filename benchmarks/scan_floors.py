"""Lower bounds on a selective scan's forward + backward time on a GPU: memory, and instruction issue.

    python benchmarks/scan_floors.py                       # H100 SXM, the issue's shapes and the networks'
    python benchmarks/scan_floors.py --out benchmarks/results/scan_floors_h100.json

Issue 6 measures the scan against a **memory floor**: the fewest bytes a forward + backward must move
(forward: u, delta, B, C in, out; backward: u, delta, dout, B, C in, du, ddelta, dB, dC out; D channels in
4 directions, G = 4 groups of B and C) over the device's copy bandwidth. ``bytes_moved`` is that count;
``benchmarks/gpu/compare_scan.py`` uses it with the bandwidth it measures in the same run.

This script adds an **issue floor**. Every (channel, state, step) of a scan needs at least:

- forward (5): the exponent ``dt * A`` (FMUL; log2(e) folded into A), ``exp2`` (MUFU), ``(dt u) B``
  (FMUL; ``dt u`` is per channel and step, shared by the states), ``h = dA h + dt u B`` (FFMA),
  ``y += C h`` (FFMA);
- backward (13), recomputing the states as mamba-ssm's kernel and ours do (storing every ``dA`` would move
  4 bytes per state-step, far over the memory floor): the same exponent, ``exp2``, ``dt u B`` and state
  update (4, one of them MUFU), the adjoint ``g = dA' g + C dy`` (FMUL, FFMA), ``dC += h dy`` and
  ``dB += g dt u`` (FFMA each), ``sum_n g B`` for du and ddelta (FFMA), ``dA h_prev = h - dt u B`` (FADD),
  ``g dA h_prev`` (FMUL), its ``A``-weighted sum for ddelta and its ``dt``-weighted sum for dA (FFMA each).

That is 18 instructions per lane and state-step, 2 of them ``exp2``, with nothing for loads, stores,
loop control, cross-lane sums of dB / dC over a group's channels, or carries between blocks. A GPU issues
one warp instruction per scheduler and cycle (4 x 32 lanes per multiprocessor) and 16 ``exp2`` results
per multiprocessor and cycle (CUDA C++ Programming Guide, arithmetic instruction throughput, compute
capability 9.0: 128 fp32 multiply-adds and 16 base-2 exponentials per clock per multiprocessor). So a
scan can run no faster than ``max(issue floor, MUFU floor, memory floor)``, even with perfect overlap.

The H100 defaults are an SXM card's 132 multiprocessors at 1.98 GHz (its highest boost clock: the
floor is then as low as it can be) and 2.97 TB/s, the copy bandwidth measured on the project's H100
(``../shared/specs/scan_baseline.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

__all__ = ["bytes_moved", "state_steps", "floors", "ISSUE_SHAPES", "NETWORK_SHAPES"]

DIRECTIONS = 4  # SS2D scans 4 directions: dim = 4 x d_inner
GROUPS = 4  # B and C: one (N, L) slab per direction
FWD_ISSUE, BWD_ISSUE = 5, 13  # instructions per lane and state-step (module docstring)
FWD_EXP2, BWD_EXP2 = 1, 1

# (batch, d_inner, L, N, bytes per element): the issue's table (batch 16)
ISSUE_SHAPES = [(16, 96, 3136, 1, 4), (16, 96, 3136, 1, 2), (16, 192, 784, 1, 4), (16, 384, 196, 1, 4),
                (16, 192, 3136, 16, 4), (16, 192, 3136, 16, 2), (16, 768, 196, 16, 4), (16, 192, 4096, 16, 4),
                (16, 192, 4096, 16, 2)]
# each network's training scans at its paper batch, bf16 autocast (the scan's inputs are bf16)
NETWORK_SHAPES = {
    "msvmunet b32 224": [(32, 96, 3136, 1, 2), (32, 192, 784, 1, 2), (32, 384, 196, 1, 2), (32, 768, 49, 1, 2)],
    "mambahunet b24 256": [(24, 192, 4096, 16, 2), (24, 384, 1024, 16, 2), (24, 768, 256, 16, 2),
                           (24, 1536, 64, 16, 2)],
    "mssmamba b10 224": [(10, 192, 12544, 16, 2), (10, 384, 3136, 16, 2), (10, 768, 784, 16, 2)],
}


def bytes_moved(batch: int, d_inner: int, length: int, n_state: int, elem: int) -> tuple[int, int]:
    """The fewest bytes (forward, backward) of one scan call over ``DIRECTIONS`` directions."""
    bdl = batch * DIRECTIONS * d_inner * length
    bgnl = batch * GROUPS * n_state * length
    return (3 * bdl + 2 * bgnl) * elem, (5 * bdl + 4 * bgnl) * elem


def state_steps(batch: int, d_inner: int, length: int, n_state: int) -> int:
    """(channel, state, step) triples of one direction-folded scan."""
    return batch * DIRECTIONS * d_inner * length * n_state


def floors(shape, sms: int = 132, clock_ghz: float = 1.98, bandwidth_tb_s: float = 2.97) -> dict:
    """Forward + backward lower bounds in ms: memory, issue (all lanes busy), exp2 (MUFU)."""
    batch, d_inner, length, n_state, elem = shape
    fwd_b, bwd_b = bytes_moved(batch, d_inner, length, n_state, elem)
    steps = state_steps(batch, d_inner, length, n_state)
    lanes_per_s = sms * 128 * clock_ghz * 1e9
    mufu_per_s = sms * 16 * clock_ghz * 1e9
    memory = (fwd_b + bwd_b) / (bandwidth_tb_s * 1e12) * 1e3
    issue = steps * (FWD_ISSUE + BWD_ISSUE) / lanes_per_s * 1e3
    exp2 = steps * (FWD_EXP2 + BWD_EXP2) / mufu_per_s * 1e3
    return dict(memory_ms=memory, issue_ms=issue, exp2_ms=exp2, target_ms=1.5 * memory,
                bound_ms=max(memory, issue, exp2), issue_over_target=issue / (1.5 * memory))


def label(shape) -> str:
    b, d, length, n, elem = shape
    return f"b{b} {d}@{length} N{n} {'fp32' if elem == 4 else 'bf16'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors (H100 SXM: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (H100 SXM's highest boost: 1.98)")
    ap.add_argument("--bandwidth-tb-s", type=float, default=2.97, help="device copy bandwidth (read + write)")
    ap.add_argument("--out", default=None, help="write the table as JSON")
    args = ap.parse_args(argv)
    hw = dict(sms=args.sms, clock_ghz=args.clock_ghz, bandwidth_tb_s=args.bandwidth_tb_s)
    rows = []
    groups = {"issue table (batch 16)": ISSUE_SHAPES, **NETWORK_SHAPES}
    print(f"{'shape':28s} {'memory':>8s} {'1.5x mem':>9s} {'issue':>8s} {'exp2':>8s}  issue / target   (ms, fwd+bwd)")
    for group, shapes in groups.items():
        print(f"-- {group}")
        for shape in shapes:
            f = floors(shape, **hw)
            print(f"{label(shape):28s} {f['memory_ms']:8.3f} {f['target_ms']:9.3f} {f['issue_ms']:8.3f} "
                  f"{f['exp2_ms']:8.3f}  {f['issue_over_target']:6.2f}")
            rows.append(dict(group=group, shape=label(shape), **{k: round(v, 4) for k, v in f.items()}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(date=dt.date.today().isoformat(), hardware=hw,
                           instructions_per_state_step=dict(forward=FWD_ISSUE, backward=BWD_ISSUE,
                                                            exp2=FWD_EXP2 + BWD_EXP2),
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
