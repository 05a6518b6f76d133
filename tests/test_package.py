"""The installed package: the dv3 command, and a clear failure when `kernels` is someone else's."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import engine
from tests.support import REPO


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


@pytest.mark.slow
def test_wheel_install_finds_its_configs_and_slurm_templates(tmp_path):
    """`pip install .` (not editable) into a fresh environment gives a `dv3` that finds ds_configs/,
    configs/ and slurm/ without a checkout: a command that reads a DeepSpeed config and one that
    reads a SLURM template, run from a folder that is not the checkout."""
    source = tmp_path / "source"  # the working tree as it is, without build outputs
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("dv3-*.whl")

    # A fresh environment whose dependencies come from this one's site-packages (a path entry:
    # its .pth files, among them the editable install's finder, are not read).
    env_dir = tmp_path / "env"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)]).returncode == 0
    python = env_dir / "bin" / "python"
    site_packages = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site_packages) / "dv3_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    dv3 = str(env_dir / "bin" / "dv3")
    where = run([str(python), "-c", "import engine; print(engine.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.startswith(site_packages), where.stdout + where.stderr

    report = elsewhere / "bench.json"  # reads ds_configs/cpu.json
    bench = subprocess.run([dv3, "bench", "train", "--preset", "tiny", "--seq-len", "16", "--micro-batch", "1",
                            "--steps", "1", "--repeats", "1", "--warmup", "0", "--skip-hf", "--output", str(report)],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads(report.read_text())["results"]["tiny"]["dv3"]["tokens_per_s"] > 0

    submit = run([dv3, "slurm", "submit", "pretrain", "--dry-run", "--", "--config", "configs/tiny_cpu.yaml"],
                 cwd=elsewhere, env=env)
    assert submit.returncode == 0, submit.stderr
    bundled = Path(site_packages) / "engine" / "bundled"
    assert f"DV3_HOME={bundled}" in submit.stdout
    assert str(bundled / "slurm" / "pretrain.sbatch") in submit.stdout
    assert str(bundled / "configs" / "tiny_cpu.yaml") in submit.stdout
