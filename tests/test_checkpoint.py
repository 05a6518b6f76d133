"""Checkpoint bookkeeping that needs no training: completeness, verification, pruning, setting aside."""

import json
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.train import checkpoint


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / checkpoint.tag_for_step(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
        (path / checkpoint.COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def test_latest_complete_skips_an_unmarked_newer_folder(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "step00000010"


def test_prune_keeps_the_newest_and_drops_stale_incomplete_folders(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 25, complete=False)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000020", "step00000030"]


def test_an_explicit_resume_sets_later_checkpoints_aside_and_loses_none(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 40, complete=False)
    moved = checkpoint.set_aside_newer(tmp_path, 10)
    assert moved is not None and moved.parent == tmp_path and moved.name.endswith("-after-step00000010")
    assert sorted(p.name for p in moved.iterdir()) == ["step00000020", "step00000030", "step00000040"]
    assert (moved / "step00000030" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    # The new continuation's checkpoints are the only ones auto-resume and pruning see.
    fake_checkpoint(tmp_path, 15)
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step00000010", "step00000015"]
    assert checkpoint.set_aside_newer(tmp_path, 15) is None


def hashed_checkpoint(root: Path, step: int) -> Path:
    """A complete checkpoint as a save leaves it: files, dv3_state.json, checksums.json, COMPLETE."""
    path = root / "checkpoints" / checkpoint.tag_for_step(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * 64)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    checkpoint.mark_complete(path, step)
    return path


def test_a_hashed_checkpoint_verifies_and_any_changed_byte_or_size_is_named(tmp_path):
    path = hashed_checkpoint(tmp_path, 4)
    assert checkpoint.verify(path) is None
    shard = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    assert checkpoint.verify(path) == f"{shard} differs from what was written (sha256 mismatch)"
    shard.write_bytes(bytes(data[:500]))
    assert "has 500 bytes, 16384 were written (truncated?)" in checkpoint.verify(path)
    shard.unlink()
    assert checkpoint.verify(path) == f"{shard} is missing"


def test_resume_auto_falls_back_past_a_bad_checkpoint_and_an_explicit_one_is_refused(tmp_path, caplog):
    hashed_checkpoint(tmp_path, 4)
    bad = hashed_checkpoint(tmp_path, 8)
    (bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step00000004"
    assert "skipping checkpoint" in caplog.text and "zero_pp_rank_0_mp_rank_00_optim_states.pt has 9 bytes" in caplog.text
    with pytest.raises(CheckpointError, match="step00000008 does not verify: .* has 9 bytes"):
        checkpoint.resolve_resume(str(bad), tmp_path)


def test_one_unreadable_state_file_does_not_block_the_run(tmp_path):
    good = hashed_checkpoint(tmp_path, 4)
    old = hashed_checkpoint(tmp_path, 2)
    (old / checkpoint.STATE_FILE).write_text("{not json")
    root = tmp_path / "checkpoints"
    assert checkpoint.complete_checkpoints(root) == [old, good]  # ordered by name, not by reading the state
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    (good / checkpoint.STATE_FILE).write_text("{not json")
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # neither verifies: start fresh, say why
    checkpoint.prune(root, keep=1)  # pruning reads no state either
    assert [p.name for p in root.iterdir()] == ["step00000004"]
