"""The ablation's first two stages: the data and the three training runs (as child processes)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_pipeline.loader import dataset_info
from engine.ablation.settings import AblationSettings, ablate_arguments, finished_step, pretrain_arguments
from engine.errors import EXIT_PREEMPTED, InputError
from engine.resources import IMPORT_ROOT

log = logging.getLogger("dv3.ablate")


# -- commands -------------------------------------------------------------------------------------------


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
    env["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _has_cuda() -> bool:
    return torch.cuda.is_available()


# -- stages -------------------------------------------------------------------------------------------


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
                raise InputError(
                    f"{saved_path.parent} was trained with {section}.{name}={saved.get(section, {}).get(name)!r} but "
                    f"this ablation asks for {value!r}; use another --output-dir or the same settings")


def prepare_data(settings: AblationSettings) -> None:

    if settings.prepares_data:
        target = settings.prepared_data_dir
        if not (target / "manifest.json").is_file():
            print(f"[ablate] data: preparing the {settings.default_corpus} default corpus into {target}", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            log_path = settings.output_dir / "data" / "prepare.log"
            status = _run_child(prepare_command(settings), settings, log_path)
            if status != 0:
                raise InputError(f"dv3 data prepare exited with status {status} (see {log_path}); to use other "
                                   "data, give --data.dirs")
        else:
            print(f"[ablate] data: {target} (already prepared)", flush=True)
    for directory in settings.data_dirs():
        path = Path(directory)
        try:
            held_out = dataset_info(path, "validation").rows
        except Exception as error:  # the data pipeline's errors name the file at fault
            raise InputError(f"--data.dirs: {path}: {error}") from error
        if held_out == 0:
            raise InputError(f"--data.dirs: {path} has no held-out (validation) rows; the evaluation needs them: "
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
            raise InputError(f"{mode}: pretrain was stopped by a signal after a checkpoint; run the same "
                               "dv3 ablate command again to resume")
        if status != 0:
            raise InputError(f"{mode}: dv3 pretrain exited with status {status}; see {run_dir.with_name(mode + '.log')}")
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


# -- the command ------------------------------------------------------------------------------------------
