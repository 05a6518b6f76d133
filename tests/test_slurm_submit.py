"""``dv3 slurm submit`` validation and dry runs, and the templates' shell pieces that need no cluster.

The runs on a real (local) SLURM cluster are in test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import cli
from engine.cli.slurm_submit import RECORDED_OPTIONS, SubmitError, build_plan, check_time, render_dry_run
from tests.support import REPO

SLURM_DIR = REPO / "slurm"
SHELL_FILES = (
    sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh")) + [REPO / "scripts/local_slurm.sh"]
)


def parse(argv: list[str]):
    return cli.build_parser().parse_args(["slurm", "submit", *argv])


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(["slurm", "submit", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  steps: 20\n")
    return path


# --- dry runs: the exact command -----------------------------------------------------------------


def test_dry_run_prints_the_exact_sbatch_command_for_a_cpu_pretrain(tmp_path, config_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DV3_RUNS_ROOT", raising=False)
    status, out, _ = run_cli(
        [
            "pretrain",
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--time",
            "0:10:00",
            "--dry-run",
            "--",
            "--config",
            "run.yaml",
            "--train.micro-batch",
            "4",
        ],
        capsys,
    )
    assert status == 0
    runs = tmp_path.resolve() / "runs"
    words = shlex.split(out)
    # The run folder is named at submission, so the command itself continues this run when rerun.
    run_dir = re.fullmatch(rf"--export=ALL,DV3_HOME={REPO},DV3_RUNS_ROOT={runs},DV3_RUN_DIR=(\S+)", words[9]).group(1)
    assert re.fullmatch(rf"{runs}/dv3-pretrain-\d{{8}}-\d{{6}}", run_dir), run_dir
    assert words[:9] + words[10:] == [
        "sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
        "--time=0:10:00", "--job-name=dv3-pretrain", f"--output={runs}/slurm-logs/%x-%j.out",
        str(SLURM_DIR / "pretrain.sbatch"), "--config", str(config_file.resolve()), "--train.micro-batch", "4",
    ]  # fmt: skip
    assert not runs.exists(), "a dry run creates nothing"


def test_gpus_per_node_sets_one_task_per_gpu(tmp_path):
    (job,) = build_plan(parse(["pretrain", "--nodes", "4", "--gpus-per-node", "8"]), cwd=tmp_path)
    assert "--gpus-per-node=8" in job.options and "--ntasks-per-node=8" in job.options


def test_options_may_come_after_the_template_and_job_args_may_look_like_options(tmp_path):
    args = parse(["pretrain", "--nodes", "2", "--", "--nodes", "3", "--train.steps", "5"])
    assert args.nodes == "2"
    assert args.job_args == ["--nodes", "3", "--train.steps", "5"]
    (job,) = build_plan(args, cwd=tmp_path)
    assert job.script_args == ["--nodes", "3", "--train.steps", "5"]


def test_run_dir_is_passed_to_the_job_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (job,) = build_plan(parse(["pretrain", "--run-dir", "runs/mine"]), cwd=tmp_path)
    assert job.env["DV3_RUN_DIR"] == str(tmp_path.resolve() / "runs" / "mine")


def test_chain_links_jobs_afterany_into_one_run_folder_without_self_requeue(tmp_path):
    jobs = build_plan(parse(["pretrain", "--chain", "3", "--dependency", "afterok:17"]), cwd=tmp_path)
    assert len(jobs) == 3
    assert [job.after for job in jobs] == [None, ("afterany", 0), ("afterany", 1)]
    assert len({job.env["DV3_RUN_DIR"] for job in jobs}) == 1
    assert all(job.env["DV3_REQUEUE"] == "0" for job in jobs)
    # The user's dependency holds back the first link only.
    assert "--dependency=afterok:17" in jobs[0].options
    assert not any(o.startswith("--dependency=") for o in jobs[1].options)
    assert "--dependency=afterany:102" in jobs[2].command(["101", "102"])


def test_pretrain_array_chain_needs_the_one_at_a_time_throttle(tmp_path):
    (job,) = build_plan(parse(["pretrain", "--array", "1-4%1"]), cwd=tmp_path)
    assert "--array=1-4%1" in job.options and job.env["DV3_REQUEUE"] == "0"
    assert any(o.endswith("%x-%A_%a.out") for o in job.options)
    with pytest.raises(SubmitError, match="%1 throttle"):
        build_plan(parse(["pretrain", "--array", "1-4"]), cwd=tmp_path)


def test_prepare_data_plans_tokenizer_then_parts_then_merge(tmp_path):
    jobs = build_plan(parse(["prepare_data", "--array", "0-7%4", "--", "corpus", "--output", "shards"]), cwd=tmp_path)
    assert [job.env["DV3_DATA_STEP"] for job in jobs] == ["tokenizer", "part", "merge"]
    assert [job.after for job in jobs] == [None, ("afterok", 0), ("afterok", 1)]
    assert jobs[1].env["DV3_DATA_PARTS"] == "8"
    assert "--array=0-7%4" in jobs[1].options
    assert all(job.template == SLURM_DIR / "prepare_data.sbatch" for job in jobs)
    assert all(job.script_args == ["corpus", "--output", "shards"] for job in jobs)


def test_prepare_data_with_a_given_tokenizer_skips_the_tokenizer_job(tmp_path):
    jobs = build_plan(
        parse(["prepare_data", "--array", "0-1", "--", "c", "--tokenizer", "spm.model", "--output", "o"]), cwd=tmp_path
    )
    assert [job.env["DV3_DATA_STEP"] for job in jobs] == ["part", "merge"]
    assert [job.after for job in jobs] == [None, ("afterok", 0)]


def test_dry_run_of_linked_jobs_is_a_runnable_shell_snippet(tmp_path):
    jobs = build_plan(parse(["prepare_data", "--array", "0-3", "--", "c", "--output", "o"]), cwd=tmp_path)
    snippet = render_dry_run(jobs)
    lines = snippet.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["JOB1", "JOB2", "JOB3"]
    assert "--dependency=afterok:$JOB1 " in lines[1] and "--dependency=afterok:$JOB2 " in lines[2]
    subprocess.run(["bash", "-n", "-c", snippet], check=True)


def test_bench_kernels_reports_where_results_go(tmp_path):
    (job,) = build_plan(parse(["bench_kernels", "--job-name", "bench-h100"]), cwd=tmp_path)
    assert job.logs["results"].format(id="42") == str(tmp_path.resolve() / "runs" / "bench" / "bench-h100-42.json")


def test_a_template_can_be_given_by_path(tmp_path):
    script = tmp_path / "mine.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=my-job\nsrun hostname\n")
    (job,) = build_plan(parse([str(script)]), cwd=tmp_path)
    assert job.template == script.resolve()
    assert "--job-name=my-job" in job.options


# --- continuing a run from its folder --------------------------------------------------------------


def recorded_run(tmp_path: Path, config_file: Path, **options: str | None) -> Path:
    """A run folder as `dv3 slurm submit pretrain` leaves it: slurm/submit.json."""
    run_dir = tmp_path / "runs" / "dv3-pretrain-20261125-190951"
    (run_dir / "slurm").mkdir(parents=True)
    recorded = dict.fromkeys(RECORDED_OPTIONS) | {"nodes": "2", "gpus_per_node": "0", "cpus_per_task": "1",
                                                  "time": "30"} | options
    job_args = ["--config", str(config_file.resolve()), "--train.steps", "8"]
    (run_dir / "slurm" / "submit.json").write_text(
        json.dumps({"template": "pretrain", "options": recorded, "job_args": job_args, "job_ids": ["47"]}))
    return run_dir


def test_new_pretrain_runs_get_a_folder_of_their_own_named_at_submission(tmp_path):
    first = build_plan(parse(["pretrain"]), cwd=tmp_path, reserve=True)[0].env["DV3_RUN_DIR"]
    second = build_plan(parse(["pretrain"]), cwd=tmp_path, reserve=True)[0].env["DV3_RUN_DIR"]
    assert Path(first).is_dir() and Path(second).is_dir() and first != second
    assert Path(first).parent == tmp_path.resolve() / "runs" and Path(first).name.startswith("dv3-pretrain-")


def test_continue_submits_the_recorded_options_and_arguments_into_the_same_folder(tmp_path, config_file):
    run_dir = recorded_run(tmp_path, config_file)
    (job,) = build_plan(parse(["pretrain", "--continue", str(run_dir)]), cwd=tmp_path)
    assert job.env["DV3_RUN_DIR"] == str(run_dir.resolve())
    assert {"--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=30"} <= set(
        job.options
    )
    assert job.script_args == ["--config", str(config_file.resolve()), "--train.steps", "8"]
    # Options given again replace the recorded ones; arguments after -- come after the recorded ones (and win).
    (job,) = build_plan(parse(["pretrain", "--continue", str(run_dir), "--time", "60", "--", "--train.steps", "16"]),
                        cwd=tmp_path)  # fmt: skip
    assert "--time=60" in job.options and "--time=30" not in job.options
    assert job.script_args[-4:] == ["--train.steps", "8", "--train.steps", "16"]


def test_continuing_a_finished_run_needs_rerun_finished(tmp_path, config_file, monkeypatch):
    run_dir = recorded_run(tmp_path, config_file)
    (run_dir / "slurm" / "FINISHED").write_text("job 47 2026-11-25 19:13:09\n")
    monkeypatch.delenv("DV3_RERUN_FINISHED", raising=False)
    with pytest.raises(SubmitError, match="the run already finished .job 47.*DV3_RERUN_FINISHED=1"):
        build_plan(parse(["pretrain", "--continue", str(run_dir)]), cwd=tmp_path)
    monkeypatch.setenv("DV3_RERUN_FINISHED", "1")
    (job,) = build_plan(parse(["pretrain", "--continue", str(run_dir), "--", "--train.steps", "16"]), cwd=tmp_path)
    assert job.env["DV3_RERUN_FINISHED"] == "1", "the printed command is the whole story"


CONTINUE_REFUSALS = [
    (["--continue", "{run}", "--run-dir", "elsewhere"], "leave out --run-dir"),
    (["--continue", "{tmp}/nowhere"], "is not a folder"),
    (["--continue", "{tmp}"], "slurm/submit.json not found (the run was not submitted by dv3 slurm submit)"),
    (["--continue", "{garbled}"], "is not a dv3 submit record"),
    (["--continue", "{run};id"], "contains shell metacharacters"),
]


@pytest.mark.parametrize(("argv", "message"), CONTINUE_REFUSALS, ids=[m for _, m in CONTINUE_REFUSALS])
def test_continue_refusals_are_one_line_naming_the_folder(argv, message, tmp_path, config_file, capsys):
    run = recorded_run(tmp_path, config_file)
    garbled = tmp_path / "garbled"
    (garbled / "slurm").mkdir(parents=True)
    (garbled / "slurm" / "submit.json").write_text('{"options": ["--nodes=2"], "job_args": []}')
    argv = [a.format(run=run, tmp=tmp_path, garbled=garbled) for a in argv]
    status, out, err = run_cli(["pretrain", *argv], capsys)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_continue_applies_to_pretrain_only(tmp_path, config_file, capsys):
    run = recorded_run(tmp_path, config_file)
    status, _, err = run_cli(["bench_kernels", "--continue", str(run)], capsys)
    assert status == 2 and "--continue applies to the pretrain template" in err


# --- refusals: one line naming the value, status 2 -------------------------------------------------

REFUSALS = [
    (["pretrain", "--nodes", "two"], "--nodes must be a whole number, got 'two'"),
    (["pretrain", "--nodes", "0"], "--nodes must be between 1"),
    (["pretrain", "--gpus-per-node", "8;reboot"], "--gpus-per-node must be a whole number, got '8;reboot'"),
    (["pretrain", "--cpus-per-task", "-1"], "--cpus-per-task must be a whole number"),
    (["pretrain", "--time", "1:75"], "--time '1:75'"),
    (["pretrain", "--time", "2-25:00"], "--time '2-25:00'"),
    (["pretrain", "--time", "soon"], "--time 'soon' is not a SLURM time"),
    (["pretrain", "--partition", "gpu;id"], "--partition 'gpu;id'"),
    (["pretrain", "--account", "$(id)"], "--account '$(id)'"),
    (["pretrain", "--job-name", "a b"], "--job-name 'a b'"),
    (["pretrain", "--dependency", "afterok:12;id"], "--dependency 'afterok:12;id'"),
    (["pretrain", "--array", "0-3|x"], "--array '0-3|x'"),
    (["pretrain", "--run-dir", "/tmp/a`id`"], "--run-dir '/tmp/a`id`' contains shell metacharacters"),
    (["pretrain", "--chain", "3", "--array", "1-3%1"], "--chain and --array"),
    (["pretrain", "--", "--train.name", "x;rm"], "pretrain argument 'x;rm' contains shell metacharacters"),
    (["pretrain", "--", "--train.name", "a b"], "pretrain argument 'a b'"),
    (["pretrain", "--", "$HOME"], "pretrain argument '$HOME'"),
    (["pretrain", "--", "--config", "missing.yaml"], "--config 'missing.yaml': no such file"),
    (["pretrain", "--", "--config=missing.json"], "--config 'missing.json': no such file"),
    (["pretrain", "--", "--config", "bad.yaml"], "--config 'bad.yaml' does not parse"),
    (["pretrain", "--", "--config", "list.yaml"], "--config 'list.yaml' must hold a mapping"),
    (["pretrain", "--", "--config"], "--config needs a file"),
    (["nonesuch"], "template 'nonesuch'"),
    (["./missing.sbatch"], "missing.sbatch does not exist"),
    (["bench_kernels", "--chain", "2"], "--chain applies to the pretrain template"),
    (["prepare_data", "--", "c", "--output", "o"], "prepare_data needs --array"),
    (
        ["prepare_data", "--array", "1-4", "--", "c", "--output", "o"],
        "--array '1-4': prepare_data needs a range from 0",
    ),
    (["prepare_data", "--array", "0-3", "--", "c"], "prepare_data needs --output DIR"),
    (["prepare_data", "--gpus-per-node", "1", "--array", "0-3"], "--gpus-per-node does not apply"),
]


@pytest.mark.parametrize(("argv", "message"), REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_values_are_refused_with_one_line_naming_them(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    # No --dry-run: a refusal must happen before anything could be submitted.
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("dv3 slurm: error: ")
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_job_arguments_without_the_double_dash_are_refused_with_a_hint(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["slurm", "submit", "pretrain", "--model.preset", "tiny"])
    assert stop.value.code == 2
    assert "arguments for the job go after '--'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["30", "30:00", "1:00:00", "48:00:00", "2-0", "2-12:30", "2-12:30:15", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(value):
    assert check_time(value) == value


@pytest.mark.parametrize("value", ["0", "0:00:00", "1:60", "1:2:3:4", "1h", "-5", "2-24", "1:00:60"])
def test_non_slurm_times_are_refused(value):
    with pytest.raises(SubmitError):
        check_time(value)


def test_submitting_without_sbatch_on_path_is_refused_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    status, _, err = run_cli(["pretrain", "--nodes", "1"], capsys)
    assert status == 2
    assert "sbatch not found on PATH" in err


# --- the templates' shell -----------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_syntax(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_every_template_explains_itself_and_keeps_its_log_across_requeues(path):
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n# "), "a header comment first"
    assert "Environment" in text, "documents its variables"
    assert "#SBATCH --output=" in text and "#SBATCH --job-name=" in text
    assert os.access(path, os.X_OK)


def test_pretrain_template_asks_for_requeue_signal_and_append():
    text = (SLURM_DIR / "pretrain.sbatch").read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=USR1@", "#SBATCH --open-mode=append"):
        assert directive in text


def common_sh(snippet: str, **env: str) -> str:
    result = subprocess.run(
        ["bash", "-c", f'source "{SLURM_DIR}/common.sh"; {snippet}'],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, check=True,
    )  # fmt: skip
    return result.stdout.strip()


def test_master_port_follows_the_job_id_and_moves_on_after_a_requeue():
    assert common_sh("dv3_master_port", SLURM_JOB_ID="12345") == "22345"
    assert common_sh("dv3_master_port", SLURM_JOB_ID="12345", SLURM_RESTART_COUNT="2") == str(
        10000 + (12345 + 2 * 1009) % 20000
    )
    ports = {int(common_sh("dv3_master_port", SLURM_JOB_ID=str(job))) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= port < 30000 for port in ports)  # below the ephemeral range
    assert common_sh("dv3_master_port", SLURM_JOB_ID="7", DV3_MASTER_PORT="4242") == "4242"


def test_inherited_master_variables_do_not_leak_into_the_rendezvous():
    # A MASTER_ADDR left in the submitting shell must not override the allocation's first host.
    assert common_sh("dv3_master_addr", SLURM_JOB_NODELIST="gpu[7-9]", MASTER_ADDR="stale-host") == "gpu7"
    assert common_sh("dv3_master_addr", SLURM_JOB_NODELIST="gpu[7-9]", DV3_MASTER_ADDR="ib-gpu7") == "ib-gpu7"


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("n1", "n1"), ("n[1-2]", "n1"), ("gpu[007-009,012]", "gpu007"), ("a[3,5]-ib,b1", "a3-ib"), ("x1,y[2-3]", "x1")],
)
def test_first_host_of_a_nodelist(nodelist, first):
    # Where scontrol has no slurm.conf (here, unless a cluster is configured) the list is expanded by hand.
    assert common_sh("dv3_master_addr", SLURM_JOB_NODELIST=nodelist) == first


def test_cpu_device_mode_selects_deepspeeds_cpu_accelerator(tmp_path):
    out = common_sh(
        "dv3_setup_env; echo $DV3_DEVICE $DS_ACCELERATOR $OMP_NUM_THREADS",
        DV3_HOME=str(REPO), DV3_BIN=sys.executable, SLURM_CPUS_PER_TASK="3",
    )  # fmt: skip
    assert out == "cpu cpu 3"


# Rank statuses as slurm/srun_task.sh records them (None: no file, the task never reported) -> verdict.
VERDICTS = [
    ([75, 75], "preempted"),
    ([75, 143], "preempted"),  # srun's --kill-on-bad-exit ended the slower rank while it was exiting
    ([138, 138], "preempted"),  # SIGUSR1 while starting, before the stop handler: nothing to save yet
    ([1, 137], "crashed"),  # one rank SIGKILLed (an OOM kill), the other's gloo error
    ([1, 134], "crashed"),  # NCCL's watchdog aborted a rank
    ([1, None], "crashed"),  # a task (or its node) vanished without a status
    ([139, 139], "crashed"),
    ([2, 2], "bad-input"),
    ([2, 137], "bad-input"),  # a refusal first: retrying would be refused again
    ([1, 1], "stopped"),  # the non-finite stop: every rank exits 1 together
    ([1, 143], "stopped"),
]


@pytest.mark.parametrize(("statuses", "verdict"), VERDICTS, ids=[str(s) for s, _ in VERDICTS])
def test_how_the_ranks_ended_decides_whether_a_crashed_run_is_retried(statuses, verdict, tmp_path):
    for rank, status in enumerate(statuses):
        if status is not None:
            (tmp_path / f"rank-{rank}").write_text(f"{status}\n")
    out = common_sh(f'dv3_task_verdict "{tmp_path}" {len(statuses)}; echo "$DV3_VERDICT|$DV3_RANK_STATUSES"')
    got, described = out.split("|")
    assert got == verdict, described
    assert described.startswith(f"rank 0: {statuses[0]}")


def test_rank_statuses_name_the_signal_that_killed_a_rank(tmp_path):
    (tmp_path / "rank-0").write_text("1\n")
    (tmp_path / "rank-1").write_text("137\n")
    out = common_sh(f'dv3_task_verdict "{tmp_path}" 3; echo "$DV3_RANK_STATUSES"')
    assert out == "rank 0: 1, rank 1: 137 (SIGKILL), rank 2: no status"


def test_failure_restarts_count_per_job_since_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for tag, complete in (("step00000004", True), ("step00000008", True), ("step00000012", False)):
        (run / "checkpoints" / tag).mkdir(parents=True)
        if complete:
            (run / "checkpoints" / tag / "COMPLETE").write_text("\n")
    assert common_sh(f'dv3_newest_checkpoint "{run}"') == "step00000008"
    assert common_sh(f'dv3_newest_checkpoint "{tmp_path / "empty"}"') == "none"
    failures = run / "failures"
    failures.write_text(
        "2026-11-30 17:52:28 job=3 restart=0 srun=137 ranks=x checkpoint=step00000004 action=requeue\n"
        "2026-11-30 17:55:28 job=3 restart=1 srun=137 ranks=x checkpoint=step00000008 action=requeue\n"
        "2026-11-30 17:58:28 job=3 restart=2 srun=137 ranks=x checkpoint=step00000008 action=requeue\n"
        "2026-11-30 18:01:28 job=33 restart=0 srun=137 ranks=x checkpoint=step00000008 action=requeue\n"
        "2026-11-30 18:04:28 job=3 restart=3 srun=137 ranks=x checkpoint=step00000008 action=stop\n"
    )
    assert common_sh(f'dv3_failure_restarts "{failures}" 3 step00000008') == "2"
    assert common_sh(f'dv3_failure_restarts "{failures}" 3 step00000012') == "0", "a new checkpoint: progress"
    assert common_sh(f'dv3_failure_restarts "{failures}" 4 step00000008') == "0", "another job: its own budget"
    assert common_sh(f'dv3_failure_restarts "{tmp_path / "none"}" 3 none') == "0"


# A child that stops like dv3 pretrain does on preemption: flag on USR1, exit 75.
STOP_ON_USR1 = """
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
print("ready", flush=True)
while not got:
    time.sleep(0.02)
sys.exit(75)
"""


def test_task_wrapper_survives_usr1_passes_it_on_and_records_the_status(tmp_path):
    env = {
        **os.environ,
        "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "n[1-2]", "DV3_MASTER_ADDR": "n1", "DV3_STATUS_DIR": str(tmp_path),
    }  # fmt: skip
    wrapper = subprocess.Popen(
        [str(SLURM_DIR / "srun_task.sh"), sys.executable, "-c", STOP_ON_USR1],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wrapper.stdout.readline().strip() == "ready"
    wrapper.send_signal(signal.SIGUSR1)  # to the wrapper only, as when a launcher signals the task's first process
    try:
        status = wrapper.wait(timeout=20)
    finally:
        wrapper.kill()
    assert status == 75
    assert (tmp_path / "rank-1").read_text().strip() == "75"
    log = wrapper.stderr.read()
    assert "task 1/2" in log and "master n1:14321" in log


def test_task_wrapper_refuses_to_run_outside_srun():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([str(SLURM_DIR / "srun_task.sh"), "true"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "runs inside an srun task" in result.stderr


def test_task_wrapper_passes_the_childs_exit_status_through(tmp_path):
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "n1", "DV3_MASTER_ADDR": "n1", "DV3_STATUS_DIR": str(tmp_path)}  # fmt: skip
    started = time.monotonic()
    result = subprocess.run([str(SLURM_DIR / "srun_task.sh"), "bash", "-c", "exit 3"], env=env, capture_output=True)
    assert result.returncode == 3
    assert (tmp_path / "rank-0").read_text().strip() == "3"
    assert time.monotonic() - started < 10
