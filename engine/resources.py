"""Where the files dv3 ships beside its code live: ``ds_configs/``, ``configs/`` and ``slurm/``.

In a checkout (and an editable install) they are the top-level folders of the repository. A
wheel carries copies of them inside the ``engine`` package, under ``engine/bundled/`` (setup.py
puts them there when it builds), so ``pip install .`` into a shared environment or a container
gives a ``dv3`` that finds them too.
"""

from __future__ import annotations

from pathlib import Path

RESOURCE_FOLDERS = ("ds_configs", "configs", "slurm")

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
_BUNDLED = _PACKAGE / "bundled"
# The folder that holds the ``engine`` package (the checkout, or site-packages): child processes
# started with ``python -m engine.cli`` get it on PYTHONPATH.
IMPORT_ROOT = _CHECKOUT


def resource_root() -> Path:
    """The folder holding ``ds_configs/``, ``configs/`` and ``slurm/`` (the checkout, else the wheel's copy)."""
    if all((_CHECKOUT / name).is_dir() for name in RESOURCE_FOLDERS):
        return _CHECKOUT
    if all((_BUNDLED / name).is_dir() for name in RESOURCE_FOLDERS):
        return _BUNDLED
    raise FileNotFoundError(
        f"dv3's {', '.join(RESOURCE_FOLDERS)} folders are neither in the checkout ({_CHECKOUT}) nor bundled "
        f"in the installed package ({_BUNDLED}); reinstall dv3 (pip install .)")


def resolve_resource_path(path: str | Path) -> Path:
    """A user's path as given when it exists (or is absolute), else relative to dv3's resources.

    So ``ds_configs/cpu.json`` and ``configs/tiny_cpu.yaml`` work from any working directory,
    and a user's own file of the same name in the working directory wins.
    """
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    shipped = resource_root() / candidate
    return shipped if shipped.exists() else candidate
