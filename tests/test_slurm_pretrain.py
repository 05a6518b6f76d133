"""`dv3 pretrain` launched the ways an operator launches it, end to end on this machine.

- `dv3 slurm submit pretrain` (slurm/pretrain.sbatch) on the local SLURM cluster's two virtual
  nodes, one CPU rank each: a run that completes, and a run preempted with USR1 that
  checkpoints, requeues itself, resumes and ends with the same losses as the one never stopped;
- `mpirun -np 2 dv3 pretrain`, ranks found through mpi4py;
- mpirun inside a SLURM allocation and `srun --mpi=pmix`: the MPI wire-up and the rendezvous.

Every run is the tiny preset (configs/tiny_cpu.yaml, ZeRO-3 on gloo) for STEPS steps on the
shared `tiny_dataset`. The engine seeds each step from (seed, step, rank) and its loader resumes
exactly, so runs with the same settings and world size have identical losses at every step,
however they were launched or interrupted: the tests compare with `==`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.train import checkpoint
from tests.support import REPO
from tests.support.runs import step_losses
from tests.support.slurm import DV3, SRUN_TASK, rank_process, slurm, wait_for_job

pytestmark = pytest.mark.slow

STEPS = 8
CHECKPOINT_INTERVAL = 4  # a preemption after step 2 saves at step 3: off the periodic checkpoints
JOB_TIMEOUT = 900  # a start takes 20-60 s here, plus minutes when DeepSpeed rebuilds its CPU op
VENV_BIN = str(Path(sys.executable).parent)
# DeepSpeed compiles its CPU communication op at the first start and caches it by folder. The jobs
# here run with the venv first on PATH (slurm/common.sh does that), so with the venv's ninja; a
# process elsewhere on this machine that finds another ninja version (the system's) on its PATH
# judges the other one's build stale and rebuilds it (minutes on two cores), back and forth. A
# cache of their own keeps these runs out of that; it is kept between sessions.
OP_CACHE = {"TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions" / "dv3-launch-tests")}


def pretrain_args(dataset: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--data.dirs", str(dataset),
            "--train.steps", str(STEPS), "--checkpoint.interval", str(CHECKPOINT_INTERVAL),
            "--log.interval", "1", "--log.progress-bar", "false"]  # fmt: skip


@dataclass
class SubmittedRun:
    job_id: str
    run_dir: Path
    batch_log: Path
    job: dict[str, str] | None = None  # `scontrol show job` once it ended

    def logs(self) -> str:
        """The batch log and every node log, for assertion messages."""
        parts = [self.batch_log] + sorted((self.run_dir / "logs").glob("*.log"))
        return "\n".join(f"== {p}\n{p.read_text()[-4000:]}" for p in parts if p.exists())


def submit_tiny(env: dict[str, str], cwd: Path, dataset: Path) -> SubmittedRun:
    submitted = subprocess.run(
        [*DV3, "slurm", "submit", "pretrain", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
         "--time", "30", "--", *pretrain_args(dataset)],
        env={**env, **OP_CACHE}, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"^submitted job (\d+)$", submitted.stdout, re.M).group(1)
    run_dir = Path(re.search(r"^  run dir: (\S+)$", submitted.stdout, re.M).group(1))
    batch_log = Path(re.search(r"^  batch log: (\S+)$", submitted.stdout, re.M).group(1))
    return SubmittedRun(job_id, run_dir, batch_log)


# "0: [2026-01-01 10:00:00] task 0/2: on n1 local rank 0, master n1:10047, job 47 restart 0: dv3 ..."
TASK_START = re.compile(
    r"^(\d+): \[[^]]+\] task (\d+)/(\d+): on (\S+) local rank (\d+), master (\S+), job (\d+) restart (\d+):", re.M
)


def task_starts(run: SubmittedRun) -> list[dict]:
    """What slurm/srun_task.sh said when it started each task, from every node log of the job."""
    starts = []
    for path in sorted((run.run_dir / "logs").glob(f"job-{run.job_id}.node*.log")):
        node_index = int(re.search(r"\.node(\d+)\.", path.name).group(1))
        for label, rank, world, node, local, master, job, restart in TASK_START.findall(path.read_text()):
            assert label == rank, f"srun's label and the task's rank differ in {path}"
            starts.append(
                {
                    "rank": int(rank),
                    "world": int(world),
                    "node": node,
                    "node_index": node_index,
                    "local_rank": int(local),
                    "master": master,
                    "job": job,
                    "restart": int(restart),
                }
            )
    return starts


def rank_log(run: SubmittedRun, rank: int) -> str:
    """Every line rank `rank` wrote (srun --label prefixes them with the rank)."""
    lines = []
    for path in sorted((run.run_dir / "logs").glob(f"job-{run.job_id}.node*.log")):
        lines += [line[len(f"{rank}: ") :] for line in path.read_text().splitlines() if line.startswith(f"{rank}: ")]
    return "\n".join(lines)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps in metrics.jsonl with a loss, in the order they were written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [record["step"] for record in map(json.loads, path.read_text().splitlines()) if "loss" in record]


@pytest.fixture(scope="module")
def reference(slurm_env, tiny_dataset, tmp_path_factory) -> SubmittedRun:
    """The uninterrupted run: submitted, waited for, and the reference of the other runs' losses."""
    run = submit_tiny(slurm_env, tmp_path_factory.mktemp("submit"), tiny_dataset)
    run.job = wait_for_job(slurm_env, run.job_id, timeout=JOB_TIMEOUT)
    return run


def test_submitted_tiny_pretrain_completes_with_one_rank_on_each_virtual_node(reference):
    job = reference.job
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", reference.logs()
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"

    # The node logs: node i of the job holds the task that srun_task.sh started on virtual node n<i+1>.
    starts = sorted(task_starts(reference), key=lambda s: s["rank"])
    assert [(s["rank"], s["world"], s["node_index"], s["node"]) for s in starts] == [(0, 2, 0, "n1"), (1, 2, 1, "n2")]
    assert all(s["local_rank"] == 0 and s["restart"] == 0 and s["job"] == reference.job_id for s in starts)
    assert {s["master"] for s in starts} == {f"n1:{10000 + int(reference.job_id) % 20000}"}
    assert "2 rank(s) x micro-batch 8" in rank_log(reference, 0), "one process group over both nodes"
    assert (reference.run_dir / "slurm" / "FINISHED").is_file()

    losses = step_losses(reference.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(value) for values in losses.values() for value in values), losses

    complete = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(reference.run_dir))
    assert [checkpoint.read_state(path)["step"] for path in complete] == [CHECKPOINT_INTERVAL, STEPS]
    state = checkpoint.read_state(complete[-1])
    assert state["world_size"] == 2 and state["loader"]["samples_consumed"] == STEPS * 16

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference.run_dir / "tensorboard"))
    events.Reload()
    curve = {event.step: event.value for event in events.Scalars("loss/total")}
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert all(curve[step] == pytest.approx(losses[step][0], rel=1e-6) for step in curve)


def test_usr1_preemption_checkpoints_requeues_and_resumes_to_the_same_losses(
    reference, slurm_env, tiny_dataset, tmp_path
):
    run = submit_tiny(slurm_env, tmp_path, tiny_dataset)
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(logged_steps(run.run_dir)) < 2:
        state = dict(re.findall(r"(\w+)=(\S*)", slurm(slurm_env, "scontrol", "show", "job", run.job_id)))["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {run.job_id} {state} before step 2\n{run.logs()}"
        assert time.monotonic() < deadline, f"no step 2 after {JOB_TIMEOUT}s\n{run.logs()}"
        time.sleep(0.2)
    # What an operator does to free the nodes (and what --signal=B:USR1 does): USR1 to the
    # batch shell and every step. Training is between step 2 and the last.
    slurm(slurm_env, "scancel", "--signal=USR1", "--full", run.job_id)

    job = wait_for_job(slurm_env, run.job_id, timeout=JOB_TIMEOUT)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", run.logs()
    assert job["Restarts"] == "1", run.logs()

    batch = run.batch_log.read_text()
    assert "got SIGUSR1" in batch and "stopped for preemption (exit 75); requeueing" in batch, batch
    assert f"job {run.job_id} restart 1 on n[1-2]" in batch and "finished; run dir" in batch, batch
    rank0, rank1 = rank_log(run, 0), rank_log(run, 1)
    stop = re.search(r"stop requested \(SIGUSR1\): checkpoint at step (\d+) written", rank0)
    assert stop, run.logs()
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < STEPS, f"the preemption landed at step {stopped_at}, not mid-run"
    assert f"checkpoint at step {stopped_at} written" in rank1, "both ranks stopped at the same step"
    # The first rank out exits 75 and srun (--kill-on-bad-exit) sends TERM to the others, which
    # may still be tearing down after the checkpoint: 143 then. The template requeues on any 75.
    exits = re.findall(r"task \d+/2: exited with status (\d+)", rank0 + "\n" + rank1)
    assert len(exits) == 2 and "75" in exits and set(exits) <= {"75", "143"}, exits
    assert (
        f"resumed from {checkpoint.checkpoint_root(run.run_dir) / checkpoint.tag_for_step(stopped_at)} "
        f"at step {stopped_at}" in rank0
    ), run.logs()
    assert sorted(s["restart"] for s in task_starts(run)) == [0, 0, 1, 1]

    # Steps 1..s before the preemption, s+1..STEPS after the resume, each exactly once.
    assert logged_steps(run.run_dir) == list(range(1, STEPS + 1))
    expected, got = step_losses(reference.run_dir), step_losses(run.run_dir)
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], f"step {step} (stopped at {stopped_at}): {got[step]} != {expected[step]}"
    newest = checkpoint.latest_complete(checkpoint.checkpoint_root(run.run_dir))
    assert checkpoint.read_state(newest)["step"] == STEPS
    assert (run.run_dir / "slurm" / "FINISHED").is_file()


# --- a crashed rank ---------------------------------------------------------------------------------


def wait_while_running(env: dict[str, str], run: SubmittedRun, ready, what: str) -> None:
    """Poll until `ready()`; the job must still be queued or running meanwhile."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ready():
        state = dict(re.findall(r"(\w+)=(\S*)", slurm(env, "scontrol", "show", "job", run.job_id)))["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {run.job_id} {state} before {what}\n{run.logs()}"
        assert time.monotonic() < deadline, f"no {what} after {JOB_TIMEOUT}s\n{run.logs()}"
        time.sleep(0.1)


def complete_steps(run_dir: Path) -> list[int]:
    root = checkpoint.checkpoint_root(run_dir)
    if not root.exists():
        return []
    return [checkpoint.read_state(path)["step"] for path in checkpoint.complete_checkpoints(root)]


def test_a_sigkilled_rank_is_requeued_and_resumes_from_the_last_checkpoint_to_the_same_losses(
    reference, slurm_env, tiny_dataset, tmp_path
):
    run = submit_tiny(slurm_env, tmp_path, tiny_dataset)
    wait_while_running(slurm_env, run, lambda: CHECKPOINT_INTERVAL in complete_steps(run.run_dir), "a checkpoint")
    victim = rank_process(run.job_id, 1)
    # One step past the checkpoint, so that the crash loses a step and the resumed run redoes it.
    wait_while_running(slurm_env, run, lambda: CHECKPOINT_INTERVAL + 1 in logged_steps(run.run_dir), "a step")
    # What the out-of-memory killer or a hardware fault does to one rank: rank 0 then fails in
    # its next collective (gloo: "Connection closed by peer").
    victim.kill()

    job = wait_for_job(slurm_env, run.job_id, timeout=JOB_TIMEOUT)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", run.logs()
    assert job["Restarts"] == "1", run.logs()
    batch = run.batch_log.read_text()
    checkpoint_tag = checkpoint.tag_for_step(CHECKPOINT_INTERVAL)
    failed = r"pretrain failed \(srun status \d+; rank 0: \d+[^,]*, rank 1: 137 \(SIGKILL\)\): crashed"
    assert re.search(failed, batch), batch
    assert (f"a rank crashed; requeueing {run.job_id} to resume from the last complete checkpoint ({checkpoint_tag}): "
            "failure restart 1 of 3 in a row without a new checkpoint") in batch, batch  # fmt: skip
    assert f"job {run.job_id} restart 1 on n[1-2]" in batch and "finished; run dir" in batch, batch
    failures = (run.run_dir / "slurm" / "failures").read_text().splitlines()
    assert len(failures) == 1 and f" job={run.job_id} restart=0 " in failures[0], failures
    assert failures[0].endswith(f"checkpoint={checkpoint_tag} action=requeue"), failures
    rank0 = rank_log(run, 0)
    resumed_from = checkpoint.checkpoint_root(run.run_dir) / checkpoint_tag
    assert f"resumed from {resumed_from} at step {CHECKPOINT_INTERVAL}" in rank0, run.logs()

    # Steps after the checkpoint ran twice (before the crash, and after the resume): the later
    # entry of each is the resumed run's, and every step equals the uninterrupted run's.
    steps = logged_steps(run.run_dir)
    assert steps.count(CHECKPOINT_INTERVAL + 1) == 2, steps
    resumed_at = len(steps) - steps[::-1].index(CHECKPOINT_INTERVAL + 1) - 1
    assert steps[:CHECKPOINT_INTERVAL] == list(range(1, CHECKPOINT_INTERVAL + 1)), steps
    assert steps[resumed_at:] == list(range(CHECKPOINT_INTERVAL + 1, STEPS + 1)), steps
    expected, got = step_losses(reference.run_dir), step_losses(run.run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    assert complete_steps(run.run_dir)[-1] == STEPS and (run.run_dir / "slurm" / "FINISHED").is_file()

    # The run can be continued from its folder alone: the recorded options and arguments, the same folder.
    printed = subprocess.run([*DV3, "slurm", "submit", "pretrain", "--continue", str(run.run_dir), "--dry-run"],
                             env={**slurm_env, "DV3_RERUN_FINISHED": "1"}, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    words = printed.stdout.split()
    assert f"DV3_RUN_DIR={run.run_dir}" in words[-len(pretrain_args(tiny_dataset)) - 2]
    assert words[-len(pretrain_args(tiny_dataset)):] == pretrain_args(tiny_dataset)
    assert {"--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"} <= set(words)
    refused = subprocess.run([*DV3, "slurm", "submit", "pretrain", "--continue", str(run.run_dir)],
                             env=slurm_env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "the run already finished" in refused.stderr, refused.stderr


def test_a_crash_with_no_failure_budget_left_fails_the_job_and_says_why(slurm_env, tiny_dataset, tmp_path):
    env = {**slurm_env, "DV3_MAX_FAILURE_RESTARTS": "0"}
    run = submit_tiny(env, tmp_path, tiny_dataset)
    wait_while_running(env, run, lambda: logged_steps(run.run_dir), "a step")
    rank_process(run.job_id, 1).kill()

    job = wait_for_job(env, run.job_id, timeout=JOB_TIMEOUT)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "137:0", run.logs()
    assert job["Restarts"] == "0", "not requeued"
    batch = run.batch_log.read_text()
    assert "rank 1: 137 (SIGKILL)): crashed" in batch, batch
    assert "not requeueing: the failure budget is spent (DV3_MAX_FAILURE_RESTARTS=0)" in batch, batch
    assert f"continue the run with: dv3 slurm submit pretrain --continue {run.run_dir}" in batch, batch
    failures = (run.run_dir / "slurm" / "failures").read_text().splitlines()
    assert len(failures) == 1 and failures[0].endswith("action=stop"), failures


# --- MPI ------------------------------------------------------------------------------------------


def mpi_env() -> dict[str, str]:
    """This environment without any launcher's variables, so ranks can only come from mpirun."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    # The venv first, as slurm/common.sh does for the jobs (DeepSpeed builds its CPU op with the ninja on PATH).
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # mpirun refuses to run as root without these; they change nothing for other users.
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        **OP_CACHE,
    )
    return env


def run_group(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group and kill the whole group if it outlives `timeout`."""
    process = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(cmd[:4])} ... still running after {timeout}s\n{output[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, process.returncode, output)


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")


@needs_mpirun
def test_mpirun_pretrain_finds_its_ranks_through_mpi4py_and_trains_like_the_slurm_job(
    reference, tiny_dataset, tmp_path
):
    output = tmp_path / "mpirun"
    result = run_group(
        [
            "mpirun",
            "--oversubscribe",
            "-np",
            "2",
            *DV3,
            "pretrain",
            *pretrain_args(tiny_dataset),
            "--output-dir",
            str(output),
        ],
        mpi_env(),
        tmp_path,
        timeout=JOB_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "2 rank(s) x micro-batch 8" in result.stdout
    expected, got = step_losses(reference.run_dir), step_losses(output)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


# Each rank: discover() and export_rendezvous() as `dv3 pretrain` does, then a gloo all-reduce.
MPI_RENDEZVOUS = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from engine.train.distributed import discover, export_rendezvous
    env = discover()
    export_rendezvous(env)
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    record = {"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank, "launcher": env.launcher,
              "mpi_rank": int(os.environ["OMPI_COMM_WORLD_RANK"]), "node": os.environ["SLURMD_NODENAME"],
              "sum": int(total), "master": os.environ["MASTER_ADDR"] + ":" + os.environ["MASTER_PORT"]}
    with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    """
)


@needs_mpirun
def test_mpirun_inside_an_allocation_numbers_ranks_by_mpi_not_by_its_daemons(slurm_env, tmp_path):
    # Inside an allocation, mpirun starts one daemon per node through srun, and the ranks inherit
    # the daemons' SLURM_PROCID / SLURM_NTASKS (node index, node count): 2 ranks per node must
    # still be ranks 0-3 of 4. `--mca btl self,tcp`: both virtual nodes are one host, and Open
    # MPI names its shared-memory segments by host, so they would collide (a real cluster needs
    # no such option).
    script = tmp_path / "mpi_rendezvous.py"
    script.write_text(MPI_RENDEZVOUS)
    results = tmp_path / "results"
    results.mkdir()
    env = {**mpi_env(), "SLURM_CONF": slurm_env["SLURM_CONF"]}
    result = run_group(
        ["salloc", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5", "--job-name=dv3-mpirun",
         "mpirun", "--mca", "btl", "self,tcp", "--oversubscribe", "-np", "4", sys.executable, str(script), str(results)],
        env, tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["rank"], r["mpi_rank"], r["world"], r["launcher"]) for r in ranks] == [
        (r, r, 4, "mpi") for r in range(4)
    ]
    assert sorted((r["node"], r["local_rank"]) for r in ranks) == [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]
    assert all(r["sum"] == 10 for r in ranks), "the all-reduce went through one process group of 4"
    assert len({r["master"] for r in ranks}) == 1, "rank 0's address and port, shared through mpi4py"


# Started by srun --mpi=pmix through the template's wrapper: MPI over PMIx, and torch.distributed
# with the wrapper's variables, in the same task.
PMIX_TASK = textwrap.dedent(
    """
    import json, os, sys
    from mpi4py import MPI
    import torch, torch.distributed as dist
    from engine.train.distributed import discover
    comm = MPI.COMM_WORLD
    mpi_sum = comm.allreduce(comm.Get_rank() + 1)
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    bare = discover({k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    record = {"rank": int(os.environ["RANK"]), "mpi_rank": comm.Get_rank(), "mpi_size": comm.Get_size(),
              "mpi_sum": mpi_sum, "sum": int(total), "node": os.environ["SLURMD_NODENAME"],
              "bare_srun": [bare.launcher, bare.rank, bare.world_size]}
    with open(os.path.join(sys.argv[1], f"rank{comm.Get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    """
)


def test_srun_mpi_pmix_starts_mpi_ranks_on_both_virtual_nodes(slurm_env, tmp_path):
    plugins = subprocess.run(["srun", "--mpi=list"], env=slurm_env, capture_output=True, text=True, timeout=60)
    if "pmix" not in plugins.stdout + plugins.stderr:
        pytest.skip("this SLURM has no pmix plugin (srun --mpi=list)")
    script = tmp_path / "pmix_task.py"
    script.write_text(PMIX_TASK)
    results = tmp_path / "results"
    results.mkdir()
    env = {**slurm_env, "PYTHONPATH": str(REPO)}
    result = run_group(
        ["srun", "--mpi=pmix", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=3",
         "--job-name=dv3-pmix", str(SRUN_TASK), sys.executable, str(script), str(results)],
        env, tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["mpi_rank"], r["mpi_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert [r["node"] for r in ranks] == ["n1", "n2"]
    assert all(r["mpi_sum"] == 3 and r["sum"] == 3 for r in ranks), "MPI over PMIx and gloo both span the nodes"
    # `srun --mpi=pmix dv3 pretrain` without the wrapper: SLURM's variables, which agree with MPI's.
    assert [r["bare_srun"] for r in ranks] == [["slurm", 0, 2], ["slurm", 1, 2]]
