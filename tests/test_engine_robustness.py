"""Careless and hostile use of `dv3 pretrain` and `dv3 export` (CPU ranks): nothing may lose a run,
ship a bad model, or read what it should not. Every refusal is one line, exit 2, before anything
is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train import checkpoint
from tests.support.disk import tmpfs
from tests.support.runs import REPO, UNINTERRUPTED_STEPS, run_env, run_pretrain, step_losses

pytestmark = pytest.mark.slow
N = UNINTERRUPTED_STEPS // 2


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result: subprocess.CompletedProcess, command: str = "pretrain") -> str:
    """The first `dv3 COMMAND: error:` line; no dv3 process printed a traceback (torchrun prints its
    own when a rank fails: the ranks' lines carry a `[rankN]:` prefix)."""
    launcher = "ChildFailedError" in result.stderr
    assert ("[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr) if launcher \
        else "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"dv3 {command}: error: ")]
    assert errors, result.stderr[-3000:]
    return errors[0]


def export(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "export", *arguments], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)


def test_rerunning_into_a_run_directory_without_resume_is_refused_and_changes_nothing(uninterrupted, tiny_dataset):
    before = snapshot(uninterrupted)
    result = run_pretrain(uninterrupted, tiny_dataset, 1, "--train.steps", "2", expect=2)
    assert f"already holds a run (checkpoints up to step {2 * N}); continue it with --resume auto" in \
        one_line_error(result)
    assert snapshot(uninterrupted) == before


def test_an_output_dir_that_is_a_file_is_refused(tiny_dataset, tmp_path):
    target = tmp_path / "run"
    target.write_text("not a folder")
    result = run_pretrain(target, tiny_dataset, 1, "--train.steps", "2", expect=2)
    assert f"output_dir: {target} is a file, not a directory" in one_line_error(result)
    assert target.read_text() == "not a folder"


def test_a_run_ending_in_skipped_steps_keeps_its_last_good_checkpoint(tiny_dataset, tmp_path):
    output = tmp_path / "ends-badly"
    result = run_pretrain(output, tiny_dataset, 1, "--train.steps", "6", "--checkpoint.interval", "2",
                          "--checkpoint.keep", "1", "--train.fail-loss-at-steps", "4,5", expect=1)
    assert "the last 2 were skipped (non-finite losses)" in result.stderr
    (kept,) = checkpoint.complete_checkpoints(checkpoint.checkpoint_root(output))
    state = checkpoint.read_state(kept)
    assert state["step"] == 4 and state["nonfinite_in_a_row"] == 0 and checkpoint.verify(kept) is None


def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_refused_by_name(uninterrupted, tiny_dataset, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run)
    root = checkpoint.checkpoint_root(run)
    newest = root / checkpoint.tag_for_step(2 * N)
    shard = sorted(newest.glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load may still read it, the hash does not match
    shard.write_bytes(bytes(data))

    explicit = run_pretrain(run, tiny_dataset, 2, "--train.steps", str(2 * N + 1), "--resume", str(newest), expect=1)
    assert f"resume: {newest} does not verify: {shard} differs from what was written" in one_line_error(explicit)

    resumed = run_pretrain(run, tiny_dataset, 2, "--train.steps", str(2 * N), "--checkpoint.interval", str(N),
                           "--resume", "auto")
    assert f"skipping checkpoint {newest}: {shard} differs" in resumed.stderr
    assert f"{checkpoint.tag_for_step(N)} at step {N}" in resumed.stderr
    expected, got = step_losses(uninterrupted), step_losses(run)
    assert all(got[step] == expected[step] for step in range(N + 1, 2 * N + 1))  # redone exactly
    assert checkpoint.verify(newest) is None  # rewritten, and it verifies


def test_resuming_with_another_model_or_zero_stage_is_refused_in_one_line(uninterrupted, tiny_dataset):
    before = snapshot(uninterrupted)
    result = run_pretrain(uninterrupted, tiny_dataset, 2, "--train.steps", str(2 * N + 1), "--resume", "auto",
                          "--model.preset", "xsmall", expect=1)
    assert "was trained with encoder hidden_size 128 (this run: 384)" in one_line_error(result)
    result = run_pretrain(uninterrupted, tiny_dataset, 2, "--train.steps", str(2 * N + 1), "--resume", "auto",
                          "--rtd.enhanced-mask-decoder", "false", expect=1)
    assert "--rtd.enhanced-mask-decoder true" in one_line_error(result)
    zero2 = REPO / "ds_configs" / "zero2_bf16.json"
    result = run_pretrain(uninterrupted, tiny_dataset, 2, "--train.steps", str(2 * N + 1), "--resume", "auto",
                          "--train.deepspeed-config", str(zero2), expect=1)
    assert "was saved under ZeRO stage 3" in one_line_error(result) and "uses stage 2" in one_line_error(result)
    assert snapshot(uninterrupted) == before


def test_export_ships_the_checkpoints_own_tokenizer_and_refuses_what_it_cannot_trust(uninterrupted, small_tokenizer,
                                                                                     tmp_path):
    newest = checkpoint.checkpoint_root(uninterrupted) / checkpoint.tag_for_step(2 * N)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    copied = checkpoint.checkpoint_root(run) / newest.name
    # A hostile dv3_state.json names another file as the tokenizer: export never reads it...
    state = json.loads((copied / checkpoint.STATE_FILE).read_text())
    state["tokenizer"] = "/etc/passwd"
    (copied / checkpoint.STATE_FILE).write_text(json.dumps(state))
    result = export("--checkpoint", str(copied), "--output", str(tmp_path / "edited"))
    # ...and the edit itself no longer verifies.
    refusal = one_line_error(result, "export")
    assert result.returncode == 2 and "does not verify" in refusal and "dv3_state.json" in refusal
    assert not (tmp_path / "edited").exists()

    out = tmp_path / "hf"
    assert export("--checkpoint", str(newest), "--output", str(out)).returncode == 0
    assert (out / "spm.model").read_bytes() == (newest / checkpoint.TOKENIZER_FILE).read_bytes()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) != oct(0o600)  # the user's usual permissions

    again = export("--checkpoint", str(newest), "--output", str(out))
    assert again.returncode == 2 and "already holds files" in one_line_error(again, "export")
    same = export("--checkpoint", str(newest), "--output", str(tmp_path / "x"), "--generator-output",
                  str(tmp_path / "x"))
    assert same.returncode == 2 and "must be separate folders" in one_line_error(same, "export")
    assert not (tmp_path / "x").exists()

    # A tokenizer of another vocabulary (what re-preparing the data directory would leave) is refused.
    wrong = export("--checkpoint", str(newest), "--output", str(tmp_path / "wrong"), "--tokenizer",
                   str(small_tokenizer))
    assert wrong.returncode == 2 and "it is not the tokenizer this model was trained with" in \
        one_line_error(wrong, "export")
    not_a_model = export("--checkpoint", str(newest), "--output", str(tmp_path / "wrong"), "--tokenizer",
                         str(newest / checkpoint.STATE_FILE))
    assert not_a_model.returncode == 2 and "is not a sentencepiece model" in one_line_error(not_a_model, "export")
    assert not (tmp_path / "wrong").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_on_every_rank_and_marks_nothing(tiny_dataset, tmp_path):
    disk = tmp_path / "small-disk"
    with tmpfs(disk, "size=4m"):  # room for the run's logs, not for a checkpoint
        output = disk / "run"
        result = run_pretrain(output, tiny_dataset, 2, "--train.steps", "2", "--checkpoint.interval", "1", expect=1)
        assert result.stderr.count("dv3 pretrain: error: checkpoint ") == 2, result.stderr[-3000:]  # both ranks
        error = one_line_error(result)
        assert "not marked complete; the earlier checkpoints are intact" in error and "no space left" in error
        assert checkpoint.complete_checkpoints(checkpoint.checkpoint_root(output)) == []
        assert (output / "run_config.json").is_file()  # what was written before is intact
