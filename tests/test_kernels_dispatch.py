"""``kernels.disentangled_attention`` picks the right path, validates DV3_ATTENTION, and the
model trains through the fused kernels (run by the Triton interpreter on a CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import kernels
from kernels.fused import interpreter_active
from kernels.tuning import ConfigCache, KernelConfig, length_bucket

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused_here = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_active(), reason="no GPU and TRITON_INTERPRET is not set"
)


def small_inputs(head_dim=32, length=20, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, length, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    rel_key, rel_query = (torch.randn(2, 16, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    return q, k, v, rel_key, rel_query


SETTINGS = dict(position_buckets=8, max_relative_positions=32)


@pytest.mark.parametrize("value", ["bogus", "triton", "ref"])
def test_dv3_attention_rejects_unknown_values(monkeypatch, value):
    monkeypatch.setenv("DV3_ATTENTION", value)
    with pytest.raises(ValueError, match="DV3_ATTENTION"):
        kernels.disentangled_attention(*small_inputs(), **SETTINGS)


@pytest.mark.parametrize("value,expected", [("", "auto"), (" Fused ", "fused"), ("REFERENCE", "reference")])
def test_dv3_attention_is_normalised(monkeypatch, value, expected):
    monkeypatch.setenv("DV3_ATTENTION", value)
    assert kernels.attention_path_from_env() == expected


def test_auto_uses_reference_on_cpu_and_fused_only_for_supported_cuda_inputs(monkeypatch):
    monkeypatch.delenv("DV3_ATTENTION", raising=False)
    cpu = torch.zeros(1, 1, 4, 64)
    assert kernels.select_attention_path(cpu) == "reference"
    if torch.cuda.is_available():
        assert kernels.select_attention_path(cpu.cuda().bfloat16()) == "fused"
        assert kernels.select_attention_path(torch.zeros(1, 1, 4, 48, device="cuda")) == "reference"
        assert kernels.select_attention_path(torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.float64)) == "reference"


def test_forced_fused_explains_why_it_cannot_run(monkeypatch):
    monkeypatch.setenv("DV3_ATTENTION", "fused")
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.select_attention_path(torch.zeros(1, 1, 4, 48, device=DEVICE))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        kernels.select_attention_path(torch.zeros(1, 1, 4, 64, device=DEVICE, dtype=torch.float64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="on cpu"):
        kernels.select_attention_path(torch.zeros(1, 1, 4, 64))


def test_reference_forced_never_calls_the_kernels(monkeypatch):
    monkeypatch.setenv("DV3_ATTENTION", "reference")
    import kernels.fused

    def fail(*args, **kwargs):
        raise AssertionError("fused path called under DV3_ATTENTION=reference")

    monkeypatch.setattr(kernels.fused, "fused_disentangled_attention", fail)
    out = kernels.disentangled_attention(*small_inputs(), **SETTINGS)
    assert out.shape == (2, 2, 20, 32)


@needs_fused_here
def test_forced_fused_runs_the_kernels_and_agrees_with_reference(monkeypatch):
    import kernels.fused

    calls = []
    real = kernels.fused.fused_disentangled_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.fused, "fused_disentangled_attention", spy)
    inputs = small_inputs()
    mask = torch.ones(2, 20, dtype=torch.long, device=DEVICE)
    mask[1, 13:] = 0
    monkeypatch.setenv("DV3_ATTENTION", "fused")
    fused = kernels.disentangled_attention(*inputs, mask, **SETTINGS)
    monkeypatch.setenv("DV3_ATTENTION", "reference")
    reference = kernels.disentangled_attention(*inputs, mask, **SETTINGS)
    assert len(calls) == 1
    assert ((fused - reference).norm() / reference.norm()).item() < 1e-5


@needs_fused_here
def test_varlen_entry_point_dispatches_and_checks_cu_seqlens(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(30, 2, 32, generator=gen).to(DEVICE) for _ in range(3))
    rel_key, rel_query = (torch.randn(2, 16, 32, generator=gen).to(DEVICE) for _ in range(2))
    cu = torch.tensor([0, 12, 12, 30], device=DEVICE)  # an empty sequence too
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        kernels.disentangled_attention_varlen(q, k, v, rel_key, rel_query, torch.tensor([0, 12, 29]), **SETTINGS)
    with pytest.raises(ValueError, match="max_seqlen=10"):
        kernels.disentangled_attention_varlen(q, k, v, rel_key, rel_query, cu, 10, **SETTINGS)
    monkeypatch.setenv("DV3_ATTENTION", "reference")
    reference = kernels.disentangled_attention_varlen(q, k, v, rel_key, rel_query, cu, **SETTINGS)
    monkeypatch.setenv("DV3_ATTENTION", "fused")
    fused = kernels.disentangled_attention_varlen(q, k, v, rel_key, rel_query, cu, **SETTINGS)
    assert ((fused - reference).norm() / reference.norm()).item() < 1e-5


def test_tuning_cache_round_trips_and_buckets_lengths(tmp_path):
    assert [length_bucket(n) for n in (1, 64, 65, 512, 513, 8192)] == [64, 64, 128, 512, 1024, 8192]
    path = tmp_path / "configs.json"
    cache = ConfigCache(path)
    assert cache.get("H100|forward") is None
    cache.put("H100|forward", KernelConfig(128, 64, 8, 2), 1.25)
    again = ConfigCache(path)
    assert again.get("H100|forward") == KernelConfig(128, 64, 8, 2)
    assert json.loads(path.read_text())["H100|forward"]["ms"] == 1.25
    path.write_text("not json")
    assert ConfigCache(path).get("H100|forward") is None
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(48, 64)


@needs_fused_here
def test_model_trains_through_fused_kernels_with_reference_gradients(monkeypatch):
    from engine.config import EncoderConfig
    from engine.model import DebertaV3Model

    config = EncoderConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=32, position_buckets=8, max_relative_positions=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = DebertaV3Model(config).to(DEVICE)
    ids = torch.randint(4, 50, (2, 24), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    target = torch.randn(2, 24, 64, device=DEVICE)

    def loss_and_grads(path):
        monkeypatch.setenv("DV3_ATTENTION", path)
        model.zero_grad()
        out = model(ids, mask).last_hidden_state
        loss = ((out - target) ** 2 * mask[..., None]).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("reference")
    fused_loss, fused_grads = loss_and_grads("fused")
    assert abs(fused_loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert ref_grads.keys() == fused_grads.keys()
    for name, grad in ref_grads.items():
        error = ((fused_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        assert error < 1e-4, f"{name}: {error}"

    # And it learns: a few optimizer steps on the fused path lower the loss.
    monkeypatch.setenv("DV3_ATTENTION", "fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        out = model(ids, mask).last_hidden_state
        loss = ((out - target) ** 2 * mask[..., None]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
