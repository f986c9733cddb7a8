"""The scan's lower bounds (benchmarks/scan_floors.py): the memory floor is issue 6's, the issue floor as documented."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("scan_floors", os.path.join(ROOT, "benchmarks", "scan_floors.py"))
scan_floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scan_floors)

# ../shared/specs/scan_baseline.md (H100, 2.97 TB/s copy bandwidth): floor forward, floor forward + backward, ms
SPEC_FLOORS = {
    (16, 96, 3136, 1, 4): (0.078, 0.209), (16, 96, 3136, 1, 2): (0.039, 0.105),
    (16, 192, 784, 1, 4): (0.039, 0.104), (16, 384, 196, 1, 4): (0.019, 0.052),
    (16, 192, 3136, 16, 4): (0.164, 0.441), (16, 192, 3136, 16, 2): (0.082, 0.221),
    (16, 768, 196, 16, 4): (0.039, 0.105), (16, 192, 4096, 16, 4): (0.215, 0.576),
    (16, 192, 4096, 16, 2): (0.107, 0.288),
}


@pytest.mark.parametrize("shape", sorted(SPEC_FLOORS), ids=scan_floors.label)
def test_memory_floor_is_the_issue_table(shape):
    fwd, bwd = scan_floors.bytes_moved(*shape)
    want_fwd, want_total = SPEC_FLOORS[shape]
    assert fwd / 2.97e9 == pytest.approx(want_fwd, abs=6e-4)
    assert (fwd + bwd) / 2.97e9 == pytest.approx(want_total, abs=6e-4)


def test_issue_floor_counts_and_table(tmp_path):
    shape = (16, 192, 3136, 16, 2)
    f = scan_floors.floors(shape)
    steps = 16 * 4 * 192 * 3136 * 16
    assert scan_floors.state_steps(*shape[:4]) == steps
    # 18 lane instructions per state-step at 132 x 128 lanes x 1.98 GHz; 2 exp2 at 132 x 16 per cycle
    assert f["issue_ms"] == pytest.approx(steps * 18 / (132 * 128 * 1.98e9) * 1e3)
    assert f["exp2_ms"] == pytest.approx(steps * 2 / (132 * 16 * 1.98e9) * 1e3)
    assert f["bound_ms"] == max(f["memory_ms"], f["issue_ms"], f["exp2_ms"])
    out = tmp_path / "floors.json"
    assert scan_floors.main(["--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(scan_floors.ISSUE_SHAPES) + sum(map(len, scan_floors.NETWORK_SHAPES.values()))
    assert {r["shape"] for r in rows} >= {"b16 192@3136 N16 bf16", "b24 192@4096 N16 bf16", "b10 192@12544 N16 bf16"}
