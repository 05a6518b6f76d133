"""train.compile: encoder layers under torch.compile, the attention one op in the graph (no graph
break), the same outputs and gradients as eager: for the reference path, and for the fused
kernels (through their custom op) in the Triton interpreter."""

import pytest
import torch

from engine.config import EncoderConfig
from engine.model.encoder import Encoder

pytestmark = pytest.mark.slow  # the CPU compiler takes tens of seconds per graph


@pytest.mark.parametrize("attention", ["reference", "fused"])
def test_a_compiled_layer_has_no_graph_break_and_matches_eager(attention, monkeypatch):
    monkeypatch.setenv("DV3_ATTENTION", attention)
    torch.manual_seed(0)
    config = EncoderConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=128, position_buckets=8, max_relative_positions=32,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = Encoder(config).train()
    layer = encoder.layer[0]
    hidden = torch.randn(2, 24, 64, requires_grad=True)
    relative = encoder.relative_embeddings(hidden.device).detach().requires_grad_(True)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0

    expected = layer(hidden, mask, relative)
    expected.sum().backward()
    expected_grads = [hidden.grad.clone(), relative.grad.clone()]
    hidden.grad, relative.grad = None, None

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break is an error
    got = compiled(hidden, mask, relative)
    got.sum().backward()
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(relative.grad, expected_grads[1], rtol=1e-4, atol=1e-5)
