"""GDES under DeepSpeed ZeRO-3 on 2 CPU ranks equals a single-process reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import OptimSection
from engine.train.optim import build_param_groups
from tests.support import REPO
from tests.support.models import build_model, rank_batch


def reference_gradients(sharing: str, loss_name: str, initial: dict | None = None) -> dict[str, torch.Tensor]:
    """Data-parallel mean of the two ranks' gradients of one loss, in one process (from the
    worker's initial weights when given)."""
    model = build_model(sharing).train()
    if initial is not None:
        model.load_state_dict(initial, strict=False)
    for rank in (0, 1):
        ids, mask, masked, labels, sampling_seed = rank_batch(rank)
        torch.manual_seed(sampling_seed)
        output = model(ids, mask, masked, labels)
        (getattr(output, loss_name) / 2).backward()
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in model.embedding_parameters().items()}


def run_worker(tmp_path: Path, worker: str, *arguments: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29000 + os.getpid() % 1000), str(REPO / "tests/workers" / worker), str(tmp_path), *arguments]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run_workers(tmp_path: Path, sharing: str) -> list[dict]:
    run_worker(tmp_path, "gdes_zero3.py", sharing)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.slow
def test_gdes_under_zero3_gives_generator_embedding_only_the_mlm_gradient(tmp_path):
    ranks = run_workers(tmp_path, "gdes")
    got = ranks[0]["gradients"]
    torch.testing.assert_close(ranks[1]["gradients"]["E_G"], got["E_G"])  # gathered: identical on both ranks

    # The worker built the model partitioned: the reference starts from its (gathered) weights,
    # drawn on each partition with the usual scheme.
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    query = initial["discriminator.deberta.encoder.layer.0.attention.self.query_proj.weight"]
    assert abs(float(query.std()) - 0.02) < 0.002 and abs(float(query.mean())) < 0.002
    assert not initial["discriminator.deberta.encoder.layer.0.attention.self.query_proj.bias"].any()
    assert (initial["discriminator.deberta.encoder.layer.0.output.LayerNorm.weight"] == 1).all()
    assert not initial["generator.deberta.embeddings.word_embeddings.weight"][0].any()  # the padding row
    mlm_only = reference_gradients("gdes", "mlm_loss", initial)
    rtd_only = reference_gradients("gdes", "rtd_loss", initial)
    assert got["E_G"].abs().sum() > 0
    torch.testing.assert_close(got["E_G"], mlm_only["E_G"], rtol=1e-5, atol=1e-7)
    expected_delta = 50.0 * rtd_only["E_Delta"]
    torch.testing.assert_close(got["E_Delta"], expected_delta, rtol=1e-4,
                               atol=1e-5 * float(expected_delta.abs().max()))
    # The test can fail: the total loss's E_G gradient under ES (no stop-gradient) is far from MLM's.
    es_total = reference_gradients("es", "loss", initial)["E_G"]
    assert float((es_total - mlm_only["E_G"]).abs().max()) > 1e-3


CLIP_NORM = 0.5  # below both models' gradient norms at initialisation, so both are clipped


def separately_trained_reference() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One update of generator and discriminator as two models: the generator on the MLM loss, the
    discriminator on lambda * RTD, each clipped to its own norm, then AdamW with dv3's groups."""
    model = build_model("gdes").train()
    for rank in (0, 1):  # the data-parallel mean of the two ranks' gradients
        ids, mask, masked, labels, sampling_seed = rank_batch(rank)
        torch.manual_seed(sampling_seed)
        (model(ids, mask, masked, labels).loss / 2).backward()
    # Under GDES the total loss gives the generator only the MLM gradient and the discriminator only
    # lambda * RTD's (test_gdes_under_zero3_gives_generator_embedding_only_the_mlm_gradient).
    norms = {}
    for side in ("generator", "discriminator"):
        parameters = [p for name, p in model.named_parameters() if name.startswith(f"{side}.")]
        norms[side] = float(torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM))
    optim = OptimSection(lr=1e-3, warmup_steps=0, grad_clip=CLIP_NORM)
    groups = build_param_groups(model, optim)
    torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps).step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, norms


@pytest.mark.slow
def test_separate_clipping_under_zero3_updates_each_model_as_if_trained_alone(tmp_path):
    expected, norms = separately_trained_reference()
    assert norms["generator"] > CLIP_NORM and norms["discriminator"] > CLIP_NORM

    run_worker(tmp_path, "clip_zero3.py", "separate", str(CLIP_NORM))
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["norms"] == pytest.approx(norms, rel=1e-5)
    assert got["factors"] == pytest.approx({side: CLIP_NORM / (norm + 1e-6) for side, norm in norms.items()}, rel=1e-5)
    for name, value in expected.items():
        torch.testing.assert_close(got["parameters"][name], value, rtol=1e-5, atol=1e-7, msg=name)

    # The test can fail: one clip over both models (dv3 0.1, optim.clip_mode joint) moves the
    # generator by far less than training it alone would.
    joint = tmp_path / "joint"
    joint.mkdir()
    run_worker(joint, "clip_zero3.py", "joint", str(CLIP_NORM))
    got_joint = torch.load(joint / "result.pt", weights_only=True)
    initial = {name: p.detach() for name, p in build_model("gdes").named_parameters()}
    name = "generator.deberta.encoder.layer.0.attention.self.query_proj.weight"
    separate_step = (expected[name] - initial[name]).norm()
    joint_step = (got_joint["parameters"][name] - initial[name]).norm()
    assert not torch.allclose(got_joint["parameters"][name], expected[name], rtol=1e-3, atol=1e-6)
    assert float(joint_step) < 0.9 * float(separate_step)


@pytest.mark.slow
def test_compiled_layers_under_zero3_are_whole_graphs_and_train_as_eager(tmp_path):
    run_worker(tmp_path, "compile_zero3.py")
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    eager, compiled = result["eager"], result["compiled"]
    # Each layer is one ZeRO-3 unit: its own hook gathers its parameters, its sub-modules have none,
    # so nothing of ZeRO-3 runs inside the compiled forward to break it.
    assert compiled["layer_hooks"] > 0 and compiled["sub_module_hooks"] == 0
    assert result["graph_breaks"] == {}, result["graph_breaks"]
    assert result["unique_graphs"] >= 1  # the compiled layers ran
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=1e-6)
    for name, expected in eager["parameters"].items():  # dropout off: the same update
        torch.testing.assert_close(compiled["parameters"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
