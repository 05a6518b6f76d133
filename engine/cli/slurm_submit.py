"""``dv3 slurm submit``: a validated ``sbatch`` of one of the templates in ``slurm/``.

    dv3 slurm submit pretrain --nodes 4 --gpus-per-node 8 --time 12:00:00 -- --config base.yaml
    dv3 slurm submit pretrain --nodes 2 --gpus-per-node 0 --cpus-per-task 1 --dry-run -- --model.preset tiny
    dv3 slurm submit pretrain --chain 5 --time 4:00:00 -- --config base.yaml   # 5 linked jobs, one run
    dv3 slurm submit prepare_data --array 0-15 -- corpus/*.txt --output shards/  # + a merge/verify job
    dv3 slurm submit bench_kernels --partition gpu

Everything is checked before anything is submitted: numbers are whole numbers, times are in
SLURM's formats, names and paths carry no shell metacharacters (neither do the arguments for
the job, after ``--``), the template exists, a ``--config`` file exists and parses. A refusal
is one line naming the value, a non-zero exit, and no job. The exact ``sbatch`` command is
printed before it runs; ``--dry-run`` prints it (a runnable shell snippet when jobs depend on
each other) and stops there.

The job's settings reach the template through ``--export=ALL,DV3_...``, so the printed command
is the whole story. A pretrain job's run folder is named at submission (``runs/<job
name>-<date>-<time>``) and is part of that command: running it again continues the same run.
``--continue RUN_DIR`` does the same from the folder alone, with the SLURM options and pretrain
arguments recorded in ``RUN_DIR/slurm/submit.json`` when the run was submitted:

    dv3 slurm submit pretrain --continue runs/dv3-pretrain-20261125-190951
    dv3 slurm submit pretrain --continue runs/dv3-pretrain-20261125-190951 --time 2:00:00 -- --train.steps 400
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.errors import InputError
from engine.resources import resolve_resource_path, resource_root

# Templates with a name; any other sbatch script can be given by path.
NAMED_TEMPLATES = ("pretrain", "prepare_data", "bench_kernels")

# Characters a shell treats specially, plus whitespace: none may reach a template. The
# templates quote everything, so this is a second wall, and it keeps the printed command
# readable and the --export list (comma separated) unambiguous.
_SHELL_METACHARACTERS = set(";&|$`<>(){}[]*?!~#'\"\\ \t\n\r")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_DEPENDENCY_KINDS = ("after", "afterany", "afterok", "afternotok", "aftercorr", "afterburstbuffer")
_JOB_ID = r"[0-9]+(_[0-9]+)?(\+[0-9]+)?"
_DEPENDENCY_TERM = re.compile(rf"(singleton|({'|'.join(_DEPENDENCY_KINDS)})(:{_JOB_ID})+)")
_ARRAY_RANGE = r"[0-9]+(-[0-9]+(:[0-9]+)?)?"
_ARRAY = re.compile(rf"{_ARRAY_RANGE}(,{_ARRAY_RANGE})*(%[0-9]+)?")


class SubmitError(InputError):
    """A value that cannot be submitted; the message names it."""


@dataclass
class Job:
    """One ``sbatch`` call. ``after`` names an earlier job of the same plan this one waits for."""

    template: Path
    options: list[str]
    env: dict[str, str]
    script_args: list[str]
    after: tuple[str, int] | None = None  # (dependency kind, index of the earlier job)
    logs: dict[str, str] = field(default_factory=dict)  # what -> path pattern, for the user

    def command(self, job_ids: list[str] | None = None) -> list[str]:
        """The sbatch argv; the dependency on an earlier job uses its id from ``job_ids``."""
        cmd = ["sbatch", "--parsable", *self.options]
        if self.after is not None:
            kind, index = self.after
            cmd.append(f"--dependency={kind}:{job_ids[index] if job_ids else _placeholder(index)}")
        export = ",".join(["ALL", *(f"{key}={value}" for key, value in self.env.items())])
        cmd += [f"--export={export}", str(self.template), *self.script_args]
        return cmd


def _placeholder(index: int) -> str:
    return f"$JOB{index + 1}"


def render_dry_run(jobs: list[Job]) -> str:
    """The plan as a shell snippet: a single job is one command; linked jobs capture ids."""
    if len(jobs) == 1:
        return shlex.join(jobs[0].command())
    lines = []
    for index, job in enumerate(jobs):
        words = []
        for word in job.command():
            if job.after is not None and word.startswith("--dependency="):
                # Leave $JOBn unquoted so the shell substitutes the earlier job's id.
                words.append(shlex.quote(word[: -len(_placeholder(job.after[1]))]) + _placeholder(job.after[1]))
            else:
                words.append(shlex.quote(word))
        lines.append(f"JOB{index + 1}=$({' '.join(words)})")
    return "\n".join(lines)


# --- validation: each returns the clean value or raises SubmitError naming the value ---------


def check_word(what: str, value: str) -> str:
    bad = sorted({c for c in value if c in _SHELL_METACHARACTERS or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise SubmitError(f"{what} {value!r} contains shell metacharacters or spaces ({shown}); refusing to submit")
    return value


def check_whole(what: str, value: str, minimum: int, maximum: int = 1_000_000) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise SubmitError(f"{what} must be a whole number, got {value!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise SubmitError(f"{what} must be between {minimum} and {maximum}, got {number}")
    return number


def check_time(value: str) -> str:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED/INFINITE."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return value
    match = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", value)
    if not match:
        raise SubmitError(
            f"--time {value!r} is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        if hours > 23:
            raise SubmitError(f"--time {value!r}: hours after the day must be below 24")
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
        sub_hour = [minutes, seconds]
    elif third is not None:  # H:M:S
        total = int(first) * 3600 + int(second) * 60 + int(third)
        sub_hour = [int(second), int(third)]
    else:  # M or M:S
        total = int(first) * 60 + int(second or 0)
        sub_hour = [int(second or 0)]
    if any(part > 59 for part in sub_hour):
        raise SubmitError(f"--time {value!r}: minutes and seconds must be below 60")
    if total == 0:
        raise SubmitError(f"--time {value!r} is zero")
    return value


def check_name(what: str, value: str, allow_list: bool = False) -> str:
    parts = value.split(",") if allow_list else [value]
    if not all(_NAME.fullmatch(part) for part in parts) or len(value) > 200:
        kind = "comma-separated names" if allow_list else "a name"
        raise SubmitError(f"{what} {value!r} is not {kind} (letters, digits, '_', '.', '+', '-')")
    return value


def check_dependency(value: str) -> str:
    terms = re.split(r"[,?]", value)
    if not all(_DEPENDENCY_TERM.fullmatch(term) for term in terms):
        raise SubmitError(
            f"--dependency {value!r} is not a SLURM dependency (e.g. afterok:123, afterany:123:124, singleton)"
        )
    return value


def check_array(value: str) -> str:
    if not _ARRAY.fullmatch(value):
        raise SubmitError(f"--array {value!r} is not a SLURM array (e.g. 0-15, 1,3,5, 0-31%4)")
    return value


def check_path(what: str, value: str) -> Path:
    check_word(what, value)
    if "," in value or "%" in value:
        # sbatch splits --export at commas and expands % in file names.
        raise SubmitError(f"{what} {value!r} contains ',' or '%', which sbatch would misread")
    return Path(value).expanduser().resolve()


def check_config(value: str) -> Path:
    check_path("--config", value)
    path = resolve_resource_path(value).resolve()  # where dv3 pretrain will find it, made absolute
    if not path.is_file():
        raise SubmitError(f"--config {value!r}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise SubmitError(f"--config {value!r} does not parse: {_parse_error(error)}") from error
    if not isinstance(data, dict):
        raise SubmitError(f"--config {value!r} must hold a mapping of sections, got {type(data).__name__}")
    return path


def _parse_error(error: Exception) -> str:
    """One line: YAML's own message spans several, with the position on its own line."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark is not None:
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def check_job_args(template: str, args: list[str]) -> list[str]:
    """The arguments after ``--``: no metacharacters; a --config file exists, parses, is made absolute."""
    out = []
    index = 0
    while index < len(args):
        arg = args[index]
        check_word(f"{template} argument", arg)
        if arg == "--config":
            if index + 1 >= len(args):
                raise SubmitError("--config needs a file after it")
            out += [arg, str(check_config(args[index + 1]))]
            index += 2
            continue
        if arg.startswith("--config="):
            out.append(f"--config={check_config(arg.split('=', 1)[1])}")
        else:
            out.append(arg)
        index += 1
    return out


def resolve_template(value: str) -> Path:
    check_word("template", value)
    if value in NAMED_TEMPLATES:
        path = resource_root() / "slurm" / f"{value}.sbatch"
    elif "/" in value or value.endswith(".sbatch"):
        path = Path(value).expanduser().resolve()
    else:
        raise SubmitError(f"template {value!r}: use one of {', '.join(NAMED_TEMPLATES)} or a path to an sbatch script")
    if not path.is_file():
        raise SubmitError(f"template {value!r}: {path} does not exist")
    return path


def template_job_name(template: Path) -> str:
    """The template's own ``#SBATCH --job-name``, which names its default run folder."""
    for line in template.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#SBATCH\s+(?:--job-name[= ]|-J\s*)(\S+)", line)
        if match:
            return match.group(1)
    return f"dv3-{template.stem}"


# --- the plan -----------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace, cwd: Path | None = None, reserve: bool = False) -> list[Job]:
    """Check every value and turn them into the sbatch calls to make, in order. ``reserve``
    creates the new run's folder (a pretrain run without ``--run-dir``), so that no other
    submission picks the same name; a dry run creates nothing."""
    cwd = (cwd or Path.cwd()).resolve()
    template = resolve_template(args.template)
    kind = template.stem if template.parent == resource_root() / "slurm" else "custom"
    rerun_finished = None
    if getattr(args, "continue_dir", None):
        rerun_finished = apply_continue(args, kind)
    job_args = check_job_args(template.stem, list(args.job_args))

    runs_root = check_path(
        "runs folder (DV3_RUNS_ROOT or ./runs)", os.environ.get("DV3_RUNS_ROOT") or str(cwd / "runs")
    )
    dv3_home = check_path("dv3 home (the checkout, or the installed package's bundled files)", str(resource_root()))
    job_name = check_name("--job-name", args.job_name) if args.job_name else template_job_name(template)
    if "%" in job_name:
        raise SubmitError(f"--job-name {job_name!r}: '%' would be expanded in log names")

    options: list[str] = []
    if args.nodes is not None:
        options.append(f"--nodes={check_whole('--nodes', args.nodes, 1)}")
    gpus = None
    if args.gpus_per_node is not None:
        if kind == "prepare_data":
            raise SubmitError("--gpus-per-node does not apply to prepare_data (tokenizing runs on CPUs)")
        gpus = check_whole("--gpus-per-node", args.gpus_per_node, 0, 64)
        # --gpus-per-node=0 overrides the template's GPU request: the CPU-only mode.
        options.append(f"--gpus-per-node={gpus}")
    if args.ntasks_per_node is not None:
        options.append(f"--ntasks-per-node={check_whole('--ntasks-per-node', args.ntasks_per_node, 1, 1024)}")
    elif gpus is not None and kind == "pretrain":
        options.append(f"--ntasks-per-node={max(gpus, 1)}")  # one task per GPU
    if args.cpus_per_task is not None:
        options.append(f"--cpus-per-task={check_whole('--cpus-per-task', args.cpus_per_task, 1, 4096)}")
    if args.time is not None:
        options.append(f"--time={check_time(args.time)}")
    if args.partition is not None:
        options.append(f"--partition={check_name('--partition', args.partition, allow_list=True)}")
    if args.account is not None:
        options.append(f"--account={check_name('--account', args.account)}")
    if args.qos is not None:
        options.append(f"--qos={check_name('--qos', args.qos)}")
    if args.dependency is not None:
        options.append(f"--dependency={check_dependency(args.dependency)}")
    options.append(f"--job-name={job_name}")

    env = {"DV3_HOME": str(dv3_home), "DV3_RUNS_ROOT": str(runs_root)}
    run_dir = check_path("--run-dir", args.run_dir) if args.run_dir else None
    chain = check_whole("--chain", args.chain, 1, 1000) if args.chain is not None else None
    array = check_array(args.array) if args.array is not None else None
    slurm_logs = runs_root / "slurm-logs"

    if kind == "pretrain":
        if rerun_finished:
            env["DV3_RERUN_FINISHED"] = "1"
        return _plan_pretrain(template, options, env, job_args, job_name, runs_root, slurm_logs, run_dir, chain, array,
                              reserve)
    if chain is not None:
        raise SubmitError(f"--chain applies to the pretrain template, not {template.stem}")
    if kind == "prepare_data":
        return _plan_prepare_data(template, options, env, job_args, job_name, slurm_logs, run_dir, array)
    if run_dir is not None:
        env["DV3_RUN_DIR"] = str(run_dir)
    if array is not None:
        options.append(f"--array={array}")
    pattern = "%x-%A_%a.out" if array else "%x-%j.out"
    options.append(f"--output={slurm_logs / pattern}")
    shown = f"{job_name}-{{id}}_<task>.out" if array else f"{job_name}-{{id}}.out"
    job = Job(template, options, env, job_args, logs={"batch log": str(slurm_logs / shown)})
    if kind == "bench_kernels":
        job.logs["results"] = str(runs_root / "bench" / f"{job_name}-{{id}}.json")
    return [job]


def _plan_pretrain(template, options, env, job_args, job_name, runs_root, slurm_logs, run_dir, chain, array, reserve):
    if chain is not None and array is not None:
        raise SubmitError("--chain and --array both make a chained run; use one of them")
    if array is not None:
        # An array of pretrain jobs is a chain: each task continues the same run, one at a time.
        if not array.endswith("%1"):
            raise SubmitError(f"--array {array!r}: a pretrain array is a chain and needs the %1 throttle, e.g. 1-4%1")
        options.append(f"--array={array}")
        env["DV3_REQUEUE"] = "0"  # each link runs once; the next one continues the run
    if chain is not None and chain > 1:
        # Linked jobs: link k+1 starts when link k ends, however it ended, and resumes the same
        # run folder. Each link runs once (no self-requeue), so N links bound the cost.
        env["DV3_REQUEUE"] = "0"
    # The run folder is named here, not after the job id, so that the printed sbatch command
    # (which carries it) continues this very run when it is run again.
    run_dir = run_dir or new_run_dir(runs_root, f"{job_name}-chain" if chain and chain > 1 else job_name, reserve)
    env["DV3_RUN_DIR"] = str(run_dir)
    pattern = "%x-%A_%a.out" if array else "%x-%j.out"
    shown_run_dir = str(run_dir)
    logs = {
        "run dir": shown_run_dir,
        "batch log": str(slurm_logs / (f"{job_name}-{{id}}_<task>.out" if array else f"{job_name}-{{id}}.out")),
        "task logs": f"{shown_run_dir}/logs/job-<id of the job or array task>.node<i>.<host>.log",
    }
    job_options = [*options, f"--output={slurm_logs / pattern}"]
    jobs = [Job(template, job_options, env, job_args, logs=logs)]
    # A user's --dependency holds back the first link; the others wait for their predecessor.
    link_options = [o for o in job_options if not o.startswith("--dependency=")]
    for index in range(1, chain or 1):
        jobs.append(Job(template, link_options, env, job_args, after=("afterany", index - 1), logs=logs))
    return jobs


def new_run_dir(runs_root: Path, job_name: str, reserve: bool) -> Path:
    """``<runs root>/<job name>-<date>-<time>``, with ``-2``, ``-3``... when taken; made when ``reserve``."""
    base = f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for index in range(1, 1000):
        path = runs_root / (base if index == 1 else f"{base}-{index}")
        if not reserve:
            if not path.exists():
                return path
            continue
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise SubmitError(f"cannot create the run folder {path}: {error.strerror or error}") from error
    raise SubmitError(f"{runs_root}: no free run folder name for {base}")


SUBMIT_RECORD = Path("slurm") / "submit.json"
# What ``--continue`` takes from the record when not given again (the chain options are not kept).
RECORDED_OPTIONS = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "time", "partition", "account",
                    "qos", "job_name")


def submit_record(args: argparse.Namespace, job: Job, job_ids: list[str]) -> dict:
    """What ``<run dir>/slurm/submit.json`` keeps of a pretrain submission, for ``--continue``."""
    return {"template": "pretrain", "options": {name: getattr(args, name) for name in RECORDED_OPTIONS},
            "job_args": job.script_args, "job_ids": job_ids, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}


def apply_continue(args: argparse.Namespace, kind: str) -> bool:
    """Fill ``args`` from the run's submit record: its SLURM options unless given again, its
    pretrain arguments followed by any given after ``--``, and its folder. Returns whether a
    finished run is to be trained further (DV3_RERUN_FINISHED=1)."""
    value = args.continue_dir
    if kind != "pretrain":
        raise SubmitError(f"--continue applies to the pretrain template, not {args.template}")
    if args.run_dir:
        raise SubmitError("--continue names the run folder already; leave out --run-dir")
    run_dir = check_path("--continue", value)
    record_path = run_dir / SUBMIT_RECORD
    if not run_dir.is_dir():
        raise SubmitError(f"--continue {value!r}: {run_dir} is not a folder")
    if not record_path.is_file():
        raise SubmitError(
            f"--continue {value!r}: {record_path} not found (the run was not submitted by dv3 slurm submit); "
            f"submit with --run-dir {run_dir}, its SLURM options and, after --, its pretrain arguments "
            f"(its settings: {run_dir / 'run_config.json'})")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        options, job_args = record["options"], record["job_args"]
        if not (isinstance(options, dict) and isinstance(job_args, list)
                and all(isinstance(v, (str, type(None))) for v in options.values())
                and all(isinstance(a, str) for a in job_args)):
            raise ValueError("options must map names to strings, job_args must be a list of strings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SubmitError(f"--continue {value!r}: {record_path} is not a dv3 submit record: {error}") from error
    for name in RECORDED_OPTIONS:
        if getattr(args, name) is None and options.get(name) is not None:
            setattr(args, name, options[name])
    args.job_args = [*job_args, *args.job_args]
    args.run_dir = str(run_dir)
    finished = run_dir / "slurm" / "FINISHED"
    rerun = os.environ.get("DV3_RERUN_FINISHED") == "1"
    if finished.exists() and not rerun:
        raise SubmitError(
            f"--continue {value!r}: the run already finished ({finished.read_text().strip()}); to train it "
            "further, set DV3_RERUN_FINISHED=1 and give the new step count after --, e.g. -- --train.steps N")
    return rerun and finished.exists()


def _plan_prepare_data(template, options, env, job_args, job_name, slurm_logs, run_dir, array):
    """Train the tokenizer (unless --tokenizer names one), tokenize the parts as an array, merge and verify."""
    if array is None:
        raise SubmitError("prepare_data needs --array 0-B: array task I tokenizes part I, e.g. --array 0-15")
    match = re.fullmatch(r"0-([0-9]+)(%[0-9]+)?", array)
    if not match:
        raise SubmitError(f"--array {array!r}: prepare_data needs a range from 0, 0-B (optionally %K), e.g. 0-15")
    if run_dir is not None:
        raise SubmitError("--run-dir does not apply to prepare_data; the shards go to the --output given after --")
    if not any(arg in ("--output", "-o") or arg.startswith("--output=") for arg in job_args):
        raise SubmitError("prepare_data needs --output DIR among the arguments after --")
    parts = int(match.group(1)) + 1
    # The tokenizer step and the merge step are single jobs; a user's --dependency holds back the first.
    single_options = [o for o in options if not o.startswith(("--job-name=", "--dependency="))]
    user_dependency = [o for o in options if o.startswith("--dependency=")]
    jobs: list[Job] = []
    if not any(arg == "--tokenizer" or arg.startswith("--tokenizer=") for arg in job_args):
        jobs.append(
            Job(
                template,
                [
                    *single_options,
                    *user_dependency,
                    f"--job-name={job_name}-tokenizer",
                    f"--output={slurm_logs / '%x-%j.out'}",
                ],
                {**env, "DV3_DATA_STEP": "tokenizer"},
                job_args,
                logs={"tokenizer log": str(slurm_logs / f"{job_name}-tokenizer-{{id}}.out")},
            )
        )
    array_options = single_options if jobs else [*single_options, *user_dependency]
    jobs.append(
        Job(
            template,
            [*array_options, f"--job-name={job_name}", f"--array={array}", f"--output={slurm_logs / '%x-%A_%a.out'}"],
            {**env, "DV3_DATA_STEP": "part", "DV3_DATA_PARTS": str(parts)},
            job_args,
            after=("afterok", len(jobs) - 1) if jobs else None,
            logs={"part logs": str(slurm_logs / f"{job_name}-{{id}}_<part>.out")},
        )
    )
    jobs.append(
        Job(
            template,
            [*single_options, f"--job-name={job_name}-merge", f"--output={slurm_logs / '%x-%j.out'}"],
            {**env, "DV3_DATA_STEP": "merge"},
            job_args,
            after=("afterok", len(jobs) - 1),
            logs={"merge and verify log": str(slurm_logs / f"{job_name}-merge-{{id}}.out")},
        )
    )
    return jobs


# --- submission ---------------------------------------------------------------------------------


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch not found on PATH: run this on a SLURM login node, or start the local test cluster "
            "with scripts/local_slurm.sh start and export the SLURM_CONF it prints"
        )


def submit(jobs: list[Job]) -> list[str]:
    """Run sbatch for each job in order; returns the job ids. Prints each exact command first."""
    require_sbatch()
    ids: list[str] = []
    for job in jobs:
        for option in job.options:
            if option.startswith("--output="):
                # sbatch accepts a log path in a missing folder, and the job then dies unseen.
                Path(option.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        cmd = job.command(ids)
        print(shlex.join(cmd), flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip() or result.stdout.strip() or "no message").splitlines()[-1]
            already = f"; already submitted: {', '.join(ids)} (scancel them if unwanted)" if ids else ""
            error = SubmitError(f"sbatch failed (status {result.returncode}): {reason}{already}")
            error.submitted = ids
            raise error
        job_id = result.stdout.strip().split(";")[0]
        if not re.fullmatch(r"[0-9]+", job_id):
            raise SubmitError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
        ids.append(job_id)
        print(f"submitted job {job_id}" + (f" (starts after job {ids[job.after[1]]})" if job.after else ""))
        for what, pattern in job.logs.items():
            print(f"  {what}: {pattern.format(id=job_id)}")
    if ids:
        print(f"watch: squeue -j {','.join(ids)}   cancel: scancel {' '.join(ids)}", flush=True)
    return ids


# --- command line -------------------------------------------------------------------------------


class _SplitAtDoubleDash(argparse.ArgumentParser):
    """Everything after the first ``--`` goes to the job untouched (as ``job_args``).

    Plain argparse cannot take options both before and after a positional followed by
    ``-- ARGS``: it binds the positional list too early."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, tail = args[:cut], args[cut + 1 :]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)} (arguments for the job go after '--')")
        namespace.job_args = tail
        return namespace, extras


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dv3 slurm submit``."""
    help_text = __doc__.replace("``", "")
    slurm = subparsers.add_parser("slurm", help="submit dv3 jobs to SLURM", description=help_text.split("\n\n")[0])
    slurm.set_defaults(func=lambda _args: (slurm.print_help(), 2)[1])
    commands = slurm.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", parser_class=_SplitAtDoubleDash)
    p = commands.add_parser(
        "submit",
        help="validate and sbatch a template",
        usage="dv3 slurm submit TEMPLATE [options] [-- JOB ARGS ...]",
        description=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("template", help=f"{', '.join(NAMED_TEMPLATES)}, or the path of an sbatch script")
    p.add_argument("--nodes", metavar="N", help="number of nodes")
    p.add_argument(
        "--gpus-per-node",
        metavar="G",
        help="GPUs per node, one task each (pretrain); 0 runs on CPUs (DS_ACCELERATOR=cpu)",
    )
    p.add_argument("--ntasks-per-node", metavar="T", help="tasks per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", metavar="C", help="CPUs per task")
    p.add_argument("--time", metavar="T", help="time limit: minutes, HH:MM:SS, D-HH:MM:SS, ...")
    p.add_argument("--partition", metavar="P")
    p.add_argument("--account", metavar="A")
    p.add_argument("--qos", metavar="Q")
    p.add_argument("--job-name", metavar="NAME", help="job name (default: the template's); names the run folder")
    p.add_argument("--dependency", metavar="SPEC", help="SLURM dependency, e.g. afterok:123")
    p.add_argument("--array", metavar="SPEC", help="job array: prepare_data parts (0-15), or a pretrain chain (1-5%%1)")
    p.add_argument("--chain", metavar="N", help="pretrain: N jobs, each starting when the previous ends, one run")
    p.add_argument("--run-dir", metavar="DIR", help="the run folder (pretrain default: runs/<job name>-<date>-<time>)")
    p.add_argument("--continue", dest="continue_dir", metavar="RUN_DIR",
                   help="pretrain: continue this run folder with the SLURM options and pretrain arguments it was "
                   "submitted with (options given here replace them; arguments after -- are added)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command(s) and submit nothing")
    p.set_defaults(func=run_submit, job_args=[])


def run_submit(args: argparse.Namespace) -> int:
    jobs = build_plan(args)
    if args.dry_run:
        print(render_dry_run(jobs))
        return 0
    require_sbatch()
    is_pretrain = jobs[0].template == resource_root() / "slurm" / "pretrain.sbatch"
    if is_pretrain and not args.run_dir and not args.continue_dir:
        jobs = build_plan(args, reserve=True)  # the same plan, with the new run's folder made
    run_dir = Path(jobs[0].env["DV3_RUN_DIR"]) if "DV3_RUN_DIR" in jobs[0].env else None
    try:
        ids = submit(jobs)
    except SubmitError as error:
        reserved = is_pretrain and run_dir is not None and not args.run_dir and not args.continue_dir
        if reserved and not getattr(error, "submitted", None):
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # the folder reserved for a run that was not submitted
        raise
    if is_pretrain and run_dir is not None:
        record = run_dir / SUBMIT_RECORD
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(submit_record(args, jobs[0], ids), indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            print(f"warning: could not write {record} ({error.strerror or error}); --continue will not find it",
                  file=sys.stderr)
        print(f"continue this run later: dv3 slurm submit pretrain --continue {shlex.quote(str(run_dir))}")
    return 0
