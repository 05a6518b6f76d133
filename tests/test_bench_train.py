"""`dv3 bench train` runs end to end on this CPU and reports both contenders."""

import json
import math
import subprocess
import sys

import pytest

from tests.support.runs import REPO, run_env


@pytest.mark.slow
def test_bench_train_reports_dv3_and_hf_eager(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "train", "--preset", "tiny", "--seq-len", "64",
                             "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--skip-compiled", "--output", str(output)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    entry = report["results"]["tiny"]
    for name in ("dv3", "hf_eager"):
        assert entry[name]["tokens_per_s"] > 0 and entry[name]["step_ms"] > 0
        assert math.isfinite(entry[name]["final_loss"])
    assert entry["speedup_tokens_per_s"] == pytest.approx(entry["dv3"]["tokens_per_s"] / entry["hf_eager"]["tokens_per_s"])
    # Same weights and batches; dropout and sampling draw differently, so the losses are only close.
    assert entry["dv3"]["final_loss"] == pytest.approx(entry["hf_eager"]["final_loss"], rel=0.05)
    assert "dv3 / HF eager tokens/s" in result.stdout
