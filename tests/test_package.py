"""The installed package: the dv3 command, and a clear failure when `kernels` is someone else's."""

import os
import subprocess
import sys

import engine


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def test_dv3_version_and_help():
    version = run([sys.executable, "-m", "engine.cli", "--version"])
    assert version.returncode == 0 and version.stdout.strip() == f"dv3 {engine.__version__}"
    help_text = run([sys.executable, "-m", "engine.cli", "--help"])
    assert help_text.returncode == 0 and "DeBERTa-v3" in help_text.stdout


def test_foreign_kernels_package_is_refused_with_the_fix(tmp_path):
    # Hugging Face's `kernels` package has our package's name; importing dv3 beside it must say so.
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("__version__ = '0.4.0'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run([sys.executable, "-c", "import engine"], env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "not dv3's kernels" in result.stderr
    assert "venv" in result.stderr


def test_deepspeed_launcher_rank_argument_is_accepted():
    # `deepspeed --num_gpus N $(which dv3) pretrain ...` runs `dv3 --local_rank=I pretrain ...`.
    from engine.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "pretrain", "--train.steps", "5"])
    assert args.command == "pretrain" and args.local_rank == 1
