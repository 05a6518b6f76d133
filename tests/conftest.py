"""Test-wide settings (before triton or deepspeed is imported) and shared fixtures."""

import os
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

from engine.distributed import prefer_environment_tools  # noqa: E402 (after the settings above)

prefer_environment_tools()  # this environment's ninja for DeepSpeed's op builds, in subprocesses too

REPO = Path(__file__).resolve().parent.parent


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
