"""GDES under DeepSpeed ZeRO-3 on 2 CPU ranks equals a single-process reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.models import build_model, rank_batch

REPO = Path(__file__).resolve().parent.parent


def reference_gradients(sharing: str, loss_name: str) -> dict[str, torch.Tensor]:
    """Data-parallel mean of the two ranks' gradients of one loss, in one process."""
    model = build_model(sharing).train()
    for rank in (0, 1):
        ids, mask, masked, labels, sampling_seed = rank_batch(rank)
        torch.manual_seed(sampling_seed)
        output = model(ids, mask, masked, labels)
        (getattr(output, loss_name) / 2).backward()
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in model.embedding_parameters().items()}


def run_workers(tmp_path: Path, sharing: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29000 + os.getpid() % 1000), str(REPO / "tests/workers/gdes_zero3.py"), str(tmp_path), sharing]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
def test_gdes_under_zero3_gives_generator_embedding_only_the_mlm_gradient(tmp_path):
    ranks = run_workers(tmp_path, "gdes")
    got = ranks[0]["gradients"]
    torch.testing.assert_close(ranks[1]["gradients"]["E_G"], got["E_G"])  # gathered: identical on both ranks

    mlm_only = reference_gradients("gdes", "mlm_loss")
    rtd_only = reference_gradients("gdes", "rtd_loss")
    assert got["E_G"].abs().sum() > 0
    torch.testing.assert_close(got["E_G"], mlm_only["E_G"], rtol=1e-5, atol=1e-7)
    expected_delta = 50.0 * rtd_only["E_Delta"]
    torch.testing.assert_close(got["E_Delta"], expected_delta, rtol=1e-4,
                               atol=1e-5 * float(expected_delta.abs().max()))
    # The test can fail: the total loss's E_G gradient under ES (no stop-gradient) is far from MLM's.
    es_total = reference_gradients("es", "loss")["E_G"]
    assert float((es_total - mlm_only["E_G"]).abs().max()) > 1e-3
