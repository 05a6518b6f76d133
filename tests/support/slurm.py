"""The local two-node SLURM cluster (scripts/local_slurm.sh) and the commands that talk to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
SRUN_TASK = REPO / "slurm" / "srun_task.sh"
# The installed console script, as users run it.
DV3 = [str(Path(sys.executable).with_name("dv3"))]


def daemon_pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in (folder / "run").glob("*.pid") if p.read_text().strip().isdigit()]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def slurm(env: dict[str, str], *cmd: str, timeout: float = 60) -> str:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"
    return result.stdout


def wait_for_job(env: dict[str, str], job_id: str, timeout: float = 180) -> dict[str, str]:
    """Poll until the job has finished; returns `scontrol show job` as a dict."""
    deadline = time.monotonic() + timeout
    while True:
        fields = dict(re.findall(r"(\w+)=(\S*)", slurm(env, "scontrol", "show", "job", job_id)))
        if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        assert time.monotonic() < deadline, f"job {job_id} still {fields['JobState']} after {timeout}s"
        time.sleep(0.5)


def rank_process(job_id: str, rank: int, timeout: float = 60):
    """The `dv3 pretrain` process of `rank` in SLURM job `job_id` (not its srun_task.sh wrapper), as a
    psutil.Process: the virtual nodes are this machine, so every task is a local process."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        for process in psutil.process_iter(["cmdline"]):
            try:
                cmdline = process.info["cmdline"] or []
                if "pretrain" not in cmdline or any(word.endswith("srun_task.sh") for word in cmdline):
                    continue
                env = process.environ()
            except psutil.Error:
                continue
            if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank):
                return process
        assert time.monotonic() < deadline, f"no rank {rank} process of job {job_id} after {timeout}s"
        time.sleep(0.2)
