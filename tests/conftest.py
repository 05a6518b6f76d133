"""Test-wide settings (before triton or deepspeed is imported) and shared fixtures."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Without an NVIDIA GPU, Triton kernels run in its interpreter and DeepSpeed uses its CPU
# accelerator (gloo). Both must be chosen before those packages are first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.train.distributed import prefer_environment_tools  # noqa: E402 (after the settings above)
from tests.support import REPO  # noqa: E402
from tests.support.data import build_corpus, build_prepared, build_tokenizer  # noqa: E402
from tests.support.runs import UNINTERRUPTED_STEPS, run_pretrain  # noqa: E402
from tests.support.slurm import LOCAL_SLURM, daemon_pids, process_alive  # noqa: E402

prefer_environment_tools()  # this environment's ninja for DeepSpeed's op builds, in subprocesses too


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: English Wikipedia articles and fortunes in several languages."""
    return build_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A small sentencepiece model trained on that corpus."""
    return build_tokenizer(tmp_path_factory)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """That corpus prepared into shards (64-token rows) with the small tokenizer."""
    return build_prepared(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Shards of the embedded English corpus (gensim's Wikipedia articles), 128 tokens, a small
    vocabulary, 5% held out: prepared once per test session with the real `dv3 data prepare`."""
    output = tmp_path_factory.mktemp("data") / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "data", "prepare", "--output", str(output), "--vocab-size", "1000",
         "--seq-len", "128", "--validation-fraction", "0.05", "--input-sentence-size", "20000", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def uninterrupted(tiny_dataset, tmp_path_factory) -> Path:
    """A reference run: 2 ranks, ZeRO-3, dropout on, UNINTERRUPTED_STEPS steps, a checkpoint every
    half. Tests that change a run copy it first."""
    output = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_pretrain(output, tiny_dataset, 2, "--train.steps", str(UNINTERRUPTED_STEPS), "--checkpoint.interval",
                 str(UNINTERRUPTED_STEPS // 2))
    return output


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """The environment for talking to the local two-node SLURM cluster (SLURM_CONF set).

    Started once per session (root only, as in CI) and stopped afterwards, leaving nothing
    running; a cluster that was already up is used and left up.
    """
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd, munged)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no SLURM and no apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DV3_SLURM_DIR": os.environ.get("DV3_SLURM_DIR", "/tmp/dv3-slurm")}
    was_up = subprocess.run([str(LOCAL_SLURM), "status"], env=env, capture_output=True).returncode == 0
    started = subprocess.run([str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    match = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)
    assert match, started.stdout
    env["SLURM_CONF"] = match.group(1)
    env["DV3_RUNS_ROOT"] = str(state / "runs")
    yield env
    if not was_up:
        pids = daemon_pids(Path(env["DV3_SLURM_DIR"]))
        stopped = subprocess.run([str(LOCAL_SLURM), "stop"], env=env, capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        alive = [pid for pid in pids if process_alive(pid)]
        assert not alive, f"daemons still running after stop: {alive}"
