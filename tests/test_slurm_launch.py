"""Signals under the launchers of one machine: `dv3 launch` (N ranks) and a single process.

What the README promises: SIGUSR1 or SIGTERM to the launcher or to any rank gives one checkpoint
and exit 75 from the launcher, with no process left behind; a rank that dies takes the others
down with it instead of leaving them training unsupervised. Real `dv3 pretrain` runs (the tiny
preset, 2 CPU ranks under ZeRO-3 on gloo); the process tree is read with psutil before the
signal and checked after the launcher ended. torchrun, the deepspeed launcher and mpirun are
measured in docs/cluster.md ("Signals and launchers"), which says which signal each needs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine import cli
from engine.train import checkpoint
from tests.support import REPO
from tests.support.runs import run_env

STEPS = 200  # never reached: every run here is stopped by a signal
RUN_ARGS = ["--train.steps", str(STEPS), "--checkpoint.interval", "1000", "--log.interval", "1",
            "--log.progress-bar", "false"]  # fmt: skip
START_TIMEOUT = 600  # the first start on a machine builds DeepSpeed's CPU op (minutes)


def pretrain_args(dataset: Path, output: Path) -> list[str]:
    return ["pretrain", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--data.dirs", str(dataset),
            "--output-dir", str(output), *RUN_ARGS]  # fmt: skip


def launch_command(dataset: Path, output: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "engine.cli", *pretrain_args(dataset, output)]
    return [sys.executable, "-m", "engine.cli", "launch", "--nproc-per-node", str(nproc), "--stop-timeout", "60",
            "--", *pretrain_args(dataset, output)]  # fmt: skip


class Run:
    """A launcher in its own session, its log, and every process it started."""

    def __init__(self, dataset: Path, output: Path, nproc: int) -> None:
        self.output, self.nproc = output, nproc
        self.log_path = output.parent / f"{output.name}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(launch_command(dataset, output, nproc), cwd=REPO, env=run_env(),
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.tree: list[psutil.Process] = []

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_training(self) -> None:
        """Until a step is logged (every rank's stop handler is installed by then); records the tree."""
        deadline = time.monotonic() + START_TIMEOUT
        metrics = self.output / "metrics.jsonl"
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode} before training\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no step after {START_TIMEOUT} s\n{self.log()[-4000:]}")
            time.sleep(0.1)
        root = psutil.Process(self.process.pid)
        self.tree = [root, *root.children(recursive=True)]

    def ranks(self) -> list[psutil.Process]:
        return [p for p in self.tree[1:] if "pretrain" in p.cmdline()] if self.nproc > 1 else self.tree[:1]

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the launcher still ran {timeout} s after the signal\n{self.log()[-4000:]}") from None

    def left_over(self, grace: float = 0) -> list[str]:
        """The processes of the tree still alive after `grace` seconds."""
        deadline = time.monotonic() + grace
        while True:
            alive = [p for p in self.tree if _alive(p)]
            if not alive or time.monotonic() >= deadline:
                return [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive]
            time.sleep(0.2)

    def kill(self) -> None:
        for member in self.tree or [psutil.Process(self.process.pid)]:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass

    def complete_steps(self) -> list[int]:
        root = checkpoint.checkpoint_root(self.output)
        return [checkpoint.read_state(path)["step"] for path in checkpoint.complete_checkpoints(root)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "target", "signum"),
    [
        (2, "launcher", signal.SIGUSR1),  # what SLURM's --signal or an operator sends
        (2, "rank", signal.SIGTERM),  # to one rank only: the others agree at the step boundary
        (1, "launcher", signal.SIGTERM),  # a single process: it is its own launcher
    ],
    ids=["dv3-launch-usr1-to-launcher", "dv3-launch-term-to-rank-1", "single-process-term"],
)
def test_a_stop_signal_gives_one_checkpoint_exit_75_and_no_process_left(nproc, target, signum, tiny_dataset, tmp_path):
    run = Run(tiny_dataset, tmp_path / "run", nproc)
    try:
        run.wait_for_training()
        ranks = run.ranks()
        assert len(ranks) == nproc, run.tree
        victim = run.process.pid if target == "launcher" else ranks[-1].pid
        os.kill(victim, signum)
        status = run.wait()
        log = run.log()
        assert status == 75, log[-6000:]
        assert run.left_over(grace=5) == [], "no rank outlives its launcher"
        steps = run.complete_steps()
        assert len(steps) == 1 and 1 <= steps[0] < STEPS, steps
        # Every rank stopped once, at the step checkpointed. A rank that got the signal names it;
        # a rank that did not learnt of it in the step's all-reduce.
        for rank in range(nproc):
            stopped = re.findall(rf"\[dv3 rank {rank}\] WARNING stop requested \(([^)]*)\): checkpoint at step (\d+)",
                                 log)
            signalled = target == "launcher" or rank == nproc - 1
            reason = signum.name if signalled else "signal on another rank"
            assert stopped == [(reason, str(steps[0]))], (rank, stopped, log[-4000:])
        if nproc > 1 and target == "launcher":
            assert f"got {signum.name}; passing {signum.name} on to every rank" in log
            assert "exit 75: rank 0 75, rank 1 75" in log
    finally:
        run.kill()


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_stops_the_others_and_the_launcher_reports_it(tiny_dataset, tmp_path):
    run = Run(tiny_dataset, tmp_path / "run", 2)
    try:
        run.wait_for_training()
        rank0, rank1 = run.ranks()
        rank1.kill()  # what the out-of-memory killer does
        status = run.wait()
        log = run.log()
        assert status == 128 + signal.SIGKILL, log[-6000:]
        assert "rank 1 (pid" in log and "ended with status 137 (SIGKILL); stopping rank(s) 0" in log, log[-4000:]
        assert run.left_over(grace=5) == []
    finally:
        run.kill()


@pytest.mark.slow
def test_ranks_checkpoint_and_exit_by_themselves_when_the_launcher_is_killed(tiny_dataset, tmp_path):
    run = Run(tiny_dataset, tmp_path / "run", 2)
    try:
        run.wait_for_training()
        run.process.kill()  # nothing can catch SIGKILL: the kernel tells the ranks (PR_SET_PDEATHSIG)
        run.process.wait(timeout=30)
        assert run.left_over(grace=120) == [], run.log()[-4000:]
        steps = run.complete_steps()
        assert len(steps) == 1, steps
        log = run.log()
        for rank in range(2):
            assert f"[dv3 rank {rank}] WARNING stop requested (SIGTERM): checkpoint at step {steps[0]}" in log, log
    finally:
        run.kill()


# --- options: one line naming the value, exit 2, nothing started -------------------------------


NPROC = "--nproc-per-node must be a whole number from 1 to 1024"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc-per-node", "two", "--", "pretrain"], f"{NPROC}, got 'two'"),
        (["--nproc-per-node", "0", "--", "pretrain"], f"{NPROC}, got '0'"),
        (["--nproc-per-node", "2", "--master-port", "70000", "--", "pretrain"], "--master-port must be a whole number"),
        (["--nproc-per-node", "2", "--stop-timeout", "soon", "--", "pretrain"], "--stop-timeout must be a number"),
        (["--nproc-per-node", "2"], "give the dv3 command to run after '--'"),
        (["--nproc-per-node", "2", "--", "launch", "--nproc-per-node", "2"], "cannot launch itself"),
    ],
)
def test_bad_launch_options_are_refused_on_one_line(argv, message, capsys):
    assert cli.main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
