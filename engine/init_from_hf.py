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

from engine.hf_io import _encoder_state, read_hf_state_dict
from engine.rtd import GradientDisentangledEmbedding, RTDModel

log = logging.getLogger("dv3")


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{source}: weights that do not fit the model: {sorted(result.unexpected_keys)[:8]}")
    if result.missing_keys:
        raise ValueError(f"{source}: weights missing for {sorted(result.missing_keys)[:8]}")


@torch.no_grad()
def initialize_from_hf(model: RTDModel, discriminator_path: str, generator_path: str | None = None) -> None:
    disc_state = read_hf_state_dict(discriminator_path)
    encoder = _encoder_state(disc_state, keep_absolute_positions=False)
    e_d = encoder.pop("embeddings.word_embeddings.weight")
    if e_d.shape != model.generator.word_embeddings.weight.shape:
        raise ValueError(f"{discriminator_path}: word embedding {tuple(e_d.shape)} does not fit the model's "
                         f"{tuple(model.generator.word_embeddings.weight.shape)} (vocabulary of the data?)")
    discriminator = model.discriminator.deberta
    _load_into_partial(discriminator, encoder, discriminator_path)
    head = {k[len("mask_predictions."):].replace("classifer.", "classifier."): v
            for k, v in disc_state.items() if k.startswith("mask_predictions.")}
    if head:
        _load_into(model.discriminator.mask_predictions, head, discriminator_path)

    if generator_path:
        gen_state = read_hf_state_dict(generator_path)
        gen_encoder = {f"deberta.{k}": v for k, v in _encoder_state(
            gen_state, model.rtd.enhanced_mask_decoder).items()}
        gen_encoder.update({k: v for k, v in gen_state.items()
                            if k.startswith("lm_predictions.lm_head.") and k != "lm_predictions.lm_head.weight"})
        _load_into(model.generator, gen_encoder, generator_path)  # a missing MLM head is refused, not left random
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
