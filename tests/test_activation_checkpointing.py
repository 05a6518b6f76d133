"""Activation checkpointing: the same gradients (dropout included, its masks replayed), less kept."""

import pytest
import torch

from engine.config import EncoderConfig, RTDConfig
from engine.model import RTDModel
from engine.train.memory import layer_activation_bytes


def config(dropout: float) -> EncoderConfig:
    return EncoderConfig(vocab_size=157, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, position_buckets=8, max_relative_positions=32,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def step_gradients(dropout: float, every: int, dropout_seed: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = RTDModel(config(dropout), RTDConfig()).train()
    model.set_activation_checkpointing(every)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 156, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    masked, labels = model.mask(ids, mask, torch.arange(3), seed=0)
    torch.manual_seed(dropout_seed)  # dropout and sampling
    model(ids, mask, masked, labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_layers_give_exactly_the_same_gradients(dropout, every):
    plain, recomputed = step_gradients(dropout, 0), step_gradients(dropout, every)
    assert plain.keys() == recomputed.keys()
    for name, gradient in plain.items():
        assert torch.equal(gradient, recomputed[name]), name


def test_the_equality_can_fail_another_dropout_draw_changes_the_gradients():
    drawn, other = step_gradients(0.1, 0), step_gradients(0.1, 0, dropout_seed=5)
    assert any(not torch.equal(gradient, other[name]) for name, gradient in drawn.items())


def test_a_checkpointed_layer_keeps_only_its_inputs():
    encoder_config = config(0.1)
    kept = layer_activation_bytes(encoder_config, batch=4, length=64, recompute=False)
    recomputed = layer_activation_bytes(encoder_config, batch=4, length=64, recompute=True)
    hidden_input = 4 * 64 * 32 * 4  # [B, L, H] fp32: what the checkpoint keeps (besides the relative table)
    assert recomputed <= hidden_input + 2 * 8 * 32 * 4
    assert kept > 10 * recomputed
