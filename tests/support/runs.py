"""Helpers for the end-to-end tests: real `dv3 pretrain` processes on 1 or 2 CPU ranks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

# The shared reference run (conftest.py's `uninterrupted`): 2 ranks, ZeRO-3, a checkpoint every half.
UNINTERRUPTED_STEPS = 8
_ports = iter(range(29500 + (os.getpid() * 7) % 2000, 40000))


def pretrain_command(output_dir: Path, dataset: Path, nproc: int, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "engine.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(next(_ports)), "-m", "engine.cli"]
    return [*launcher, "pretrain", "--config", str(REPO / "configs/tiny_cpu.yaml"), "--output-dir", str(output_dir),
            "--data.dirs", str(dataset), "--log.interval", "1", "--log.progress-bar", "false", *extra]


def run_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_pretrain(output_dir: Path, dataset: Path, nproc: int, *extra: str, timeout: int = 600,
                 expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(output_dir, dataset, nproc, *extra), cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def start_pretrain(output_dir: Path, dataset: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """In its own process group, so the whole launcher tree can be signalled or killed."""
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")
    return subprocess.Popen(pretrain_command(output_dir, dataset, nproc, *extra), cwd=REPO, env=run_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it. torchrun starts each worker in a session
    of its own, so killing the launcher's process group would leave the ranks running."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before {path} appeared")
        if time.time() > deadline:
            kill_tree(process)
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def step_losses(output_dir: Path) -> dict[int, tuple[float, float, float]]:
    """Loss, MLM loss and RTD loss per step from metrics.jsonl; a later entry for a step (after a
    resume) replaces an earlier one."""
    losses = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = (record["loss"], record["mlm_loss"], record["rtd_loss"])
    return losses


def step_learning_rates(output_dir: Path) -> dict[int, dict[str, float]]:
    """Each optimizer group's lr per logged step, from metrics.jsonl (later entries win)."""
    rates = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            rates[record["step"]] = {k.removeprefix("lr/"): v for k, v in record.items() if k.startswith("lr/")}
    return rates
