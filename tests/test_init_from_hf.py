"""Continued pretraining: the RTD model starts from Hugging Face DeBERTa-v3 weights."""

import pytest
import torch

from engine.model.hf_io import save_hf_encoder, save_hf_generator
from engine.model.init_from_hf import initialize_from_hf
from tests.support.models import build_model


def perturbed(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("sharing", ["gdes", "nes", "es"])
def test_discriminator_and_generator_start_from_hf_folders(tmp_path, sharing):
    source = perturbed(build_model("nes"), seed=1)  # two distinct embeddings to start from
    save_hf_encoder(source.discriminator.deberta, tmp_path / "disc")
    save_hf_generator(source.generator, tmp_path / "gen")

    model = build_model(sharing)
    initialize_from_hf(model, str(tmp_path / "disc"), str(tmp_path / "gen"))
    e_d = source.discriminator.deberta.embeddings.word_embeddings.weight
    e_g = source.generator.word_embeddings.weight
    torch.testing.assert_close(model.discriminator_word_embedding(), e_d)  # under ES the shared table is E_D
    if sharing == "gdes":
        torch.testing.assert_close(model.generator.word_embeddings.weight, e_g)  # E_Delta = E_D - E_G
    ours = dict(model.discriminator.deberta.named_parameters())
    for name, value in source.discriminator.deberta.named_parameters():
        if "word_embeddings" not in name:
            assert torch.equal(ours[name], value), name


def test_without_a_generator_its_embedding_starts_as_the_discriminators(tmp_path):
    source = perturbed(build_model("nes"), seed=2)
    save_hf_encoder(source.discriminator.deberta, tmp_path / "disc")
    model = build_model("gdes")
    initialize_from_hf(model, str(tmp_path / "disc"))
    e_d = source.discriminator.deberta.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.generator.word_embeddings.weight, e_d)
    assert torch.count_nonzero(model.discriminator.deberta.embeddings.word_embeddings.delta_weight) == 0


def test_a_vocabulary_that_does_not_fit_is_refused(tmp_path):
    from engine.config.encoder import EncoderConfig
    from engine.model.encoder import DebertaV3Model

    config = EncoderConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, position_buckets=8, max_relative_positions=32)
    save_hf_encoder(DebertaV3Model(config), tmp_path / "disc")
    with pytest.raises(ValueError, match="word embedding"):
        initialize_from_hf(build_model("gdes"), str(tmp_path / "disc"))


def test_a_generator_folder_without_its_mlm_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_generator(build_model("nes").generator, tmp_path / "gen")
    save_hf_encoder(build_model("nes").discriminator.deberta, tmp_path / "disc")
    weights = tmp_path / "gen" / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("lm_predictions.lm_head.dense")}
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing .*lm_predictions.lm_head.dense"):
        initialize_from_hf(build_model("gdes"), str(tmp_path / "disc"), str(tmp_path / "gen"))
