"""Checkpoint bookkeeping that needs no training: completeness, pruning, setting aside."""

import json
from pathlib import Path

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
