"""PretrainLoader: shapes, rank disjointness and coverage, exact resumption (also across world sizes),
blending, language sampling, masking, epochs, long rows, and refusing damaged or mismatched data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import PretrainLoader
from data_pipeline.errors import ConfigError, DataPipelineError, ManifestError, ShardError, TokenizerError
from data_pipeline.masking import IGNORE_INDEX, MaskingConfig, mask_batch
from data_pipeline.sampling import largest_remainder, source_probabilities
from data_pipeline.shards import load_manifest, verify_dataset
from tests.support.data import (
    SEQ_LEN,
    all_rows,
    copy_dataset,
    prepare_small,
)


def take(loader: PretrainLoader, steps: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(steps)]


def test_batches_are_int64_ids_with_attention_mask(prepared_dir: Path) -> None:
    loader = PretrainLoader(prepared_dir, batch_size=5, pin_memory=True)  # no-op without a GPU
    batch = next(loader)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (5, SEQ_LEN) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != 0).long())
    assert torch.all(batch["input_ids"][:, 0] == loader.info.cls_token_id)
    info = loader.info
    assert info.seq_len == SEQ_LEN and info.vocab_size == info.mask_token_id + 1 == info.num_pieces + 1
    assert info.tokenizer_path == prepared_dir / "spm.model" and info.tokenizer_path.exists()
    assert info.special_token_ids == (0, 1, 2) and info.unk_token_id == 3


def test_batches_hold_the_rows_the_shards_hold(prepared_dir: Path) -> None:
    rows = all_rows(prepared_dir)
    loader = PretrainLoader(prepared_dir, batch_size=7, return_indices=True, seed=3)
    for batch in take(loader, 5):
        assert torch.equal(batch["input_ids"], torch.from_numpy(rows[batch["row_index"].numpy()]))


@pytest.mark.parametrize("world_size,batch_size", [(1, 8), (3, 4), (4, 5)])
def test_ranks_are_disjoint_and_cover_every_row_once_per_epoch(
    prepared_dir: Path, world_size: int, batch_size: int
) -> None:
    seen: list[int] = []
    per_rank_batches = []
    for rank in range(world_size):
        loader = PretrainLoader(
            prepared_dir,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=11,
            language_alpha=1.0,
            max_epochs=1,
            return_indices=True,
        )
        batches = list(loader)
        per_rank_batches.append(len(batches))
        rank_rows = [r for b in batches for r in b["row_index"].tolist() if r >= 0]
        seen.extend(rank_rows)
    assert len(set(per_rank_batches)) == 1, "every rank must get the same number of batches"
    total = loader.info.rows
    assert sorted(seen) == list(range(total)), "each row exactly once across ranks"


def test_shuffle_is_deterministic_new_each_epoch_and_off_when_asked(prepared_dir: Path) -> None:
    def epoch_order(seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        loader = PretrainLoader(prepared_dir, batch_size=1, seed=seed, shuffle=shuffle, language_alpha=1.0)
        n = loader.samples_per_epoch
        return loader.locate(np.arange(epoch * n, (epoch + 1) * n)).row_ids.tolist()

    first = epoch_order(0, 0)
    assert first == epoch_order(0, 0)
    assert sorted(first) == sorted(epoch_order(0, 1)) and first != epoch_order(0, 1)
    assert first != epoch_order(1, 0)
    assert epoch_order(0, 0, shuffle=False) == sorted(first)


def test_resume_mid_epoch_continues_with_the_same_batches(prepared_dir: Path) -> None:
    masking = MaskingConfig()
    reference = PretrainLoader(prepared_dir, batch_size=6, seed=5, masking=masking)
    steps_per_epoch = reference.steps_per_epoch
    expected = take(reference, steps_per_epoch + 4)  # across the epoch boundary

    interrupted = PretrainLoader(prepared_dir, batch_size=6, seed=5, masking=masking)
    take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))  # a checkpoint goes through JSON-like storage
    assert state["samples_consumed"] == 18

    resumed = PretrainLoader(prepared_dir, batch_size=6, seed=5, masking=masking)
    resumed.load_state_dict(state)
    for step, batch in enumerate(take(resumed, steps_per_epoch + 1), start=3):
        for key in expected[step]:
            assert torch.equal(batch[key], expected[step][key]), (step, key)
    assert resumed.epoch == 1 and resumed.samples_consumed == (steps_per_epoch + 4) * 6


def test_resume_after_world_size_change_keeps_each_global_batch(prepared_dir: Path) -> None:
    """Two ranks of 6, then three ranks of 4: global batch 12 both times, same samples each step."""

    def global_steps(world_size: int, batch_size: int, state: dict | None, steps: int) -> list[dict]:
        loaders = [
            PretrainLoader(
                prepared_dir, batch_size=batch_size, rank=r, world_size=world_size, seed=2, masking=MaskingConfig()
            )
            for r in range(world_size)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        out = []
        for _ in range(steps):
            parts = [next(loader) for loader in loaders]
            out.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
        return out, loaders[0].state_dict()

    uninterrupted, _ = global_steps(2, 6, None, 5)
    _, state = global_steps(2, 6, None, 2)
    resumed, _ = global_steps(3, 4, state, 3)
    for before, after in zip(uninterrupted[2:], resumed, strict=True):
        assert torch.equal(before["sample_index"], after["sample_index"])
        for key in ("input_ids", "masked_input_ids", "mlm_labels"):
            assert torch.equal(before[key], after[key])


def test_workers_yield_what_a_single_process_yields(prepared_dir: Path) -> None:
    single = PretrainLoader(prepared_dir, batch_size=4, seed=9, masking=MaskingConfig())
    workers = PretrainLoader(prepared_dir, batch_size=4, seed=9, masking=MaskingConfig(), num_workers=2)
    expected = take(single, 6)
    got = take(workers, 6)
    state = workers.state_dict()
    workers.close()
    for a, b in zip(expected, got, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert state == single.state_dict()  # prefetching does not count as consumed


def test_masking_is_reproducible_from_seed_epoch_and_sample_index(prepared_dir: Path) -> None:
    loader = PretrainLoader(prepared_dir, batch_size=8, seed=4, masking=MaskingConfig("bert"))
    for batch in take(loader, 3):
        again = mask_batch(
            batch["input_ids"],
            batch["attention_mask"],
            batch["sample_index"],
            seed=4,
            epoch=0,
            config=MaskingConfig("bert"),
            mask_token_id=loader.mask_token_id,
            vocab_size=loader.vocab_size,
            special_token_ids=loader.info.special_token_ids,
            unk_token_id=loader.info.unk_token_id,
        )
        assert torch.equal(batch["masked_input_ids"], again.masked_input_ids)
        assert torch.equal(batch["mlm_labels"], again.mlm_labels)
        selected = batch["mlm_labels"] != IGNORE_INDEX
        assert not selected[batch["input_ids"] <= 2].any(), "never [PAD], [CLS] or [SEP]"
        assert selected.any(dim=1).all()


@pytest.mark.parametrize("seq_len", [1024, 8192])
def test_long_rows_are_prepared_and_loaded_with_masking(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path, seq_len: int
) -> None:
    output = tmp_path / "long"
    command = [sys.executable, "-m", "data_pipeline.cli", "data", "prepare", str(corpus_dir), "--output", str(output),
               "--tokenizer", str(small_tokenizer), "--seq-len", str(seq_len), "--validation-fraction", "0",
               "--no-progress"]  # fmt: skip
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(output)
    assert manifest.seq_len == seq_len and verify_dataset(output).ok
    # Record batches and shards are sized in bytes (8 MiB, 64 MiB), not a fixed row count.
    assert manifest.settings["record_batch_rows"] == (8 << 20) // (4 * seq_len)
    assert manifest.settings["rows_per_shard"] == (64 << 20) // (4 * seq_len)
    rows = all_rows(output)
    for strategy in ("rtd", "official"):
        loader = PretrainLoader(output, batch_size=len(rows), shuffle=False, masking=MaskingConfig(strategy),
                                return_indices=True)  # fmt: skip
        batch = next(loader)
        assert batch["input_ids"].shape == (len(rows), seq_len)
        assert torch.equal(batch["input_ids"], torch.from_numpy(rows[batch["row_index"].numpy()]))
        selected = (batch["mlm_labels"] != IGNORE_INDEX).numpy()
        ids = batch["input_ids"].numpy()
        assert not selected[ids <= 3].any(), "never [PAD], [CLS], [SEP] or [UNK]"
        maskable = ids > 3
        full_rows = np.nonzero(batch["attention_mask"].numpy().all(axis=1))[0]
        assert len(full_rows) >= 4, "enough full rows to check the masks on"
        for row in full_rows:
            picked = np.nonzero(selected[row][maskable[row]])[0]  # ranks among the maskable positions
            if strategy == "rtd":
                assert len(picked) == round(0.15 * maskable[row].sum())
            else:  # 154 at 1024, 1229 at 8192 (under the cap); the last ~10% of the row is never masked
                used = min(round(0.15 * seq_len), -(-maskable[row].sum() // 6))
                assert list(picked // 6) == list(range(used))


def test_epochs_continue_and_are_counted(prepared_dir: Path) -> None:
    loader = PretrainLoader(prepared_dir, batch_size=16, masking=MaskingConfig())
    assert loader.epoch == 0
    steps = 2 * loader.samples_per_epoch // 16 + 1
    samples = torch.cat([b["sample_index"] for b in take(loader, steps)])
    assert torch.equal(samples, torch.arange(steps * 16)), "the sample stream runs on across epochs"
    assert loader.epoch == 2 and loader.state_dict()["epoch"] == 2


def test_validation_split_reads_the_held_out_rows_in_order(prepared_dir: Path) -> None:
    rows = all_rows(prepared_dir, "validation")
    loader = PretrainLoader(prepared_dir, batch_size=4, split="validation", shuffle=False, max_epochs=1)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(rows) // 4) or len(loader) == 0
    ids = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(ids[: len(rows)], torch.from_numpy(rows))
    assert not ids[len(rows) :].any(), "the last batch is padded with empty rows"
    with pytest.raises(StopIteration):
        next(loader)
    loader.reset()
    assert torch.equal(next(loader)["input_ids"], batches[0]["input_ids"])


def test_languages_are_sampled_with_probability_p_to_the_alpha(prepared_dir: Path) -> None:
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    rows = Counter()
    for shard in manifest["shards"]:
        if shard["split"] == "train":
            rows[shard["language"]] += shard["rows"]
    languages = sorted(rows)
    counts = [rows[language] for language in languages]
    loader = PretrainLoader(prepared_dir, batch_size=1, seed=1, return_indices=True)  # alpha 0.3 by default
    located = loader.locate(np.arange(loader.samples_per_epoch))
    offsets = np.cumsum([0] + counts)
    language_of_row = np.searchsorted(offsets, located.row_ids, side="right") - 1
    drawn = np.bincount(language_of_row, minlength=len(languages))
    expected = largest_remainder(source_probabilities(counts, [0] * len(counts), [1.0], 0.3), sum(counts))
    assert drawn.tolist() == expected.tolist()
    smallest = int(np.argmin(counts))
    assert drawn[smallest] > counts[smallest], "the smallest language is upsampled"
    assert loader.info.language_probabilities[languages[smallest]] > counts[smallest] / sum(counts)


def test_data_directories_are_blended_by_weight(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path, prepared_dir: Path
) -> None:
    other = prepare_small(tmp_path / "german", [corpus_dir / "de"], small_tokenizer).output
    loader = PretrainLoader([prepared_dir, other], batch_size=1, weights=[1.0, 3.0], return_indices=True, seed=8)
    located = loader.locate(np.arange(loader.samples_per_epoch))
    first_rows = loader.info.rows - sum(s.rows for s in loader.manifests[1].shards_of("train"))
    share_of_other = float(np.mean(located.row_ids >= first_rows))
    assert abs(share_of_other - 0.75) < 1e-3
    with pytest.raises(ConfigError, match="weights"):
        PretrainLoader([prepared_dir, other], batch_size=1, weights=[1.0])


def test_state_from_other_settings_is_refused(prepared_dir: Path) -> None:
    state = PretrainLoader(prepared_dir, batch_size=2, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        PretrainLoader(prepared_dir, batch_size=2, seed=2).load_state_dict(state)
    unshuffled = PretrainLoader(prepared_dir, batch_size=2, seed=1, shuffle=False)
    with pytest.raises(ConfigError, match="other data"):
        unshuffled.load_state_dict(state)
    state["samples_consumed"] = 10
    unshuffled.load_state_dict(state, strict=False)
    assert unshuffled.samples_consumed == 10


def test_loader_refuses_a_missing_manifest(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    (data / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json does not exist"):
        PretrainLoader(data, batch_size=2)


def test_loader_refuses_a_deleted_shard(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    victim = sorted((data / "shards").glob("train-*.arrow"))[1]
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name} is missing"):
        PretrainLoader(data, batch_size=2)


def test_loader_refuses_a_truncated_shard(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    victim = sorted((data / "shards").glob("train-*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ShardError, match=victim.name):
        PretrainLoader(data, batch_size=2)


def test_loader_refuses_a_bit_flipped_shard_when_it_reads_the_row(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    victim = sorted((data / "shards").glob("train-*.arrow"))[0]
    raw = bytearray(victim.read_bytes())
    raw[1000] ^= 0x10  # inside the first record batch's token data: same size, footer intact
    victim.write_bytes(bytes(raw))
    loader = PretrainLoader(data, batch_size=8, shuffle=False, max_epochs=1)
    with pytest.raises(ShardError, match=f"{victim.name}: row \\d+ does not match its checksum"):
        for _ in loader:
            pass


def test_loader_refuses_another_tokenizer(tmp_path: Path, prepared_dir: Path, corpus_dir: Path) -> None:
    from data_pipeline.corpus import ReaderConfig, resolve_inputs
    from data_pipeline.prepare import train_tokenizer_for
    from data_pipeline.tokenizer import TokenizerTrainingConfig

    files = resolve_inputs([str(corpus_dir / "de")], ReaderConfig())
    other = train_tokenizer_for(files, ReaderConfig(), TokenizerTrainingConfig(vocab_size=500), tmp_path / "tok", False)
    with pytest.raises(TokenizerError, match="is not the one the shards"):
        PretrainLoader(prepared_dir, batch_size=2, tokenizer=other.path)
    data = copy_dataset(prepared_dir, tmp_path / "data")
    (data / "spm.model").write_bytes(other.path.read_bytes())
    with pytest.raises(TokenizerError, match="changed after the shards were made"):
        PretrainLoader(data, batch_size=2)
    with pytest.raises(DataPipelineError, match="nope.model cannot be read: No such file"):
        PretrainLoader(prepared_dir, batch_size=2, tokenizer=tmp_path / "nope.model")


def test_loader_settings_are_validated(prepared_dir: Path) -> None:
    with pytest.raises(ConfigError, match="rank"):
        PretrainLoader(prepared_dir, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        PretrainLoader(prepared_dir, batch_size=0)
    with pytest.raises(ConfigError, match="split"):
        PretrainLoader(prepared_dir, batch_size=1, split="test")
