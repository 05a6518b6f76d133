"""``dv3 pretrain``: the command line of the main job (the loop itself is ``engine.trainer``)."""

from __future__ import annotations

import argparse

from engine.run_config import ConfigError, add_config_flags, build_run_config, overrides_from_args, read_config_file

DESCRIPTION = """\
Pretrain a DeBERTa-v3 discriminator with replaced token detection (an MLM generator whose
samples the discriminator learns to detect) and gradient-disentangled embedding sharing,
under DeepSpeed. Settings come from --config (YAML or JSON: {section: {field: value}}) and
are overridden by --section.field flags. Launch it as a single process, or under deepspeed,
torchrun, srun (see slurm/pretrain.sbatch) or mpirun: ranks are discovered from the launcher.

Exit status: 0 done; 75 stopped by SIGUSR1/SIGTERM after writing a checkpoint (run again with
--resume auto); 1 stopped after too many non-finite losses; 2 a configuration error.

Example (this machine, 2 CPU ranks):
  torchrun --nproc_per_node 2 -m engine.cli pretrain --config configs/tiny_cpu.yaml \\
      --output-dir runs/tiny --train.steps 200
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain with RTD + GDES under DeepSpeed (any launcher)", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run configuration file (YAML or JSON)")
    parser.add_argument("--output-dir", help="run directory: checkpoints, TensorBoard logs, metrics.jsonl")
    parser.add_argument("--resume", help="none (default), auto (newest complete checkpoint in the run "
                        "directory) or a checkpoint folder")
    parser.add_argument("--init-from", help="a Hugging Face DeBERTa-v3 folder to continue pretraining from "
                        "(same as --model.init-from)")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.errors import CommandError

    try:
        file_data = read_config_file(args.config) if args.config else {}
        overrides = overrides_from_args(args)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        if args.resume:
            overrides["resume"] = args.resume
        if args.init_from:
            overrides["model.init_from"] = args.init_from
        config = build_run_config(file_data, overrides)
        config.validate()
    except ConfigError as error:
        raise CommandError(str(error)) from error

    from data_pipeline.errors import DataPipelineError
    from engine.trainer import pretrain

    try:
        return pretrain(config)
    except (ConfigError, DataPipelineError) as error:  # bad data, checkpoint or model folder: one line
        raise CommandError(str(error)) from error
