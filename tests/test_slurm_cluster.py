"""On a real SLURM cluster: two virtual nodes on this machine (scripts/local_slurm.sh).

The `slurm_env` fixture (conftest.py) starts the cluster once per session (root only, as in CI)
and stops it afterwards. The jobs here run the real srun launch path of the templates
(slurm/srun_task.sh) with a real torch.distributed rendezvous; the pretrain template itself is
exercised end to end with `dv3 pretrain` in test_slurm_pretrain.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.slurm import DV3, LOCAL_SLURM, SRUN_TASK, slurm, wait_for_job

pytestmark = pytest.mark.slow

def test_start_is_idempotent_and_both_virtual_nodes_are_idle(slurm_env):
    again = subprocess.run([str(LOCAL_SLURM), "start"], env=slurm_env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    nodes = dict(line.split() for line in slurm(slurm_env, "sinfo", "-h", "-N", "-o", "%N %t").splitlines())
    assert set(nodes) == {"n1", "n2"}
    assert set(nodes.values()) <= {"idle", "mix", "alloc"}
    status = subprocess.run([str(LOCAL_SLURM), "status"], env=slurm_env, capture_output=True, text=True)
    assert status.returncode == 0 and "slurmd n2 running" in status.stdout


# Every task joins a real gloo process group with the variables srun_task.sh gave it.
RENDEZVOUS = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME", "SLURM_JOB_ID"]
    record = {k: os.environ[k] for k in keys} | {"sum": int(total), "world": dist.get_world_size()}
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    """
)


def test_submitted_two_node_job_gives_each_task_its_rank_and_a_working_rendezvous(slurm_env, tmp_path):
    script = tmp_path / "rendezvous.py"
    script.write_text(RENDEZVOUS)
    results = tmp_path / "results"
    results.mkdir()
    # An sbatch script that launches like pretrain.sbatch does: srun, one task per node, the wrapper.
    template = tmp_path / "rendezvous.sbatch"
    template.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            #SBATCH --job-name=dv3-rendezvous
            #SBATCH --time=5
            set -uo pipefail
            source "$DV3_HOME/slurm/common.sh"
            dv3_setup_env
            srun --cpus-per-task=1 "$DV3_HOME/slurm/srun_task.sh" python {script} "$1"
            """
        )
    )
    submitted = subprocess.run(
        [*DV3, "slurm", "submit", str(template), "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1",
         "--", str(results)],
        env=slurm_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"^submitted job (\d+)$", submitted.stdout, re.M).group(1)
    assert submitted.stdout.splitlines()[0].startswith("sbatch --parsable --nodes=2 --ntasks-per-node=1")
    log = Path(slurm_env["DV3_RUNS_ROOT"]) / "slurm-logs" / f"dv3-rendezvous-{job_id}.out"
    assert str(log) in submitted.stdout

    job = wait_for_job(slurm_env, job_id)
    assert job["JobState"] == "COMPLETED", log.read_text()
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert {r["SLURMD_NODENAME"] for r in ranks} == {"n1", "n2"}, "one task on each virtual node"
    assert all(r["LOCAL_RANK"] == "0" and r["WORLD_SIZE"] == "2" and r["world"] == 2 for r in ranks)
    assert all(r["MASTER_ADDR"] == "n1" for r in ranks), "the first host of the allocation"
    assert all(r["MASTER_PORT"] == str(10000 + int(job_id) % 20000) for r in ranks), "derived from the job id"
    assert all(r["sum"] == 3 for r in ranks), "the all-reduce went through the rendezvous"


# Stops like dv3 pretrain on preemption: a flag on USR1, then exit 75.
STOP_ON_USR1 = textwrap.dedent(
    """
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    print("ready", os.environ["RANK"], os.environ["SLURM_JOB_ID"], flush=True)
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(75 if got else 1)
    """
)


def test_usr1_to_the_job_steps_reaches_every_task_and_each_records_75(slurm_env, tmp_path):
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    env = {**slurm_env, "DV3_STATUS_DIR": str(status_dir)}
    step = subprocess.Popen(
        ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=3", "--job-name=dv3-usr1",
         str(SRUN_TASK), sys.executable, "-c", STOP_ON_USR1],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        ready = [step.stdout.readline().split() for _ in range(2)]
        assert sorted(r[1] for r in ready) == ["0", "1"], ready
        job_id = ready[0][2]
        # What `--signal=USR1@<lead>` does before the time limit: USR1 to every step's tasks.
        slurm(slurm_env, "scancel", "--signal=USR1", job_id)
        status = step.wait(timeout=60)
    finally:
        if step.poll() is None:
            os.killpg(step.pid, signal.SIGKILL)
    assert status == 75, step.stderr.read()
    assert {p.name: p.read_text().strip() for p in status_dir.iterdir()} == {"rank-0": "75", "rank-1": "75"}


def test_prepare_data_array_makes_shards_that_verify(slurm_env, tmp_path):
    # Real multilingual text from Debian's fortunes-de (a bootstrap package), a few files so
    # that the two parts of the array both get some.
    source = Path("/usr/share/games/fortunes/de")
    files = sorted(p for p in source.glob("*") if p.is_file() and not p.suffix)[:4] if source.is_dir() else []
    if len(files) < 2:
        pytest.skip("fortunes-de is not installed (scripts/bootstrap.sh installs it)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in files:
        shutil.copyfile(path, corpus / path.name)
    submitted = subprocess.run(
        [*DV3, "slurm", "submit", "prepare_data", "--array", "0-1", "--cpus-per-task", "1", "--time", "20",
         "--", "corpus", "--output", "shards", "--format", "fortune", "--vocab-size", "600", "--seq-len", "64"],
        env=slurm_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    tokenizer, parts, merge = re.findall(r"^submitted job (\d+)", submitted.stdout, re.M)
    logs = Path(slurm_env["DV3_RUNS_ROOT"]) / "slurm-logs"

    job = wait_for_job(slurm_env, merge, timeout=300)
    assert job["JobState"] == "COMPLETED", "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert int(wait_for_job(slurm_env, tokenizer)["ExitCode"].split(":")[0]) == 0
    part_logs = sorted(logs.glob(f"dv3-prepare-data-{parts}_*.out"))
    assert [p.name for p in part_logs] == [f"dv3-prepare-data-{parts}_0.out", f"dv3-prepare-data-{parts}_1.out"]
    assert "--num-parts 2 --part 1" in part_logs[1].read_text()
    # The template ran `dv3 data verify` last; check the result independently as well.
    verify = subprocess.run([*DV3, "data", "verify", str(tmp_path / "shards")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert len(list((tmp_path / "shards" / "parts").glob("part-*.json"))) == 2


def test_refused_submissions_reach_no_queue(slurm_env, tmp_path):
    def marker_job() -> int:
        out = slurm(slurm_env, "sbatch", "--parsable", "--hold", f"--output={tmp_path}/m-%j.out", "--wrap", "true")
        job_id = out.strip().split(";")[0]
        slurm(slurm_env, "scancel", job_id)
        return int(job_id)

    before = marker_job()
    for argv in (
        ["pretrain", "--partition", "gpu;hostname"],
        ["pretrain", "--nodes", "two"],
        ["pretrain", "--", "--config", str(tmp_path / "missing.yaml")],
        ["pretrain", "--", "--train.name", "$(touch /tmp/pwned)"],
    ):
        result = subprocess.run(
            [*DV3, "slurm", "submit", *argv], env=slurm_env, cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "sbatch" not in result.stdout
    # SLURM numbers jobs consecutively: nothing was submitted between the two markers.
    assert marker_job() == before + 1
