"""Checkpoints you can trust: written by every rank, marked complete only when all finished.

Layout of a run's ``checkpoints/`` folder::

    step00000500/                 one DeepSpeed checkpoint tag (model, optimizer, ZeRO shards)
        zero_pp_rank_*_*.pt       DeepSpeed's files
        dv3_state.json            step, data loader position, run config, world size, counters
        COMPLETE                  written by rank 0 after a barrier: the only proof of a good save

DeepSpeed writes its ``latest`` file without a barrier first, so it is never trusted here:
``--resume auto`` takes the newest folder that has ``COMPLETE``. Old checkpoints are pruned
to the newest ``keep``. An explicit ``--resume`` from an older step moves the later ones into
``abandoned-<time>-after-<tag>/``: out of reach of ``auto`` and of pruning, never deleted.

DeepSpeed's own loader calls ``torch.load(weights_only=False)``; dv3 loads every checkpoint
through :func:`weights_only_loading`, which forces the restricted unpickler and allows only
the few DeepSpeed types its files contain.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "dv3_state.json"
UNIVERSAL_SUFFIX = "_universal"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (universal conversions excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and
             not p.name.endswith(UNIVERSAL_SUFFIX) and is_complete(p)]
    return sorted(found, key=lambda p: read_state(p)["step"])


def latest_complete(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    state_path = Path(path) / STATE_FILE
    try:
        return json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{state_path}: unreadable checkpoint state ({error})") from error


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    with open(temporary) as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(engine, output_dir: str | Path, step: int, state: dict, keep: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    from engine.distributed import barrier

    root = checkpoint_root(output_dir)
    tag = tag_for_step(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an earlier, unmarked attempt at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if rank == 0:
        _write_atomic(path / STATE_FILE, json.dumps({**state, "step": step, "saved_at": time.time()}, indent=2))
    barrier()  # every rank's shards are on disk
    if rank == 0:
        _write_atomic(path / COMPLETE_MARKER, f"{step}\n")
        prune(root, keep)
    barrier()
    return path


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale incomplete ones."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if complete:
        newest_step = read_state(complete[-1])["step"]
        for candidate in root.iterdir():
            if (candidate.is_dir() and candidate.name.startswith("step") and not is_complete(candidate)
                    and not candidate.name.endswith(UNIVERSAL_SUFFIX)
                    and candidate.name < tag_for_step(newest_step)):
                shutil.rmtree(candidate, ignore_errors=True)


def set_aside_newer(root: Path, step: int) -> Path | None:
    """Move checkpoints of later steps than ``step`` into ``root/abandoned-<time>/``.

    After an explicit resume from an older checkpoint they belong to a continuation the user
    chose to abandon: left in place, ``--resume auto`` would jump back onto it and pruning would
    count them and delete the new continuation's checkpoints. Moved, nothing is lost.
    """
    if not root.is_dir():
        return None
    newer = []
    for candidate in root.iterdir():
        if candidate.is_dir() and candidate.name.startswith("step") and not candidate.name.endswith(UNIVERSAL_SUFFIX):
            digits = candidate.name[len("step"):]
            if digits.isdigit() and int(digits) > step:
                newer.append(candidate)
    if not newer:
        return None
    destination = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-after-{tag_for_step(step)}"
    destination.mkdir()
    for path in sorted(newer):
        path.rename(destination / path.name)
    return destination


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(checkpoint_root(output_dir))
    path = Path(resume)
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete dv3 checkpoint (no {COMPLETE_MARKER} or {STATE_FILE})")
    return path


def deepspeed_checkpoint_types() -> list:
    """The non-tensor DeepSpeed types its checkpoint files pickle (for the restricted unpickler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loading():
    """Within this block every ``torch.load`` uses ``weights_only=True``, DeepSpeed's included."""
    original = torch.load

    def restricted_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = restricted_load
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            yield
    finally:
        torch.load = original


def load(engine, path: Path) -> None:
    """Collective: load a complete checkpoint into the engine (its dv3 state: :func:`read_state`)."""
    with weights_only_loading():
        loaded_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if loaded_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
