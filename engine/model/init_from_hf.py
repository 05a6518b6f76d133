"""Continued pretraining: start the RTD model from Hugging Face DeBERTa-v3 weights.

The discriminator comes from ``model.init_from`` (a ``DebertaV2Model``-style folder, e.g. a
public DeBERTa-v3 checkpoint, with its RTD head ``mask_predictions.*`` when present). The
generator comes from ``model.init_generator_from`` (a ``DebertaV2ForMaskedLM`` folder) when
given; otherwise its encoder starts fresh and its word embedding starts as a copy of the
discriminator's. The discriminator's embedding is then expressed in the run's sharing mode:

- GDES: ``E_Delta = E_D - E_G`` (zero when E_G was copied from E_D), so ``E_G + E_Delta = E_D``;
- NES:  ``E_D`` loaded as is;
- ES:   one embedding: the discriminator's.
"""

from __future__ import annotations

import logging

import torch

from engine.model.hf_io import encoder_weights, load_strict, mlm_head_weights, read_hf_state_dict, rtd_head_weights
from engine.model.rtd import GradientDisentangledEmbedding, RTDModel

log = logging.getLogger("dv3")


@torch.no_grad()
def initialize_from_hf(model: RTDModel, discriminator_path: str, generator_path: str | None = None) -> None:
    disc_state = read_hf_state_dict(discriminator_path)
    encoder = encoder_weights(disc_state, keep_absolute_positions=False)
    e_d = encoder.pop("embeddings.word_embeddings.weight")
    if e_d.shape != model.generator.word_embeddings.weight.shape:
        raise ValueError(f"{discriminator_path}: word embedding {tuple(e_d.shape)} does not fit the model's "
                         f"{tuple(model.generator.word_embeddings.weight.shape)} (vocabulary of the data?)")
    discriminator = model.discriminator.deberta
    _load_into_partial(discriminator, encoder, discriminator_path)
    head = {k[len("mask_predictions."):]: v for k, v in rtd_head_weights(disc_state).items()}
    if head:  # a bare encoder folder has none: the head then starts fresh
        load_strict(model.discriminator.mask_predictions, head, discriminator_path)

    if generator_path:
        gen_state = read_hf_state_dict(generator_path)
        gen_weights = {f"deberta.{k}": v for k, v in encoder_weights(gen_state, model.rtd.enhanced_mask_decoder).items()}
        gen_weights.update(mlm_head_weights(gen_state, generator_path))
        load_strict(model.generator, gen_weights, generator_path)  # nothing may be left at random init
        e_g = model.generator.word_embeddings.weight
    else:
        model.generator.word_embeddings.weight.copy_(e_d)
        e_g = e_d

    words = discriminator.embeddings.word_embeddings
    if isinstance(words, GradientDisentangledEmbedding):
        words.delta_weight.copy_(e_d - e_g)
    else:  # NES: its own table; ES: the shared table (the generator's is overwritten with E_D)
        words.weight.copy_(e_d)
    log.info("initialised from %s%s (sharing=%s)", discriminator_path,
             f" and generator {generator_path}" if generator_path else "", model.rtd.sharing)


def _load_into_partial(encoder: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load everything of the encoder except its word embedding (set by the sharing mode)."""
    result = encoder.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "word_embeddings" not in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{source}: checkpoint does not fit the discriminator: missing {missing[:8]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:8]}")
