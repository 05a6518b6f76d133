"""``dv3 launch``: N ranks of a dv3 command on this machine, with a launcher that passes signals on.

    dv3 launch --nproc-per-node 8 -- pretrain --config configs/base.yaml --output-dir runs/base

What torchrun does for one node (the rendezvous variables, one process per rank), and what it
does not do for a run that must survive preemption (docs/cluster.md, "Signals and launchers"):

- SIGUSR1 and SIGTERM to the launcher are passed on to every rank (SIGINT and SIGHUP as
  SIGTERM): the ranks checkpoint at the next step boundary and exit 75, and so does the launcher.
  The same signal sent to any one rank has the same end: all ranks agree at the step boundary.
- A rank that dies (killed by a signal, or any status but 0, 1, 2 and 75) makes the launcher stop
  the others (SIGTERM, then SIGKILL after ``--stop-timeout`` seconds); a rank that ends in
  order (0, 1, 2, 75) gives the others ``--stop-timeout`` seconds to end the same way.
- No rank outlives the launcher: each is started in its own session (a Ctrl-C reaches the
  launcher only, which passes it on as SIGTERM) and asks the kernel for SIGTERM when the
  launcher dies, even of SIGKILL: it then checkpoints and exits 75 by itself.

Exit status: the ranks' own when they agree (0 done, 75 stopped for a requeue, 1 non-finite
stop, 2 bad input); 75 when every rank stopped on a signal this launcher passed on; otherwise
the status of the first rank that failed (128 + N for a rank killed by signal N, as a shell
reports it), and 2 for bad launcher options, on one line.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from engine.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, InputError

# Statuses a rank ends with on purpose, together with the others (engine.errors): done, the
# non-finite stop, bad input, stopped for a requeue. Anything else is a crash.
ORDERLY = (0, 1, EXIT_BAD_INPUT, EXIT_PREEMPTED)
# Signal to the launcher -> signal to every rank.
PASSED_ON = {signal.SIGUSR1: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM,
             signal.SIGHUP: signal.SIGTERM}
PR_SET_PDEATHSIG = 1


class LaunchError(InputError):
    """A launcher option that cannot be used; the message names it."""


@dataclass
class Rank:
    index: int
    process: subprocess.Popen
    status: int | None = None  # shell-style: 128 + N when killed by signal N
    ended_at: float | None = None


def shell_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def describe(status: int) -> str:
    if status > 128:
        try:
            return f"{status} ({signal.Signals(status - 128).name})"
        except ValueError:
            return str(status)
    return str(status)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with(launcher_pid: int):
    """For Popen's preexec_fn: the rank gets SIGTERM when the launcher dies (Linux's PR_SET_PDEATHSIG)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not between fork and exec

    def in_the_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher_pid:  # the launcher died before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return in_the_child


class Launcher:
    def __init__(self, nproc: int, command: list[str], master_port: int, stop_timeout: float) -> None:
        self.nproc, self.command, self.master_port, self.stop_timeout = nproc, command, master_port, stop_timeout
        self.ranks: list[Rank] = []
        self.passed_on: signal.Signals | None = None  # the last signal passed on to the ranks
        self.stopping_since: float | None = None  # when this launcher began stopping the ranks itself
        self.killed = False

    def say(self, message: str) -> None:
        print(f"dv3 launch: {message}", file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame) -> None:
        forwarded = PASSED_ON[signal.Signals(signum)]
        self.passed_on = forwarded
        self.say(f"got {signal.Signals(signum).name}; passing {forwarded.name} on to every rank")
        self._signal_running(forwarded)

    def _signal_running(self, signum: signal.Signals) -> None:
        for rank in self.ranks:
            if rank.status is None:
                try:
                    rank.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _start(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_"))}
        die_with_launcher = _die_with(os.getpid())
        for index in range(self.nproc):
            env = {**base, "RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(self.nproc),
                   "LOCAL_WORLD_SIZE": str(self.nproc), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(self.master_port)}
            process = subprocess.Popen([sys.executable, "-m", "engine.cli", *self.command], env=env,
                                       start_new_session=True, preexec_fn=die_with_launcher)
            self.ranks.append(Rank(index, process))
            if self.passed_on is not None:  # a signal that came while the ranks were starting
                process.send_signal(self.passed_on)

    def run(self) -> int:
        for signum in PASSED_ON:
            signal.signal(signum, self._on_signal)
        self._start()
        self.say(f"{self.nproc} rank(s) on 127.0.0.1:{self.master_port}, pids "
                 f"{' '.join(str(rank.process.pid) for rank in self.ranks)}: dv3 {' '.join(self.command)}")
        first_end: float | None = None
        while any(rank.status is None for rank in self.ranks):
            for rank in self.ranks:
                if rank.status is None and rank.process.poll() is not None:
                    rank.status, rank.ended_at = shell_status(rank.process.returncode), time.monotonic()
                    first_end = first_end or rank.ended_at
                    self._on_rank_end(rank)
            now = time.monotonic()
            if first_end is not None and self.stopping_since is None and now - first_end > self.stop_timeout:
                self._stop(f"rank(s) {self._running()} still running {self.stop_timeout:g} s after the first "
                           "ended")
            if self.stopping_since is not None and not self.killed and now - self.stopping_since > self.stop_timeout:
                self.say(f"rank(s) {self._running()} ignored SIGTERM for {self.stop_timeout:g} s; killing them")
                self._signal_running(signal.SIGKILL)
                self.killed = True
            time.sleep(0.05)
        status = self.exit_status()
        self.say(f"exit {status}: " + ", ".join(f"rank {rank.index} {describe(rank.status)}" for rank in self.ranks))
        return status

    def _running(self) -> str:
        return ",".join(str(rank.index) for rank in self.ranks if rank.status is None) or "none"

    def _on_rank_end(self, rank: Rank) -> None:
        if self.stopping_since is None and not self._orderly(rank.status):
            self._stop(f"rank {rank.index} (pid {rank.process.pid}) ended with status {describe(rank.status)}")

    def _orderly(self, status: int) -> bool:
        # A rank killed by the signal this launcher passed on had not installed its handler yet
        # (it was starting): stopped on request, before there was anything to save.
        return status in ORDERLY or (self.passed_on is not None and status == 128 + self.passed_on)

    def _stop(self, reason: str) -> None:
        self.stopping_since = time.monotonic()
        running = self._running()
        if running != "none":
            self.say(f"{reason}; stopping rank(s) {running} (SIGTERM, SIGKILL after {self.stop_timeout:g} s)")
            self._signal_running(signal.SIGTERM)

    def exit_status(self) -> int:
        """The ranks' common status, 75 for a stop this launcher passed on, else the first failure's."""
        ended = sorted(self.ranks, key=lambda rank: rank.ended_at)
        statuses = {rank.status for rank in ended}
        if len(statuses) == 1 and statuses <= set(ORDERLY):
            return statuses.pop()
        if statuses <= {EXIT_PREEMPTED, *(() if self.passed_on is None else (128 + self.passed_on, 0))}:
            return EXIT_PREEMPTED
        failures = [rank.status for rank in ended if rank.status != 0]
        return failures[0] if failures else 0


def check_launch_args(args: argparse.Namespace) -> tuple[int, int, float, list[str]]:
    def whole(flag: str, value: str, low: int, high: int) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise LaunchError(f"{flag} must be a whole number from {low} to {high}, got {value!r}")
        return int(value)

    nproc = whole("--nproc-per-node", args.nproc_per_node, 1, 1024)
    port = whole("--master-port", args.master_port, 1, 65535) if args.master_port is not None else free_port()
    try:
        stop_timeout = float(args.stop_timeout)
    except ValueError:
        stop_timeout = -1.0
    if not 0 < stop_timeout < 86400:
        raise LaunchError(f"--stop-timeout must be a number of seconds above 0, got {args.stop_timeout!r}")
    command = list(args.job)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0].startswith("-"):
        raise LaunchError("give the dv3 command to run after '--', e.g. dv3 launch --nproc-per-node 2 -- pretrain ...")
    if command[0] == "launch":
        raise LaunchError("dv3 launch cannot launch itself")
    return nproc, port, stop_timeout, command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dv3 launch``."""
    parser = subparsers.add_parser(
        "launch", help="run N ranks of a dv3 command on this machine; signals reach every rank",
        usage="dv3 launch --nproc-per-node N [options] -- COMMAND [ARGS ...]", description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", "--nproc_per_node", required=True, metavar="N",
                        help="ranks to start (one per GPU on a GPU machine)")
    parser.add_argument("--master-port", "--master_port", metavar="PORT",
                        help="rendezvous port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--stop-timeout", default="120", metavar="SECONDS",
                        help="how long the ranks get to end after the first one ended, and to end after SIGTERM "
                        "before SIGKILL (default 120; it must cover a checkpoint)")
    parser.add_argument("job", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the dv3 command and its arguments, after --")
    parser.set_defaults(func=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    nproc, port, stop_timeout, command = check_launch_args(args)
    return Launcher(nproc, command, port, stop_timeout).run()
