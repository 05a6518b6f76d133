"""Checkpoints you can trust: written by every rank, marked complete only when all finished.

Layout of a run's ``checkpoints/`` folder::

    step00000500/                 one DeepSpeed checkpoint tag (model, optimizer, ZeRO shards)
        zero_pp_rank_*_*.pt       DeepSpeed's files
        spm.model                 the run's tokenizer (export ships this copy, not a path)
        dv3_state.json            step, data loader position, run config, world size, counters
        checksums.json            size and sha256 of every file above, each rank hashing its own
        COMPLETE                  written by rank 0 after all of that: the only proof of a good save

DeepSpeed writes its ``latest`` file without a barrier first, so it is never trusted here:
``--resume auto`` takes the newest folder that has ``COMPLETE`` *and verifies* (every file of
``checksums.json`` present with its size and hash), falling back to older ones with a warning
naming the bad file; an explicit ``--resume DIR`` that does not verify is refused. A model whose
weights are not finite is never saved. Old checkpoints are pruned to the newest ``keep``, only
after a new one is complete. An explicit ``--resume`` from an older step moves the later ones
into ``abandoned-<time>-after-<tag>/``: out of reach of ``auto`` and of pruning, never deleted.

DeepSpeed's own loader calls ``torch.load(weights_only=False)``; dv3 loads every checkpoint
through :func:`weights_only_loading`, which forces the restricted unpickler and allows only
the few DeepSpeed types its files contain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import CheckpointError, OutputError
from engine.train.distributed import barrier

log = logging.getLogger("dv3")

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "dv3_state.json"
CHECKSUMS_FILE = "checksums.json"
TOKENIZER_FILE = "spm.model"
UNIVERSAL_SUFFIX = "_universal"
# DeepSpeed names each data-parallel rank's files zero_pp_rank_<rank>_mp_rank_<mp>_...: that rank hashes them.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


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
    the run config's presets). ``tokenizer`` is where the run read its tokenizer (informative:
    the checkpoint carries its own copy, ``spm.model``). Written flat, in the layout every dv3
    version has read.
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


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder is named for (``step00000500``), or None for other folders."""
    digits = path.name[len("step"):]
    return int(digits) if path.name.startswith("step") and digits.isdigit() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first, by the step in their name (universal
    conversions excluded; an unreadable ``dv3_state.json`` shows when one is verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _own_files(path: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the files of this checkpoint that ``rank`` hashes: its own DeepSpeed
    shards; rank 0 also everything that belongs to no rank."""
    owned = {}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name in (CHECKSUMS_FILE, COMPLETE_MARKER) or file.name.startswith("."):
            continue
        match = _RANK_FILE.search(file.name)
        if (int(match.group(1)) if match else 0) == rank:
            owned[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    return owned


def _gather(value):
    """Every rank's ``value``, in rank order (one process: just this one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _raise_if_any_failed(failure: str | None, what: str) -> None:
    """Collective: if any rank failed, every rank raises (a lone raise would leave the others
    waiting in the next collective forever)."""
    failures = [f for f in _gather(failure) if f]
    if failures:
        raise OutputError(f"{what}: {failures[0]}" + (f" (and {len(failures) - 1} more rank(s))"
                                                      if len(failures) > 1 else ""))


# Less free space than this after a failed write means the disk is full: torch.save reports that as
# a RuntimeError ("unexpected pos ...") without errno.
FULL_DISK_BYTES = 64 * 2**20


def _describe_os_error(error: BaseException, path: Path) -> str:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {path} ({error.strerror})"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    free = shutil.disk_usage(existing).free if existing is not None else None
    if free is not None and free < FULL_DISK_BYTES:
        return f"no space left on the device of {path} ({free / 2**20:.1f} MiB free; {type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def save(engine, output_dir: str | Path, info: CheckpointInfo, keep: int, rank: int,
         tokenizer: Path | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    Nothing is pruned and nothing is marked complete unless every rank wrote and hashed its
    part; a failure (a full disk, say) raises ``OutputError`` on every rank and leaves the
    earlier checkpoints as they were.
    """
    step = info.state.step
    root = checkpoint_root(output_dir)
    tag = tag_for_step(step)
    path = root / tag
    failure = None
    try:
        if rank == 0 and path.exists():
            shutil.rmtree(path)  # an earlier, unmarked attempt at this step
    except OSError as error:
        failure = _describe_os_error(error, path)
    _raise_if_any_failed(failure, f"checkpoint {path}")
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        if rank == 0:
            if tokenizer is not None:
                shutil.copyfile(tokenizer, path / TOKENIZER_FILE)
            _write_atomic(path / STATE_FILE, json.dumps({**info.to_json(), "saved_at": time.time()}, indent=2))
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        failure = _describe_os_error(error, path)
    _raise_if_any_failed(failure, f"checkpoint {path} (not marked complete; the earlier checkpoints are intact)")
    checksums = {}
    try:
        for part in _gather(_own_files(path, rank)):
            checksums.update(part)
        if rank == 0:
            _write_atomic(path / CHECKSUMS_FILE, json.dumps({"files": checksums}, indent=2, sort_keys=True))
            _write_atomic(path / COMPLETE_MARKER, f"{step}\n")
    except OSError as error:
        failure = _describe_os_error(error, path)
    _raise_if_any_failed(failure, f"checkpoint {path} (not marked complete; the earlier checkpoints are intact)")
    if rank == 0:
        prune(root, keep)
    barrier()
    return path


def mark_complete(path: Path, step: int) -> None:
    """One process: hash every file of a finished checkpoint folder, then mark it complete (what a
    conversion does; a training save hashes on every rank, see :func:`save`)."""
    files = {}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name not in (CHECKSUMS_FILE, COMPLETE_MARKER) and not file.name.startswith("."):
            files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    _write_atomic(path / CHECKSUMS_FILE, json.dumps({"files": files}, indent=2, sort_keys=True))
    _write_atomic(path / COMPLETE_MARKER, f"{step}\n")


def verify(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when every file in its
    ``checksums.json`` is there with its size and hash. A checkpoint of dv3 0.1 has no checksums:
    its state is checked to be readable, and it verifies (with a warning)."""
    try:
        read_state(path)
    except CheckpointError as error:
        return str(error)
    listing = path / CHECKSUMS_FILE
    if not listing.is_file():
        log.warning("%s has no %s (written by dv3 0.1): its files cannot be verified", path, CHECKSUMS_FILE)
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{listing}: unreadable ({error})"
    for name, expected in sorted(files.items()):
        file = path / name
        if Path(name).name != name:
            return f"{listing}: {name!r} is not a file of this checkpoint"
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, {expected['bytes']} were written (truncated?)"
        if _sha256(file) != expected["sha256"]:
            return f"{file} differs from what was written (sha256 mismatch)"
    return None


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and stale incomplete ones."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if complete:
        newest_step = step_of(complete[-1])
        for candidate in root.iterdir():
            step = step_of(candidate) if candidate.is_dir() else None
            if step is not None and step < newest_step and not is_complete(candidate):
                shutil.rmtree(candidate, ignore_errors=True)


def set_aside_newer(root: Path, step: int) -> Path | None:
    """Move checkpoints of later steps than ``step`` into ``root/abandoned-<time>/``.

    After an explicit resume from an older checkpoint they belong to a continuation the user
    chose to abandon: left in place, ``--resume auto`` would jump back onto it and pruning would
    count them and delete the new continuation's checkpoints. Moved, nothing is lost.
    """
    if not root.is_dir():
        return None
    newer = [candidate for candidate in root.iterdir()
             if candidate.is_dir() and (step_of(candidate) or 0) > step]
    if not newer:
        return None
    destination = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-after-{tag_for_step(step)}"
    destination.mkdir()
    for path in sorted(newer):
        path.rename(destination / path.name)
    return destination


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint that verifies; bad ones are skipped with a warning
    naming what is wrong. A folder given explicitly must verify.
    """
    if resume == "none":
        return None
    if resume == "auto":
        for candidate in reversed(complete_checkpoints(checkpoint_root(output_dir))):
            problem = verify(candidate)
            if problem is None:
                return candidate
            log.warning("skipping checkpoint %s: %s; trying the one before it", candidate, problem)
        return None
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete dv3 checkpoint (no {COMPLETE_MARKER} or {STATE_FILE})")
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"{path} does not verify: {problem}")
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
    failure = None
    try:
        with weights_only_loading():
            loaded_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if loaded_path is None:
            failure = "DeepSpeed found nothing to load"
    except pickle.UnpicklingError as error:  # the restricted unpickler refused an object
        failure = f"a file holds objects that are not weights, refused by the restricted loader ({error})"
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as error:
        failure = f"{type(error).__name__}: {error}"
    failures = [f for f in _gather(failure) if f]
    if failures:
        raise CheckpointError(f"cannot load {path}: {failures[0]}")
