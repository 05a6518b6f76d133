"""``dv3 pretrain``: the command line of the main job (the loop itself is ``engine.train.loop``)."""

from __future__ import annotations

import argparse

from engine.config import add_config_flags, load_run_config, overrides_from_args
from engine.train.preemption import StopRequest

DESCRIPTION = """\
Pretrain a DeBERTa-v3 discriminator with replaced token detection (an MLM generator whose
samples the discriminator learns to detect) and gradient-disentangled embedding sharing,
under DeepSpeed. Settings come from --config (YAML or JSON: {section: {field: value}}) and
are overridden by --section.field flags. Launch it as a single process, or under deepspeed,
torchrun, srun (see slurm/pretrain.sbatch) or mpirun: ranks are discovered from the launcher.

Exit status: 0 done; 75 stopped by SIGUSR1/SIGTERM after writing a checkpoint (run again with
--resume auto); 1 stopped after too many non-finite losses; 2 bad input (a setting, the data,
a checkpoint or a model folder), reported on one line before the run directory is touched.

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
    stop = StopRequest()  # first: a stop signal during start-up waits for the first step boundary
    stop.install()
    overrides = overrides_from_args(args)
    for key, value in (("output_dir", args.output_dir), ("resume", args.resume), ("model.init_from", args.init_from)):
        if value:
            overrides[key] = value
    config = load_run_config(args.config, overrides)
    from engine.train.loop import pretrain  # torch and DeepSpeed: only when a run starts

    return pretrain(config, stop)
