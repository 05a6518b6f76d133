"""``dv3 export`` and ``dv3 ckpt universal``: what a finished (or running) job hands on.

Export consolidates a ZeRO checkpoint into one fp32 state dict (DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``, loaded with the restricted unpickler), rebuilds
the RTD model on the CPU, folds ``E_G + E_Delta`` into the discriminator and writes a Hugging
Face ``DebertaV2Model`` folder with the run's sentencepiece tokenizer; optionally the generator
as ``DebertaV2ForMaskedLM``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import sentencepiece
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from engine.errors import ExportError, OutputError
from engine.model import RTDModel
from engine.model.hf_io import save_hf_encoder, save_hf_generator
from engine.train import checkpoint

log = logging.getLogger("dv3")


def load_rtd_model(checkpoint_dir: str | Path) -> tuple[RTDModel, dict]:
    """The RTD model of a complete, verified checkpoint, consolidated on the CPU, and its dv3 state."""
    path = Path(checkpoint_dir)
    if not checkpoint.is_complete(path):
        raise ExportError(f"{path} is not a complete dv3 checkpoint (no {checkpoint.COMPLETE_MARKER} marker)")
    problem = checkpoint.verify(path)
    if problem is not None:
        raise ExportError(f"{path} does not verify: {problem}")
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
    nonfinite = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if nonfinite:
        raise ExportError(f"{path}: {len(nonfinite)} weight(s) are not finite ({', '.join(nonfinite[:3])}); "
                          "export an earlier checkpoint")
    return model.eval(), state


def _is_alias_of_loaded(model: RTDModel, key: str, weights: dict) -> bool:
    tensor = model.state_dict(keep_vars=True)[key]
    return any(model.state_dict(keep_vars=True)[name] is tensor for name in weights if name != key)


def checkpoint_tokenizer(path: Path, model: RTDModel, given: Path | None = None) -> Path:
    """The tokenizer that goes with the checkpoint's model: the copy inside the checkpoint (or, for
    a checkpoint that has none, the one the user names), checked against the model's vocabulary."""
    tokenizer = Path(given) if given is not None else path / checkpoint.TOKENIZER_FILE
    if given is None and not tokenizer.is_file():
        raise ExportError(f"{path} carries no tokenizer (a dv3 0.1 checkpoint): pass --tokenizer with the spm.model "
                          "the run was trained with")
    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    except (OSError, RuntimeError) as error:
        raise ExportError(f"tokenizer {tokenizer} is not a sentencepiece model: {error}") from error
    # dv3's data adds [MASK] right after the pieces; the model's vocabulary may be larger (model.vocab_size).
    if model.mask_token_id != pieces or pieces + 1 > model.config.vocab_size:
        raise ExportError(f"tokenizer {tokenizer} has {pieces} pieces ([MASK] would be id {pieces}), but the model "
                          f"has {model.config.vocab_size} ids with [MASK] at {model.mask_token_id}: it is not the "
                          "tokenizer this model was trained with")
    return tokenizer


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


def check_destinations(outputs: list[Path], overwrite: bool) -> None:
    """Before any work: distinct folders, not files, not holding anything unless ``overwrite``."""
    resolved = [output.resolve() for output in outputs]
    for index, first in enumerate(resolved):
        for second in resolved[index + 1:]:
            if first == second or first in second.parents or second in first.parents:
                raise ExportError(f"--output and --generator-output must be separate folders, got {first} and {second}")
    for output in outputs:
        if output.exists() and not output.is_dir():
            raise ExportError(f"{output} is a file; choose a folder to export to")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            raise ExportError(f"{output} already holds files; choose another folder, or pass --overwrite to replace it")


def _publish(staging: Path, output: Path) -> None:
    """Move a finished export into place (replacing what ``--overwrite`` allowed), with the user's
    usual file permissions (the writers create some files private)."""
    mask = os.umask(0)
    os.umask(mask)
    for file in staging.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~mask)
    staging.chmod(0o777 & ~mask)
    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, output)


def export(checkpoint_dir: str | Path, output: str | Path, generator_output: str | Path | None = None, *,
           overwrite: bool = False, tokenizer: Path | None = None) -> Path:
    """The discriminator (``E_G + E_Delta`` folded in) as a HF ``DebertaV2Model`` folder with its
    tokenizer, and optionally the generator as ``DebertaV2ForMaskedLM``. Each folder is written
    beside its destination and moved into place when complete: a failed export leaves nothing."""
    path = Path(checkpoint_dir)
    outputs = [Path(output)] + ([Path(generator_output)] if generator_output is not None else [])
    check_destinations(outputs, overwrite)
    model, _ = load_rtd_model(path)
    tokenizer = checkpoint_tokenizer(path, model, tokenizer)
    staging = [out.parent / f".{out.name}.partial-{os.getpid()}" for out in outputs]
    try:
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)
        save_hf_encoder(model.discriminator_encoder(), staging[0])
        write_tokenizer(tokenizer, staging[0], model.mask_token_id)
        if generator_output is not None:
            save_hf_generator(model.generator, staging[1])
            write_tokenizer(tokenizer, staging[1], model.mask_token_id)
        for folder, out in zip(staging, outputs, strict=True):
            _publish(folder, out)
    except OSError as error:
        for folder in staging:
            shutil.rmtree(folder, ignore_errors=True)
        detail = "no space left" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
        raise OutputError(f"cannot write the export to {outputs[0].parent}: {detail}; nothing was written") from error
    return Path(output)


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
    if (source / checkpoint.TOKENIZER_FILE).is_file():
        shutil.copyfile(source / checkpoint.TOKENIZER_FILE, target / checkpoint.TOKENIZER_FILE)
    (target / checkpoint.STATE_FILE).write_text(json.dumps(state, indent=2))
    checkpoint.mark_complete(target, state["step"])
    return target


def checkpoint_of(value: str | Path) -> Path:
    """A complete checkpoint folder, or a run directory's newest complete checkpoint that verifies."""
    path = Path(value)
    if not checkpoint.is_complete(path):
        newest = checkpoint.resolve_resume("auto", path)
        if newest is None:
            raise ExportError(f"{path} is neither a complete checkpoint nor a run directory with one that verifies")
        path = newest
    return path
