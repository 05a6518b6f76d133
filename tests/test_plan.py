"""dv3 plan against what a run really keeps: model states exactly (a ZeRO-3 engine's own tensors),
activations against autograd's saved tensors (exact per layer, within 10% for the whole model)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engine.config import EncoderConfig, RTDConfig
from engine.model import RTDModel
from engine.train.memory import layer_activation_bytes, saved_activation_bytes
from engine.train.plan import (
    PlanInput,
    activation_bytes,
    largest_micro_batch,
    model_state_bytes,
    parameter_sizes,
    plan,
)
from engine.train.plan import layer_activation_bytes as planned_layer_bytes
from tests.support import REPO
from tests.support.models import build_model


def encoder(hidden: int = 32, heads: int = 2, dropout: float = 0.1) -> EncoderConfig:
    return EncoderConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                         intermediate_size=80, position_buckets=8, max_relative_positions=32,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def cpu_plan(config: EncoderConfig, batch: int, length: int, attention: str = "reference", **changes) -> PlanInput:
    return PlanInput(config, RTDConfig(**changes), length, batch, world_size=1, zero_stage=3, dtype="fp32",
                     attention=attention, device="cpu")


@pytest.mark.parametrize("batch, length, hidden, heads, dropout", [(2, 24, 32, 2, 0.1), (3, 40, 48, 3, 0.0)])
def test_one_layer_keeps_exactly_what_the_plan_counts(batch, length, hidden, heads, dropout):
    config = encoder(hidden, heads, dropout)
    expected = layer_activation_bytes(config, batch, length, recompute=False)
    assert planned_layer_bytes(config, batch, length, cpu_plan(config, batch, length)) == expected


def test_the_fused_path_keeps_exactly_what_the_plan_counts(monkeypatch):
    monkeypatch.setenv("DV3_ATTENTION", "fused")  # the Triton kernels, in the interpreter on a CPU
    config = encoder(hidden=64, heads=2, dropout=0.1)
    expected = layer_activation_bytes(config, 2, 32, recompute=False)
    assert planned_layer_bytes(config, 2, 32, cpu_plan(config, 2, 32, attention="fused")) == expected


@pytest.mark.parametrize("changes, every", [({"enhanced_mask_decoder": False}, 0), ({"enhanced_mask_decoder": True}, 0),
                                            ({"enhanced_mask_decoder": True}, 1)])
def test_the_whole_model_keeps_what_the_plan_counts_within_ten_percent(changes, every):
    config = encoder()
    torch.manual_seed(0)
    model = RTDModel(config, RTDConfig(**changes)).train()
    model.set_activation_checkpointing(every)
    ids = torch.randint(4, 99, (2, 24))
    masked, labels = model.mask(ids, torch.ones_like(ids), torch.arange(2))
    measured = saved_activation_bytes(lambda: model(ids, None, masked, labels).loss, exclude=list(model.parameters()))
    inputs = cpu_plan(config, 2, 24, **changes)
    planned = activation_bytes(PlanInput(**{**inputs.__dict__, "activation_checkpointing": every}))
    if every:
        # Checkpointed layers keep their inputs; the plan adds one layer being recomputed, at the backward's peak.
        planned -= planned_layer_bytes(config, 2, 24, inputs)
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    inputs = PlanInput(EncoderConfig(), RTDConfig(), seq_len=512, micro_batch=1, world_size=8, zero_stage=3)
    largest = largest_micro_batch(inputs, device_gib=80, reserve_gib=4)
    sizes = parameter_sizes(inputs.encoder, inputs.rtd)
    assert plan(PlanInput(**{**inputs.__dict__, "micro_batch": largest}), sizes).total_gib + 4 <= 80
    assert plan(PlanInput(**{**inputs.__dict__, "micro_batch": largest + 1}), sizes).total_gib + 4 > 80


def test_dv3_plan_prints_every_part_and_the_verdict():
    result = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "--preset", "base", "--seq-len", "512",
                             "--micro-batch", "8", "--world-size", "8", "--device-memory", "80"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for label in ("parameters", "gradients", "optimizer states", "activations", "fits", "largest micro-batch"):
        assert label in result.stdout


@pytest.mark.slow
def test_model_states_equal_a_zero3_engines_own_tensors(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(28000 + os.getpid() % 1000), str(REPO / "tests/workers/model_states.py"), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads((tmp_path / "states.json").read_text())
    model = build_model("gdes")
    inputs = PlanInput(model.config, model.rtd, seq_len=20, micro_batch=3, world_size=2, zero_stage=3, dtype="fp32")
    parameters, gradients, optimizer = model_state_bytes([p.numel() for p in model.parameters()], inputs)
    assert parameters == measured["parameters"] and gradients == measured["gradients"]
    assert optimizer == measured["master"] + measured["moments"]
