"""Hugging Face interchange: ``DebertaV2*`` checkpoint folders in and out.

Because dv3's modules carry HF's names, conversion is a prefix change. Reading accepts
``model.safetensors`` (single or sharded with an index) and ``pytorch_model.bin`` (loaded
with ``weights_only=True``); writing always uses safetensors and spells out every config
field (HF's defaults are DeBERTa-v2-xlarge's, not v3's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config.encoder import encoder_config_from_hf, encoder_config_to_hf, read_hf_config
from engine.model.encoder import DebertaV3Model
from engine.model.rtd import MaskedLMModel, ReplacedTokenDetectionModel

_HEAD_PREFIXES = ("lm_predictions.", "mask_predictions.", "cls.", "pooler.", "classifier.", "qa_outputs.")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model folder (safetensors preferred; torch files with weights_only)."""
    folder = Path(path)
    single_st, index_st = folder / "model.safetensors", folder / "model.safetensors.index.json"
    single_bin, index_bin = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if single_st.is_file():
        return load_file(single_st)
    if index_st.is_file():
        shards = sorted(set(json.loads(index_st.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if single_bin.is_file():
        return torch.load(single_bin, map_location="cpu", weights_only=True)
    if index_bin.is_file():
        shards = sorted(set(json.loads(index_bin.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(torch.load(folder / shard, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"{folder} holds no model.safetensors or pytorch_model.bin (nor a sharded index)")


def encoder_weights(state: dict[str, torch.Tensor], keep_absolute_positions: bool) -> dict[str, torch.Tensor]:
    """The ``DebertaV2Model`` part of a checkpoint, with any ``deberta.`` prefix removed."""
    encoder: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES):
            continue
        name = key[len("deberta."):] if key.startswith("deberta.") else key
        if name.endswith("position_ids"):
            continue  # a buffer some older checkpoints saved
        if name.startswith("embeddings.position_embeddings.") and not keep_absolute_positions:
            continue  # Microsoft's checkpoints keep it although v3 never adds it to the input
        encoder[name] = value
    return encoder


def mlm_head_weights(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Microsoft's MLM head (``lm_predictions.lm_head.*``) from a checkpoint, names kept.

    HF's DebertaV2ForMaskedLM also saves ``lm_predictions.lm_head.weight``, an alias of the tied
    word embedding; the head itself owns only dense, LayerNorm and bias."""
    head = {k: v for k, v in state.items()
            if k.startswith("lm_predictions.lm_head.") and k != "lm_predictions.lm_head.weight"}
    if not head:
        raise ValueError(f"{source}: no MLM head (lm_predictions.lm_head.*) in this checkpoint")
    return head


def rtd_head_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft's RTD head (``mask_predictions.*``), its ``classifer`` spelling made ``classifier``;
    empty when the checkpoint has none."""
    return {
        key.replace("mask_predictions.classifer.", "mask_predictions.classifier."): value
        for key, value in state.items()
        if key.startswith("mask_predictions.")
    }


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; any missing or unexpected weight is an error naming ``source``."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source}: checkpoint does not match the model: missing {sorted(result.missing_keys)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}"
        )


def load_hf_encoder(path: str | Path) -> DebertaV3Model:
    """Our encoder from a ``DebertaV2Model``-style folder (any head in it is ignored)."""
    config = encoder_config_from_hf(read_hf_config(path), source=str(Path(path) / "config.json"))
    model = DebertaV3Model(config)
    load_strict(model, encoder_weights(read_hf_state_dict(path), keep_absolute_positions=False), str(path))
    return model


def load_hf_generator(path: str | Path, enhanced_mask_decoder: bool = False) -> MaskedLMModel:
    """A generator from a folder holding Microsoft's MLM head (``lm_predictions.lm_head.*``)."""
    config = encoder_config_from_hf(read_hf_config(path), source=str(Path(path) / "config.json"))
    state = read_hf_state_dict(path)
    model = MaskedLMModel(config, enhanced_mask_decoder)
    full = {f"deberta.{k}": v for k, v in encoder_weights(state, enhanced_mask_decoder).items()}
    full.update(mlm_head_weights(state, str(path)))
    load_strict(model, full, str(path))
    return model


def load_hf_discriminator(path: str | Path) -> ReplacedTokenDetectionModel:
    """A discriminator from a folder holding Microsoft's RTD head (``mask_predictions.*``)."""
    config = encoder_config_from_hf(read_hf_config(path), source=str(Path(path) / "config.json"))
    state = read_hf_state_dict(path)
    head = rtd_head_weights(state)
    if not head:
        raise ValueError(f"{path}: no RTD head (mask_predictions.*) in this checkpoint")
    model = ReplacedTokenDetectionModel(config)
    full = {f"deberta.{k}": v for k, v in encoder_weights(state, keep_absolute_positions=False).items()}
    full.update(head)
    load_strict(model, full, str(path))
    return model


def _write_folder(path: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def save_hf_encoder(encoder: DebertaV3Model, path: str | Path) -> Path:
    """Write a folder that ``transformers.AutoModel.from_pretrained`` loads with no missing keys."""
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("embeddings.position_embeddings.")}
    return _write_folder(path, encoder_config_to_hf(encoder.config), state)


def save_hf_generator(generator: MaskedLMModel, path: str | Path) -> Path:
    """Write the generator as ``DebertaV2ForMaskedLM`` (``legacy=False``: Microsoft's head names).

    HF has no Enhanced Mask Decoder: a generator trained with it loads, but predicts without it.
    """
    state = dict(generator.state_dict())
    # The legacy=False head multiplies by the word embedding itself, so it is tied by construction;
    # tie_word_embeddings=true would make transformers 5.x look for a `lm_head.weight` that does not
    # exist and fail in from_pretrained.
    config = encoder_config_to_hf(generator.config, architectures=["DebertaV2ForMaskedLM"],
                                  tie_word_embeddings=False)
    return _write_folder(path, config, state)
