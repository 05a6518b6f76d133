"""``dv3 export`` and ``dv3 ckpt universal``: what a finished (or running) job hands on.

Export consolidates a ZeRO checkpoint into one fp32 state dict (DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``, loaded with the restricted unpickler), rebuilds
the RTD model on the CPU, folds ``E_G + E_Delta`` into the discriminator and writes a Hugging
Face ``DebertaV2Model`` folder with the run's sentencepiece tokenizer; optionally the generator
as ``DebertaV2ForMaskedLM``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from deepspeed.checkpoint import ds_to_universal
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from engine.errors import ExportError
from engine.model import RTDModel
from engine.model.hf_io import save_hf_encoder, save_hf_generator
from engine.train import checkpoint

log = logging.getLogger("dv3")


def load_rtd_model(checkpoint_dir: str | Path) -> tuple[RTDModel, dict]:
    """The RTD model of a complete checkpoint, consolidated on the CPU, and its dv3 state."""
    path = Path(checkpoint_dir)
    if not checkpoint.is_complete(path):
        raise ExportError(f"{path} is not a complete dv3 checkpoint (no {checkpoint.COMPLETE_MARKER} marker)")
    state = checkpoint.read_state(path)
    if state.get("universal"):
        raise ExportError(f"{path} is a universal checkpoint; export the checkpoint it was converted from")
    model = RTDModel.from_description(state)
    with checkpoint.weights_only_loading():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    result = model.load_state_dict(weights, strict=False)
    # Under ES the shared table is one parameter with two names; DeepSpeed stores it once.
    missing = [k for k in result.missing_keys if not _is_alias_of_loaded(model, k, weights)]
    if missing or result.unexpected_keys:
        raise ExportError(f"{path}: consolidated weights do not fit the model: missing {missing[:6]}, "
                          f"unexpected {result.unexpected_keys[:6]}")
    return model.eval(), state


def _is_alias_of_loaded(model: RTDModel, key: str, weights: dict) -> bool:
    tensor = model.state_dict(keep_vars=True)[key]
    return any(model.state_dict(keep_vars=True)[name] is tensor for name in weights if name != key)


def write_tokenizer(tokenizer_model: Path, output: Path, mask_token_id: int) -> None:
    """The sentencepiece model plus the files ``AutoTokenizer`` needs for ``DebertaV2Tokenizer``."""
    shutil.copyfile(tokenizer_model, output / "spm.model")
    special = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
               "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (output / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "split_by_punct": False,
        "vocab_type": "spm", "model_max_length": 512, "dv3_mask_token_id": mask_token_id, **special,
    }, indent=2))
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def export(checkpoint_dir: str | Path, output: str | Path, generator_output: str | Path | None = None) -> Path:
    model, state = load_rtd_model(checkpoint_dir)
    output = Path(output)
    save_hf_encoder(model.discriminator_encoder(), output)
    tokenizer = state.get("tokenizer")
    if tokenizer and Path(tokenizer).is_file():
        write_tokenizer(Path(tokenizer), output, model.mask_token_id)
    else:
        log.warning("tokenizer %s not found: the export has no tokenizer files", tokenizer)
    if generator_output is not None:
        save_hf_generator(model.generator, generator_output)
        if tokenizer and Path(tokenizer).is_file():
            write_tokenizer(Path(tokenizer), Path(generator_output), model.mask_token_id)
    return output


def convert_to_universal(checkpoint_dir: str | Path, output: str | Path | None = None) -> Path:
    """A universal checkpoint beside the original, resumable at any world size."""
    source = Path(checkpoint_dir)
    if not checkpoint.is_complete(source):
        raise ExportError(f"{source} is not a complete dv3 checkpoint")
    target = Path(output) if output else source.with_name(source.name + checkpoint.UNIVERSAL_SUFFIX)
    if target.exists():
        raise ExportError(f"{target} exists; remove it or choose another --output")
    arguments = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True)
    with checkpoint.weights_only_loading():
        ds_to_universal.main(arguments)
    state = checkpoint.read_state(source)
    state["universal"] = True
    state["converted_from"] = str(source)
    (target / checkpoint.STATE_FILE).write_text(json.dumps(state, indent=2))
    (target / checkpoint.COMPLETE_MARKER).write_text(f"{state['step']}\n")
    return target


def checkpoint_of(value: str | Path) -> Path:
    """A complete checkpoint folder, or a run directory's newest complete checkpoint."""
    path = Path(value)
    if not checkpoint.is_complete(path):
        newest = checkpoint.latest_complete(checkpoint.checkpoint_root(path))
        if newest is None:
            raise ExportError(f"{path} is neither a complete checkpoint nor a run directory with one")
        path = newest
    return path
