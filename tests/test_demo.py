"""The README's main-job command (until the bundles land): the block demo writes its report."""

import json
import subprocess
import sys


def test_demo_runs_and_writes_report(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "common.demo", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert "automatic choice: cpu" in res.stdout  # the compiled CPU kernel (a C compiler is on every CI machine)
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu"
    for row in report["blocks"].values():
        assert row["input"] == row["output"]
        assert row["grad_finite"] and row["max_abs_diff_vs_reference_scan"] < 1e-4
    assert not (tmp_path / "report.json.tmp").exists()
