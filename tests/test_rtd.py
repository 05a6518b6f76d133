"""The RTD objective and the three embedding sharing modes (ES / NES / GDES)."""

import pytest
import torch

from data_pipeline.masking import IGNORE_INDEX
from engine.config import RTDConfig
from engine.config.encoder import EncoderConfig, preset_config
from engine.model.rtd import GradientDisentangledEmbedding, RTDModel, replace_tokens

VOCAB = 211


def small_config(**overrides) -> EncoderConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  position_buckets=8, max_relative_positions=32, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    values.update(overrides)
    return EncoderConfig(**values)


def batch(seed: int = 0, size: int = 4, length: int = 24):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB - 1, (size, length), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, length - 6:] = 0
    ids[mask == 0] = 0
    ids[0, -1] = 2
    return ids, mask


def build(sharing: str, seed: int = 0) -> RTDModel:
    torch.manual_seed(seed)
    return RTDModel(small_config(), RTDConfig(sharing=sharing)).train()


def gradients(model: RTDModel, which: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of the embedding parameters from one loss (``loss``, ``mlm_loss`` or ``rtd_loss``),
    with masking and sampling fixed by ``seed`` so every call sees the same batch."""
    model.zero_grad(set_to_none=True)
    ids, mask = batch(seed)
    masked_ids, labels = model.mask(ids, mask, torch.arange(ids.shape[0]), seed=seed)
    output = model(ids, mask, masked_ids, labels, sampling_generator=torch.Generator().manual_seed(seed))
    getattr(output, which).backward()
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.embedding_parameters().items()}


def test_gdes_keeps_rtd_gradient_out_of_generator_embedding():
    model = build("gdes")
    total = gradients(model, "loss")
    mlm_only = gradients(model, "mlm_loss")
    rtd_only = gradients(model, "rtd_loss")
    assert total["E_G"].abs().sum() > 0
    assert torch.equal(total["E_G"], mlm_only["E_G"]), "E_G must be trained by the MLM loss alone"
    assert torch.count_nonzero(mlm_only["E_Delta"]) == 0, "the MLM loss must not reach E_Delta"
    assert rtd_only["E_Delta"].abs().sum() > 0
    expected_delta = model.rtd.rtd_lambda * rtd_only["E_Delta"]
    # Same gradient up to where the lambda scaling is rounded in the chain.
    torch.testing.assert_close(total["E_Delta"], expected_delta, rtol=1e-4, atol=1e-5 * float(expected_delta.abs().max()))


def test_es_shares_one_embedding_trained_by_both_losses():
    model = build("es")
    assert model.discriminator.deberta.embeddings.word_embeddings is model.generator.word_embeddings
    total = gradients(model, "loss")
    mlm_only = gradients(model, "mlm_loss")
    rtd_only = gradients(model, "rtd_loss")
    assert rtd_only["E_G"].abs().sum() > 0, "under ES the RTD loss reaches the shared embedding"
    torch.testing.assert_close(total["E_G"], mlm_only["E_G"] + model.rtd.rtd_lambda * rtd_only["E_G"],
                               rtol=1e-4, atol=1e-7)
    names = [name for name, _ in model.named_parameters() if "word_embeddings" in name]
    assert names == ["generator.deberta.embeddings.word_embeddings.weight"], "the shared weight is registered once"


def test_nes_embeddings_are_independent():
    model = build("nes")
    parameters = model.embedding_parameters()
    assert parameters["E_G"] is not parameters["E_D"]
    total = gradients(model, "loss")
    mlm_only = gradients(model, "mlm_loss")
    rtd_only = gradients(model, "rtd_loss")
    assert torch.equal(total["E_G"], mlm_only["E_G"])
    assert torch.count_nonzero(mlm_only["E_D"]) == 0
    assert torch.count_nonzero(rtd_only["E_G"]) == 0
    assert rtd_only["E_D"].abs().sum() > 0


def test_gdes_delta_starts_at_zero_and_is_registered_once():
    model = build("gdes")
    words = model.discriminator.deberta.embeddings.word_embeddings
    assert isinstance(words, GradientDisentangledEmbedding)
    assert torch.count_nonzero(words.delta_weight) == 0
    assert words.delta_weight.shape == model.generator.word_embeddings.weight.shape
    names = [name for name, _ in model.named_parameters() if "word_embeddings" in name]
    assert sorted(names) == ["discriminator.deberta.embeddings.word_embeddings.delta_weight",
                             "generator.deberta.embeddings.word_embeddings.weight"]
    uses = model.external_parameter_uses()
    assert (words, model.generator.word_embeddings.weight) in [(m, p) for m, p in uses]


def test_discriminator_encoder_folds_generator_embedding_and_delta():
    model = build("gdes").eval()
    with torch.no_grad():
        model.discriminator.deberta.embeddings.word_embeddings.delta_weight.normal_(0, 0.1)
    encoder = model.discriminator_encoder().eval()
    expected = model.generator.word_embeddings.weight + model.discriminator.deberta.embeddings.word_embeddings.delta_weight
    assert torch.equal(encoder.embeddings.word_embeddings.weight, expected)
    ids, mask = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask).last_hidden_state,
                                   model.discriminator.deberta(ids, mask).last_hidden_state)


def test_a_generator_that_reproduces_the_original_labels_nothing_replaced():
    ids, mask = batch(1)
    selected = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    selected &= mask.bool()
    logits = torch.full((int(selected.sum()), VOCAB), -1e4)
    logits[torch.arange(logits.shape[0]), ids[selected]] = 1e4
    discriminator_ids, labels = replace_tokens(ids, mask, selected, logits, temperature=1.0)
    assert torch.equal(discriminator_ids, ids)
    assert not labels.any()


def test_a_sample_that_differs_is_labelled_replaced_and_nothing_else_is():
    ids, mask = batch(2)
    selected = mask.bool().clone()
    selected[:, ::2] = False
    logits = torch.full((int(selected.sum()), VOCAB), -1e4)
    logits[torch.arange(logits.shape[0]), (ids[selected] + 1) % VOCAB] = 1e4
    discriminator_ids, labels = replace_tokens(ids, mask, selected, logits, temperature=1.0)
    assert torch.equal(labels, selected)
    assert torch.equal(discriminator_ids[~selected], ids[~selected])


def test_forward_reports_losses_and_statistics():
    model = build("gdes")
    ids, mask = batch(4)
    output = model(ids, mask)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    torch.testing.assert_close(output.loss, output.mlm_loss + 50.0 * output.rtd_loss)
    assert torch.equal(output.rtd_labels, (output.discriminator_input_ids != ids) & mask.bool())
    stats = output.statistics()
    assert set(stats) >= {"generator_accuracy", "discriminator_accuracy", "replaced_fraction"}
    assert 0.0 <= stats["replaced_fraction"] <= stats["masked_fraction"] <= 0.2
    assert int(output.counts["tokens"]) == int(mask.sum())


def test_generator_is_half_the_depth_by_default():
    model = RTDModel(small_config(num_hidden_layers=4))
    assert len(model.generator.deberta.encoder.layer) == 2
    assert len(model.discriminator.deberta.encoder.layer) == 4
    assert model.generator.config.hidden_size == model.config.hidden_size


def test_enhanced_mask_decoder_option_runs_and_uses_absolute_positions():
    torch.manual_seed(0)
    model = RTDModel(small_config(), RTDConfig(enhanced_mask_decoder=True))
    assert model.generator.deberta.embeddings.position_embeddings is not None
    ids, mask = batch(5)
    output = model(ids, mask)
    output.loss.backward()
    assert model.generator.deberta.embeddings.position_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad_ids, message", [
    (torch.rand(2, 8), "int64 or int32"),
    (torch.ones(8, dtype=torch.long), r"\[batch, length\]"),
    (torch.full((2, 8), VOCAB + 5, dtype=torch.long), f"token id {VOCAB + 5}"),
    (torch.full((2, 8), -3, dtype=torch.long), "token id -3"),
])
def test_bad_input_ids_are_refused_with_the_value_named(bad_ids, message):
    model = build("gdes")
    with pytest.raises((TypeError, ValueError), match=message):
        model(bad_ids)


def test_mismatched_attention_mask_is_refused():
    model = build("gdes")
    ids, _ = batch(0)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_attention_heads=12"):
        EncoderConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="sharing"):
        RTDConfig(sharing="shared")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="mask_token_id"):
        RTDModel(small_config(), RTDConfig(), mask_token_id=VOCAB)


def test_presets_have_the_paper_sizes():
    assert (preset_config("xsmall").hidden_size, preset_config("xsmall").num_hidden_layers) == (384, 12)
    assert preset_config("small").num_hidden_layers == 6
    assert preset_config("large").num_attention_heads == 16
    assert preset_config("mbase").vocab_size == 251000
    assert preset_config("base").vocab_size == 128100


def test_masked_positions_have_labels_and_the_rest_ignore():
    model = build("gdes")
    ids, mask = batch(6)
    masked_ids, labels = model.mask(ids, mask, torch.arange(ids.shape[0]))
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.all(masked_ids[selected] == model.mask_token_id)
    assert torch.equal(masked_ids[~selected], ids[~selected])


def test_no_mask_means_no_padding():
    model = build("gdes")
    ids, _ = batch(7)
    ids[ids == 0] = 5  # no padding anywhere
    masked_ids, labels = model.mask(ids, torch.ones_like(ids), torch.arange(ids.shape[0]))
    unmasked = model(ids, None, masked_ids, labels, sampling_generator=torch.Generator().manual_seed(0))
    ones = model(ids, torch.ones_like(ids), masked_ids, labels, sampling_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unmasked.loss, ones.loss)
    assert torch.equal(unmasked.rtd_labels, ones.rtd_labels)


def test_sampled_tokens_follow_the_generators_distribution_and_never_a_zero_probability():
    from engine.model.rtd import sample_rows

    weights = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.15, 0.1, 0.0])
    draws = sample_rows(weights.expand(200_000, -1).contiguous(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=weights.numel()).double() / draws.numel()
    assert (frequencies[weights == 0] == 0).all()
    # 200k draws: a frequency's standard error is at most 0.0011; 5 of them is the tolerance.
    torch.testing.assert_close(frequencies, weights.double(), rtol=0, atol=0.0056)
    # a row whose only weight is its last entry: the draw never runs past it
    last_only = torch.zeros(1000, 5)
    last_only[:, -1] = 1e-30
    assert (sample_rows(last_only, torch.Generator().manual_seed(1)) == 4).all()
