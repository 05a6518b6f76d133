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
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import CheckpointError
from engine.train.distributed import barrier

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "dv3_state.json"
UNIVERSAL_SUFFIX = "_universal"


@dataclass
class TrainState:
    """How far a run has come; with the DeepSpeed engine's own state, all that a resume needs."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    loader: dict = field(default_factory=dict)  # the data loader's position (its state_dict)


@dataclass
class CheckpointInfo:
    """What ``dv3_state.json`` holds: the train state, and what stays fixed for the whole run.

    ``model`` is ``RTDModel.describe()`` (export rebuilds the model from it, without the data or
    the run config's presets). Written flat, in the layout every dv3 version has read.
    """

    state: TrainState
    model: dict
    tokenizer: str | None
    world_size: int
    zero_stage: int
    config: dict
    universal: bool = False
    converted_from: str | None = None

    def to_json(self) -> dict:
        seed = self.config.get("train", {}).get("seed")
        return {**dataclasses.asdict(self.state), **self.model, "tokenizer": self.tokenizer,
                "world_size": self.world_size, "zero_stage": self.zero_stage, "config": self.config,
                "rng": {"scheme": "seed_step(seed, step, rank)", "seed": seed},
                **({"universal": True, "converted_from": self.converted_from} if self.universal else {})}

    @classmethod
    def from_json(cls, data: dict) -> CheckpointInfo:
        state_fields = {f.name for f in dataclasses.fields(TrainState)}
        return cls(
            state=TrainState(**{k: v for k, v in data.items() if k in state_fields}),
            model={k: data[k] for k in ("encoder_config", "rtd_config", "mask_token_id") if k in data},
            tokenizer=data.get("tokenizer"), world_size=data.get("world_size", -1),
            zero_stage=data.get("zero_stage", 0), config=data.get("config", {}),
            universal=bool(data.get("universal")), converted_from=data.get("converted_from"),
        )

    @classmethod
    def read(cls, path: Path) -> CheckpointInfo:
        return cls.from_json(read_state(path))


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
    """The raw ``dv3_state.json`` of a checkpoint (``CheckpointInfo.read`` parses it)."""
    state_path = Path(path) / STATE_FILE
    try:
        return json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_path}: unreadable checkpoint state ({error})") from error


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    with open(temporary) as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(engine, output_dir: str | Path, info: CheckpointInfo, keep: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    step = info.state.step
    root = checkpoint_root(output_dir)
    tag = tag_for_step(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an earlier, unmarked attempt at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if rank == 0:
        _write_atomic(path / STATE_FILE, json.dumps({**info.to_json(), "saved_at": time.time()}, indent=2))
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
        raise CheckpointError(f"{path} is not a complete dv3 checkpoint (no {COMPLETE_MARKER} or {STATE_FILE})")
    return path


@contextlib.contextmanager
def weights_only_loading():
    """Within this block every ``torch.load`` uses ``weights_only=True``, DeepSpeed's included."""
    # Imported here, not at the top: reading checkpoint folders and dv3_state.json (dv3 ablate,
    # export's checks) needs no DeepSpeed, which takes seconds to import.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    original = torch.load

    def restricted_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = restricted_load
    try:
        # The non-tensor DeepSpeed types its checkpoint files pickle.
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            yield
    finally:
        torch.load = original


def load(engine, path: Path) -> None:
    """Collective: load a complete checkpoint into the engine (its dv3 state: :func:`read_state`)."""
    with weights_only_loading():
        loaded_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if loaded_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
