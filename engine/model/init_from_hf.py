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

from engine.model.hf_io import encoder_weights, mlm_head_weights, read_hf_state_dict, rtd_head_weights
from engine.model.rtd import RTDModel

log = logging.getLogger("dv3")


def hf_initial_weights(model: RTDModel, discriminator_path: str,
                       generator_path: str | None = None) -> dict[str, torch.Tensor]:
    """The value every parameter of ``model`` starts from (by ``named_parameters()`` name), read
    from Hugging Face folders. Parameters not named start as initialised (a bare encoder folder
    has no RTD head). Reads only the config of ``model``, never its weights, so it works for a
    model built partitioned under ZeRO-3 (the caller loads the result module by module)."""
    names = {name for name, _ in model.named_parameters()}
    disc_state = read_hf_state_dict(discriminator_path)
    encoder = encoder_weights(disc_state, keep_absolute_positions=False)
    e_d = encoder.pop("embeddings.word_embeddings.weight")
    expected = (model.config.vocab_size, model.config.word_embedding_size)
    if tuple(e_d.shape) != expected:
        raise ValueError(f"{discriminator_path}: word embedding {tuple(e_d.shape)} does not fit the model's "
                         f"{expected} (vocabulary of the data?)")
    weights = {f"discriminator.deberta.{k}": v for k, v in encoder.items()}
    weights.update({f"discriminator.{k}": v for k, v in rtd_head_weights(disc_state).items()})
    _check_covers(weights, names, "discriminator.deberta.", discriminator_path)

    generator_words = "generator.deberta.embeddings.word_embeddings.weight"
    if generator_path:
        gen_state = read_hf_state_dict(generator_path)
        gen_weights = {f"generator.deberta.{k}": v
                       for k, v in encoder_weights(gen_state, model.rtd.enhanced_mask_decoder).items()}
        gen_weights.update({f"generator.{k}": v for k, v in mlm_head_weights(gen_state, generator_path).items()})
        _check_covers(gen_weights, names, "generator.", generator_path)  # nothing may be left at random init
        weights.update(gen_weights)
        e_g = gen_weights[generator_words]
    else:
        e_g = e_d
    weights[generator_words] = e_g
    if model.rtd.sharing == "gdes":
        weights["discriminator.deberta.embeddings.word_embeddings.delta_weight"] = e_d - e_g
    elif model.rtd.sharing == "nes":  # its own table
        weights["discriminator.deberta.embeddings.word_embeddings.weight"] = e_d
    else:  # ES: one table, the discriminator's
        weights[generator_words] = e_d
    unexpected = sorted(set(weights) - names)
    if unexpected:
        raise ValueError(f"{discriminator_path}: weights the model does not have: {unexpected[:8]}")
    return weights


def _check_covers(weights: dict[str, torch.Tensor], names: set[str], prefix: str, source: str) -> None:
    """Every parameter under ``prefix`` (but the word embedding, set by the sharing mode) is given."""
    missing = sorted(n for n in names if n.startswith(prefix) and "word_embeddings" not in n and n not in weights
                     and not n.startswith("discriminator.mask_predictions"))
    if missing:
        raise ValueError(f"{source}: checkpoint does not fit the model: missing {missing[:8]}")


@torch.no_grad()
def initialize_from_hf(model: RTDModel, discriminator_path: str, generator_path: str | None = None) -> None:
    """Continued pretraining of a model built whole (not partitioned): copy the HF weights in."""
    weights = hf_initial_weights(model, discriminator_path, generator_path)
    for name, parameter in model.named_parameters():
        if name in weights:
            if tuple(weights[name].shape) != tuple(parameter.shape):
                raise ValueError(f"{name}: {tuple(weights[name].shape)} in the checkpoint, {tuple(parameter.shape)} "
                                 "in the model")
            parameter.copy_(weights[name])
    log.info("initialised from %s%s (sharing=%s)", discriminator_path,
             f" and generator {generator_path}" if generator_path else "", model.rtd.sharing)
