"""The ``dv3`` command: one entry point whose subcommands follow a user's day.

    dv3 data prepare|verify|stats    corpus to shards, integrity, contents
    dv3 pretrain                     the main job, under any launcher
    dv3 ckpt universal               a checkpoint another world size can resume
    dv3 export                       a Hugging Face model folder from a checkpoint
    dv3 bench kernels|data|train     figures against the peers, as JSON
    dv3 slurm submit                 a validated sbatch of a template
    dv3 ablate                       ES vs NES vs GDES, report and plots

Each subcommand module exposes ``register(subparsers)``; it adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import sys

import engine
from engine.errors import CommandError


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
    for register in _subcommand_registrars():
        register(subparsers)
    return parser


def _subcommand_registrars():
    """Subcommands, in the order of a user's day (the heaviest imports wait for ``func``)."""
    from data_pipeline.cli import register as data
    from engine.ablate import register as ablate
    from engine.bench_cli import register as bench
    from engine.export import register as export_and_ckpt
    from engine.pretrain import register as pretrain
    from engine.slurm_submit import register as slurm

    return [data, pretrain, export_and_ckpt, bench, slurm, ablate]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"dv3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
