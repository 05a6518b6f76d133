"""End-to-end `dv3 pretrain` on CPU ranks: exact resume, resume at another world size, the
non-finite guard, stop-on-signal, and the Hugging Face export round trip."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from engine.train import checkpoint
from tests.support.runs import (
    REPO,
    UNINTERRUPTED_STEPS,
    kill_tree,
    run_env,
    run_pretrain,
    start_pretrain,
    step_learning_rates,
    step_losses,
    wait_for,
)

pytestmark = pytest.mark.slow
N = UNINTERRUPTED_STEPS // 2  # steps before the interruption; runs go to 2N


def test_resume_after_sigkill_gives_identical_losses_at_every_step(uninterrupted, tiny_dataset, tmp_path):
    output = tmp_path / "killed"
    output.mkdir()
    process = start_pretrain(output, tiny_dataset, 2, "--train.steps", str(2 * N), "--checkpoint.interval", str(N))
    wait_for(checkpoint.checkpoint_root(output) / checkpoint.tag_for_step(N) / checkpoint.COMPLETE_MARKER, process)
    kill_tree(process)  # right after the checkpoint, every rank: no chance to clean up
    resumed = run_pretrain(output, tiny_dataset, 2, "--train.steps", str(2 * N), "--checkpoint.interval", str(N),
                           "--resume", "auto")
    assert f"{checkpoint.tag_for_step(N)} at step {N}" in resumed.stderr  # it resumed, from the checkpoint at N

    expected, got = step_losses(uninterrupted), step_losses(output)
    assert sorted(expected) == sorted(got) == list(range(1, 2 * N + 1))
    for step in expected:
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_checkpoints_are_marked_complete_and_pruned(uninterrupted):
    root = checkpoint.checkpoint_root(uninterrupted)
    complete = checkpoint.complete_checkpoints(root)
    assert [checkpoint.read_state(p)["step"] for p in complete] == [N, 2 * N]  # keep: 2
    state = checkpoint.read_state(complete[-1])
    assert state["loader"]["samples_consumed"] == 2 * N * 16
    assert state["world_size"] == 2 and state["zero_stage"] == 3
    assert (uninterrupted / "tensorboard").is_dir() and any((uninterrupted / "tensorboard").iterdir())


def test_resume_at_another_world_size_through_a_universal_checkpoint(tiny_dataset, tmp_path):
    no_dropout = ("--model.hidden-dropout-prob", "0", "--model.attention-probs-dropout-prob", "0")
    two_ranks = tmp_path / "two"
    run_pretrain(two_ranks, tiny_dataset, 2, "--train.steps", str(N + 2), "--checkpoint.interval", str(N),
                 *no_dropout)
    saved = checkpoint.checkpoint_root(two_ranks) / checkpoint.tag_for_step(N)
    convert = subprocess.run([sys.executable, "-m", "engine.cli", "ckpt", "universal", "--checkpoint", str(saved)],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    universal = saved.with_name(saved.name + checkpoint.UNIVERSAL_SUFFIX)

    one_rank = tmp_path / "one"
    run_pretrain(one_rank, tiny_dataset, 1, "--train.steps", str(N + 2), "--checkpoint.interval", str(N),
                 "--resume", str(universal), *no_dropout)
    expected, got = step_losses(two_ranks), step_losses(one_rank)
    assert sorted(got) == [N + 1, N + 2]
    # The MLM loss of the first resumed step depends only on the weights, the data position and
    # the masks: the same as the 2-rank run's. (RTD losses differ a little: each rank samples
    # replacements from its own random stream.)
    assert got[N + 1][1] == pytest.approx(expected[N + 1][1], rel=1e-5)
    assert got[N + 1][2] == pytest.approx(expected[N + 1][2], rel=0.05)
    # A ZeRO-3 universal load renames every optimizer group after group 0: each group must
    # still get its own lr (no decay on LayerNorm, the generator's multiplier only for it).
    two_lrs, one_lrs = step_learning_rates(two_ranks), step_learning_rates(one_rank)
    assert set(one_lrs[N + 1]) == {"gen_decay", "gen_no_decay", "disc_decay", "disc_no_decay"}
    assert one_lrs[N + 1] == pytest.approx(two_lrs[N + 1], rel=1e-12)


def test_nonfinite_loss_skips_the_step_and_too_many_stop_the_run(tiny_dataset, tmp_path):
    output = tmp_path / "nan"
    result = run_pretrain(output, tiny_dataset, 2, "--train.steps", "4", "--checkpoint.interval", "2",
                          "--train.fail-loss-at-steps", "1")
    assert "step 2: non-finite loss, update skipped" in result.stderr  # numbered from 1, like the progress
    losses = step_losses(output)
    assert 2 not in losses and sorted(losses) == [1, 3, 4]  # step index 1 is the 2nd step
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())

    result = run_pretrain(output, tiny_dataset, 2, "--train.steps", "10", "--checkpoint.interval", "2",
                          "--resume", "auto", "--train.fail-loss-at-steps", "4,5,6",
                          "--train.max-nonfinite-in-a-row", "3", expect=1)
    assert "3 non-finite losses in a row" in result.stderr
    newest = checkpoint.latest_complete(checkpoint.checkpoint_root(output))
    assert checkpoint.read_state(newest)["step"] == 4  # the last good checkpoint, untouched


def test_sigusr1_checkpoints_at_the_next_step_and_exits_for_requeue(tiny_dataset, tmp_path):
    output = tmp_path / "signalled"
    output.mkdir()
    process = start_pretrain(output, tiny_dataset, 1, "--train.steps", "200", "--checkpoint.interval", "1000")
    wait_for(output / "metrics.jsonl", process)
    os.killpg(process.pid, signal.SIGUSR1)
    assert process.wait(timeout=300) == 75
    newest = checkpoint.latest_complete(checkpoint.checkpoint_root(output))
    assert newest is not None and 1 <= checkpoint.read_state(newest)["step"] < 200


def test_export_round_trip_matches_our_discriminator(uninterrupted, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from engine.train.export import load_rtd_model

    hf_dir, gen_dir = tmp_path / "hf", tmp_path / "hf_generator"
    result = subprocess.run([sys.executable, "-m", "engine.cli", "export", "--checkpoint", str(uninterrupted),
                             "--output", str(hf_dir), "--generator-output", str(gen_dir)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    model, _ = load_rtd_model(checkpoint.latest_complete(checkpoint.checkpoint_root(uninterrupted)))
    delta = model.discriminator.deberta.embeddings.word_embeddings.delta_weight
    assert delta.abs().sum() > 0, "E_Delta moved during training"
    hf_model, info = AutoModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(hf_model.embeddings.word_embeddings.weight,
                               model.generator.word_embeddings.weight + delta)

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    encoded = tokenizer(["Anarchism is a political philosophy.", "Short."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.discriminator_encoder()(encoded["input_ids"], encoded["attention_mask"]).last_hidden_state
        got = hf_model.eval()(**encoded).last_hidden_state
    valid = encoded["attention_mask"].bool()
    assert float((got[valid] - expected[valid]).norm() / expected[valid].norm()) < 1e-5
    assert tokenizer.mask_token_id == json.loads((hf_dir / "tokenizer_config.json").read_text())["dv3_mask_token_id"]

    generator, info = AutoModelForMaskedLM.from_pretrained(gen_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tensorboard_has_the_curves_a_run_should_show(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(uninterrupted / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "loss/total", "loss/mlm", "loss/rtd", "generator/accuracy", "discriminator/accuracy",
        "discriminator/recall", "discriminator/replaced_fraction", "throughput/tokens_per_s",
        "throughput/samples_per_s", "throughput/model_tflops_per_device", "memory/peak_gib", "optim/grad_norm",
        "embedding_similarity/E_G", "embedding_similarity/E_D", "embedding_similarity/E_Delta",
    }
    for group in ("gen_decay", "gen_no_decay", "disc_decay", "disc_no_decay"):
        expected |= {f"optim/lr/{group}", f"optim/grad_norm/{group}"}
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, 2 * N + 1))
    delta = events.Scalars("embedding_similarity/E_Delta")
    assert delta[0].step == 0 and delta[0].value == 0.0  # E_Delta starts at zero: no direction yet


def test_resume_with_another_seed_is_refused_in_one_line_and_changes_nothing(uninterrupted, tiny_dataset):
    before = {path: path.read_bytes() for path in (uninterrupted / "run_config.json", uninterrupted / "metrics.jsonl")}
    # torchrun reports any failed rank as its own exit 1; the ranks themselves exit 2 with one line.
    result = run_pretrain(uninterrupted, tiny_dataset, 2, "--train.steps", str(2 * N + 2), "--resume", "auto",
                          "--train.seed", "999", expect=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("dv3 pretrain: error: ")]
    assert len(errors) == 2 and "resume from " in errors[0] and "this loader has seed 999" in errors[0]
    assert "failed (exitcode: 2)" in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in before} == before


def test_resume_at_another_world_size_without_conversion_says_how_to_convert(uninterrupted, tiny_dataset):
    result = run_pretrain(uninterrupted, tiny_dataset, 1, "--train.steps", str(2 * N + 1), "--resume", "auto", expect=2)
    assert "saved by 2 ranks under ZeRO stage 3; to resume on 1, convert it first: dv3 ckpt universal" in result.stderr
    assert "Traceback" not in result.stderr


def test_explicit_resume_from_an_older_checkpoint_sets_the_later_ones_aside(uninterrupted, tiny_dataset, tmp_path):
    run = tmp_path / "rewound"
    shutil.copytree(uninterrupted, run)
    root = checkpoint.checkpoint_root(run)
    run_pretrain(run, tiny_dataset, 2, "--train.steps", str(N + 1), "--checkpoint.interval", "1",
                 "--resume", str(root / checkpoint.tag_for_step(N)))
    assert [checkpoint.read_state(p)["step"] for p in checkpoint.complete_checkpoints(root)] == [N, N + 1]
    (abandoned,) = root.glob("abandoned-*")
    assert checkpoint.is_complete(abandoned / checkpoint.tag_for_step(2 * N))  # kept, out of auto-resume's way


def test_pretraining_at_1024_tokens_trains_and_asks_for_positions_the_emd_needs(tmp_path):
    data = tmp_path / "long"
    prepared = subprocess.run(
        [sys.executable, "-m", "engine.cli", "data", "prepare", "--output", str(data), "--vocab-size", "1000",
         "--seq-len", "1024", "--validation-fraction", "0.05", "--input-sentence-size", "20000", "--no-progress"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    small = ("--train.steps", "2", "--train.global-batch", "2", "--train.micro-batch", "2")
    refused = run_pretrain(tmp_path / "refused", data, 1, *small, expect=2)
    assert "the data's rows have 1024 tokens" in refused.stderr and "--model.max-position-embeddings 1024" in \
        refused.stderr
    output = tmp_path / "run"
    run_pretrain(output, data, 1, *small, "--model.max-position-embeddings", "1024",
                 "--model.max-relative-positions", "512", "--train.activation-checkpointing", "1")
    losses = step_losses(output)
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    state = checkpoint.read_state(checkpoint.latest_complete(checkpoint.checkpoint_root(output)))
    assert state["encoder_config"]["max_position_embeddings"] == 1024
    assert state["encoder_config"]["max_relative_positions"] == 512


def test_activation_checkpointing_under_zero3_trains_exactly_as_without(uninterrupted, tiny_dataset, tmp_path):
    output = tmp_path / "recomputed"
    run_pretrain(output, tiny_dataset, 2, "--train.steps", str(2 * N), "--checkpoint.interval", str(N),
                 "--train.activation-checkpointing", "1")
    expected, got = step_losses(uninterrupted), step_losses(output)
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step in expected:  # dropout on: the recomputation replays its masks, so every loss is the same
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
