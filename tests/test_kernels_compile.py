"""The compile report compiles the kernels for sm_90 the way a launch specialises them, even
without a GPU, and its figures come from the compiler (a real check: no GPU-only compile error
goes unnoticed here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_report(tmp_path, *arguments):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    output = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "kernels.compile_report", "--arch", "90", "--json", str(output), *arguments],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(output.read_text())


def test_report_specialises_like_a_launch_and_reads_the_compilers_figures(tmp_path):
    report = run_report(tmp_path, "--limit", "1", "--phases", "forward")
    forward = [r for r in report["kernels"] if r["phase"] == "forward"]
    assert len(forward) == 1
    row = forward[0]
    # Aligned pointers and 16-divisible strides are hinted, as a real launch hints them ...
    assert row["hinted_arguments"] >= 10
    # ... so the K/V loads are pipelined (cp.async) and the shared memory is the pipelined kernel's.
    assert row["cp_async"] > 0 and row["shared"] > 32 * 1024
    assert row["registers"] > 0 and row["blocks_per_sm"] >= 1
    assert {r["phase"] for r in report["kernels"]} >= {"edge_dots", "delta", "keep_mask"}
    assert report["meta"]["triton"] and report["meta"]["arch"] == "sm_90"


def test_first_tuning_candidates_meet_the_sm90_targets(tmp_path):
    # Targets read from the compiler: no spills, >= 2 pipelined stages wherever K/V (or Q/dO)
    # are streamed, and wgmma in the passes whose tiles have 64 rows per warpgroup.
    report = run_report(tmp_path, "--limit", "1", "--no-helpers")
    rows = {r["phase"]: r for r in report["kernels"]}
    assert set(rows) == {"forward", "backward_dq", "backward_dkv", "backward_band_dq", "backward_far_dq",
                         "backward_band_dkv", "backward_far_dkv"}, rows.keys()
    for row in rows.values():
        assert "error" not in row, row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert row["num_stages"] >= 2 and row["cp_async"] > 0, row
    for phase in ("forward", "backward_far_dq"):
        assert rows[phase]["wgmma"] > 0 and rows[phase]["mma_sync"] == 0, rows[phase]
