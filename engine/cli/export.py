"""``dv3 export`` and ``dv3 ckpt universal``: what a finished (or running) job hands on."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.errors import ExportError

EXPORT_DESCRIPTION = (
    "Consolidate a dv3 (ZeRO) checkpoint and write the discriminator, with E_G + E_Delta folded into its word "
    "embedding, as a Hugging Face DebertaV2Model folder with the run's tokenizer; optionally the generator as "
    "DebertaV2ForMaskedLM. The checkpoint's files are verified against the checksums written with it first; "
    "existing output folders are refused unless --overwrite.")
UNIVERSAL_DESCRIPTION = (
    "Convert a ZeRO checkpoint to DeepSpeed's universal format (next to it, suffix _universal). Resume with "
    "`dv3 pretrain --resume <that folder>` at any number of ranks with the same global batch.")


def register(subparsers) -> None:
    export_parser = subparsers.add_parser("export", help="write a Hugging Face model folder from a checkpoint",
                                          description=EXPORT_DESCRIPTION)
    export_parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. "
                               "RUN/checkpoints/step00001000, or a run directory (its newest complete checkpoint)")
    export_parser.add_argument("--output", required=True, help="the HF folder to write (discriminator)")
    export_parser.add_argument("--generator-output", help="also write the generator to this folder")
    export_parser.add_argument("--overwrite", action="store_true",
                               help="replace output folders that already hold files (refused otherwise)")
    export_parser.add_argument("--tokenizer", type=Path, metavar="SPM_MODEL",
                               help="the run's spm.model, for a checkpoint that does not carry its own (dv3 0.1)")
    export_parser.set_defaults(func=run_export)

    ckpt_parser = subparsers.add_parser("ckpt", help="checkpoint tools", description="Checkpoint tools.")
    ckpt_commands = ckpt_parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    universal = ckpt_commands.add_parser(
        "universal", help="convert a checkpoint so a run can resume at another world size",
        description=UNIVERSAL_DESCRIPTION)
    universal.add_argument("--checkpoint", required=True, help="a complete checkpoint folder")
    universal.add_argument("--output", help="where to write it (default: <checkpoint>_universal)")
    universal.set_defaults(func=run_universal)


def run_export(args: argparse.Namespace) -> int:
    from engine.train.export import checkpoint_of, export  # deepspeed and torch: only when a command runs

    path = checkpoint_of(args.checkpoint)
    try:
        out = export(path, args.output, args.generator_output, overwrite=args.overwrite, tokenizer=args.tokenizer)
    except (ValueError, OSError) as error:  # DeepSpeed's consolidation and the filesystem on bad files
        raise ExportError(f"{path}: {error}") from error
    print(f"exported {path} -> {out}" + (f" (generator: {args.generator_output})" if args.generator_output else ""))
    return 0


def run_universal(args: argparse.Namespace) -> int:
    from engine.train.export import convert_to_universal  # deepspeed and torch: only when a command runs

    try:
        target = convert_to_universal(args.checkpoint, args.output)
    except (ValueError, OSError) as error:
        raise ExportError(f"{args.checkpoint}: {error}") from error
    print(f"universal checkpoint: {target}\nresume with: dv3 pretrain ... --resume {target}")
    return 0
