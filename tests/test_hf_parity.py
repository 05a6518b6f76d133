"""dv3's encoder computes what transformers.DebertaV2Model computes, and the checkpoints interchange."""

import json

import pytest
import torch
from transformers import AutoModel, DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model

from engine.model.hf_io import (
    encoder_config_from_hf,
    load_hf_discriminator,
    load_hf_encoder,
    load_hf_generator,
    save_hf_encoder,
    save_hf_generator,
)
from engine.model.rtd import MaskedLMModel

# (hidden, heads, layers, position_buckets, max_relative_positions, length): widths and head
# counts vary; buckets 256 (the v3 value, exact region up to 128) and small ones, so that the
# log-bucket region and the clamped edge are reached at test-friendly lengths.
PARITY_CASES = [
    (64, 4, 2, 256, -1, 160),
    (48, 2, 3, 8, 32, 45),
    (96, 8, 2, 16, 64, 80),
    (32, 1, 1, 4, 16, 33),
]


def hf_v3_config(hidden, heads, layers, buckets, max_rel, vocab=320) -> DebertaV2Config:
    return DebertaV2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, relative_attention=True, position_buckets=buckets,
        max_relative_positions=max_rel, max_position_embeddings=512, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, hidden_act="gelu",
    )


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value (LayerNorms at 1/0 would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def right_padded_batch(length: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - length // 3:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0
    return ids, mask


def relative_difference(reference: torch.Tensor, ours: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    a, b = reference[valid], ours[valid]
    return float((a - b).abs().max()), float((a - b).norm() / a.norm())


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "h{}-H{}-n{}-k{}-m{}-L{}".format(*c))
def test_load_hf_encoder_matches_transformers_hidden_states(tmp_path, case):
    hidden, heads, layers, buckets, max_rel, length = case
    reference = DebertaV2Model(hf_v3_config(hidden, heads, layers, buckets, max_rel)).eval()
    perturb(reference, seed=hidden + length)
    reference.save_pretrained(tmp_path)

    ours = load_hf_encoder(tmp_path).eval()
    ids, mask = right_padded_batch(length, 320, seed=length)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
    max_abs, rel = relative_difference(expected, got, mask.bool())
    print(f"load {case}: max abs {max_abs:.3g}, relative {rel:.3g}")
    assert rel < 1e-5


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "h{}-H{}-n{}-k{}-m{}-L{}".format(*c))
def test_save_hf_encoder_loads_in_transformers_without_missing_keys(tmp_path, case):
    hidden, heads, layers, buckets, max_rel, length = case
    config = encoder_config_from_hf(hf_v3_config(hidden, heads, layers, buckets, max_rel).to_dict())
    ours = MaskedLMModel(config).deberta.eval()
    perturb(ours, seed=2 * hidden + length)
    save_hf_encoder(ours, tmp_path)

    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, DebertaV2Model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = json.loads((tmp_path / "config.json").read_text())
    for field in ("relative_attention", "position_buckets", "max_relative_positions", "pos_att_type",
                  "norm_rel_ebd", "share_att_key", "position_biased_input", "type_vocab_size", "layer_norm_eps",
                  "hidden_act", "max_position_embeddings", "embedding_size"):
        assert field in written, f"config.json leaves {field} to HF's (v2-xlarge) default"

    ids, mask = right_padded_batch(length, 320, seed=length + 1)
    with torch.no_grad():
        expected = loaded.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask).last_hidden_state
    max_abs, rel = relative_difference(expected, got, mask.bool())
    print(f"save {case}: max abs {max_abs:.3g}, relative {rel:.3g}")
    assert rel < 1e-5


def microsoft_style_checkpoint(folder, hidden=64, heads=4, layers=2):
    """A folder laid out like Microsoft's deberta-v3 release: a torch .bin with the encoder under
    ``deberta.``, the MLM head ``lm_predictions.lm_head.*``, the RTD head ``mask_predictions.*``
    (its output layer spelled ``classifer``) and an unused absolute position table."""
    config = hf_v3_config(hidden, heads, layers, 256, -1)
    mlm = DebertaV2ForMaskedLM(DebertaV2Config(**{**config.to_dict(), "legacy": False})).eval()
    perturb(mlm, seed=7)
    state = {k: v.clone() for k, v in mlm.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(512, hidden, generator=generator)
    state["mask_predictions.dense.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.1
    state["mask_predictions.dense.bias"] = torch.randn(hidden, generator=generator) * 0.1
    state["mask_predictions.LayerNorm.weight"] = 1 + torch.randn(hidden, generator=generator) * 0.1
    state["mask_predictions.LayerNorm.bias"] = torch.randn(hidden, generator=generator) * 0.1
    state["mask_predictions.classifer.weight"] = torch.randn(1, hidden, generator=generator) * 0.1
    state["mask_predictions.classifer.bias"] = torch.randn(1, generator=generator) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return mlm, state


def test_microsoft_mlm_head_loads_and_predicts_like_transformers(tmp_path):
    reference, _ = microsoft_style_checkpoint(tmp_path)
    generator = load_hf_generator(tmp_path).eval()
    ids, mask = right_padded_batch(40, 320, seed=11)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = generator(ids, mask, mask.bool())
    assert float((expected - got).norm() / expected.norm()) < 1e-5


def test_microsoft_rtd_head_loads_with_its_weights(tmp_path):
    reference, state = microsoft_style_checkpoint(tmp_path)
    discriminator = load_hf_discriminator(tmp_path).eval()
    assert torch.equal(discriminator.mask_predictions.classifier.weight, state["mask_predictions.classifer.weight"])
    ids, mask = right_padded_batch(40, 320, seed=12)
    with torch.no_grad():
        hidden = reference.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        states = torch.nn.functional.layer_norm(
            hidden + hidden[:, :1], (hidden.shape[-1],), state["mask_predictions.LayerNorm.weight"],
            state["mask_predictions.LayerNorm.bias"], eps=1e-7)
        states = torch.nn.functional.gelu(states @ state["mask_predictions.dense.weight"].t()
                                          + state["mask_predictions.dense.bias"])
        expected = (states @ state["mask_predictions.classifer.weight"].t() + state["mask_predictions.classifer.bias"])
        got = discriminator(ids, mask)
    assert float((expected.squeeze(-1) - got).norm() / expected.norm()) < 1e-5


def test_generator_round_trips_through_hf_masked_lm(tmp_path):
    config = encoder_config_from_hf(hf_v3_config(48, 4, 2, 16, 64).to_dict())
    generator = MaskedLMModel(config).eval()
    perturb(generator, seed=5)
    save_hf_generator(generator, tmp_path)
    loaded, info = DebertaV2ForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = right_padded_batch(30, 320, seed=13)
    with torch.no_grad():
        expected = loaded.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        got = generator(ids, mask, mask.bool())
    assert float((expected - got).norm() / expected.norm()) < 1e-5


def test_unsupported_hf_config_is_refused_with_the_field_named(tmp_path):
    config = hf_v3_config(64, 4, 1, 256, -1).to_dict()
    config["conv_kernel_size"] = 3
    with pytest.raises(ValueError, match="conv_kernel_size"):
        encoder_config_from_hf(config)
    config = hf_v3_config(64, 4, 1, 256, -1).to_dict()
    config["share_att_key"] = False
    with pytest.raises(ValueError, match="share_att_key"):
        encoder_config_from_hf(config)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_v3_config(64, 4, 1, 256, -1).to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_encoder(tmp_path)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "gelu_python", "relu", "tanh", "silu"])
def test_every_accepted_activation_is_the_one_transformers_applies(activation):
    from transformers.activations import ACT2FN

    from engine.config.encoder import SUPPORTED_ACTIVATIONS
    from engine.model.encoder import ACTIVATIONS

    assert set(ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS)  # the config accepts exactly what the model builds
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(ACTIVATIONS[activation](x), ACT2FN[activation](x), rtol=1e-6, atol=1e-6)


def test_an_emd_generator_exports_and_hf_predicts_like_it_without_its_decoder(tmp_path):
    """HF's DebertaV2ForMaskedLM has no Enhanced Mask Decoder: the exported EMD generator loads with
    no missing weights, and its logits are exactly the generator's own with the decoder passes left out
    (the MLM head on the last layer), which is what HF runs."""
    config = encoder_config_from_hf(hf_v3_config(48, 4, 2, 16, 64).to_dict())
    generator = MaskedLMModel(config, enhanced_mask_decoder=True).eval()
    perturb(generator, seed=6)
    save_hf_generator(generator, tmp_path)
    loaded, info = DebertaV2ForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"deberta.embeddings.position_embeddings.weight"}  # the EMD's positions
    ids, mask = right_padded_batch(30, 320, seed=14)
    with torch.no_grad():
        expected = loaded.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        with_decoder = generator(ids, mask, mask.bool())
        generator.lm_predictions.enhanced = False
        without_decoder = generator(ids, mask, mask.bool())
    assert float((expected - without_decoder).norm() / expected.norm()) < 1e-5
    assert float((expected - with_decoder).norm() / expected.norm()) > 1e-3  # the decoder does change predictions
