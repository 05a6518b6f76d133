"""The ``dv3`` command: one entry point whose subcommands follow a user's day.

    dv3 data prepare|verify|stats    corpus to shards, integrity, contents
    dv3 plan                         per-device memory of a run, and the largest micro-batch that fits
    dv3 pretrain                     the main job, under any launcher
    dv3 launch                       N ranks on this machine; stop signals reach every rank
    dv3 evaluate                     held-out RTD and MLM quality of a checkpoint, beside baselines
    dv3 ckpt universal               a checkpoint another world size can resume
    dv3 export                       a Hugging Face model folder from a checkpoint
    dv3 bench kernels|data|train     figures against the peers, as JSON
    dv3 slurm submit                 a validated sbatch of a template
    dv3 ablate                       ES vs NES vs GDES, report and plots

Each subcommand module exposes ``register(subparsers)``; it adds its parser and sets ``func`` to
a callable taking the parsed arguments and returning an exit status. Subcommand modules import
torch, DeepSpeed and the model only when their command runs, so ``dv3 --help`` answers at once.
Bad input (any ``InputError``) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

import engine
from data_pipeline.cli import register as register_data
from engine.ablation.cli import register as register_ablate
from engine.cli.bench import register as register_bench
from engine.cli.evaluate import register as register_evaluate
from engine.cli.export import register as register_export
from engine.cli.launch import register as register_launch
from engine.cli.plan import register as register_plan
from engine.cli.pretrain import register as register_pretrain
from engine.cli.slurm_submit import register as register_slurm
from engine.errors import EXIT_BAD_INPUT, InputError

# In the order of a user's day.
SUBCOMMANDS = (register_data, register_plan, register_pretrain, register_launch, register_evaluate, register_export,
               register_bench, register_slurm, register_ablate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dv3",
        description="dv3: pretrain DeBERTa-v3 encoders with replaced token detection and "
        "gradient-disentangled embedding sharing, at cluster scale.",
    )
    parser.add_argument("--version", action="version", version=f"dv3 {engine.__version__}")
    # The deepspeed launcher runs `dv3 --local_rank=N <command> ...`; the rank comes from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except InputError as error:
        print(f"dv3 {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
