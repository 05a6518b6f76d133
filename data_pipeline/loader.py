"""The distributed, exactly resumable pretraining loader.

``PretrainLoader`` reads prepared shards (memory-mapped, zero-copy) and yields batches per rank:

- Samples form one endless global stream ``k = 0, 1, 2, ...`` (see :mod:`data_pipeline.sampling`);
  global step ``t`` is samples ``[t * G, (t + 1) * G)`` with ``G = batch_size * world_size``, and
  rank ``r`` takes the ``r``-th run of ``batch_size`` of them. Ranks are disjoint and together read
  every sample of an epoch once.
- The state is the number of samples consumed, in global terms: ``load_state_dict`` resumes
  exactly, also with another world size as long as the global batch is the same.
- Several data directories are blended with weights; within a directory languages are sampled
  with probability proportional to ``p_i ** alpha``.
- With a :class:`MaskingConfig`, batches are masked dynamically, reproducibly from the seed, the
  epoch and each sample's global index.
- On open it checks every manifest, the tokenizer's hash and each shard's size, footer, schema and
  row count; every row read is checked against its CRC-32, so a shard changed since the manifest
  is a clear error, never garbage batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import ConfigError, ManifestError, ShardError, TokenizerError
from data_pipeline.masking import MaskingConfig, mask_batch
from data_pipeline.sampling import EpochPlan, source_probabilities
from data_pipeline.shards import (
    SPLITS,
    Manifest,
    OpenShard,
    ShardInfo,
    dataset_file,
    file_sha256,
    load_manifest,
    open_shard,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_LANGUAGE_ALPHA = 0.3
_INDEX_CHUNK_BATCHES = 64  # batches whose rows are located in one vectorized call


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about the data: shapes, vocabulary, special ids, tokenizer."""

    data_dirs: tuple[Path, ...]
    split: str
    seq_len: int
    vocab_size: int  # pieces + [MASK]
    num_pieces: int
    mask_token_id: int
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    unk_token_id: int
    tokenizer_path: Path  # spm.model; DebertaV2Tokenizer.from_pretrained(tokenizer_path.parent) reads it
    tokenizer_sha256: str
    packing: str
    rows: int  # rows of the split across the data directories
    tokens: int  # non-padding tokens in those rows
    samples_per_epoch: int
    language_probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def special_token_ids(self) -> tuple[int, int, int]:
        """Ids never masked: ``[PAD]``, ``[CLS]``, ``[SEP]`` (``[MASK]`` is excluded separately)."""
        return (self.pad_token_id, self.cls_token_id, self.sep_token_id)


def dataset_info(data_dir: str | os.PathLike, split: str = "train") -> DatasetInfo:
    """The :class:`DatasetInfo` of one prepared directory, from its manifest alone (no shard opened)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    shards = manifest.shards_of(split)
    counts: dict[str, int] = {}
    for shard in shards:
        counts[shard.language] = counts.get(shard.language, 0) + shard.rows
    total = sum(counts.values())
    return _info(
        (data_dir,), split, manifest, shards, total, {k: v / total for k, v in counts.items()} if total else {}
    )


def _info(dirs, split, manifest: Manifest, shards, samples_per_epoch, probabilities) -> DatasetInfo:  # noqa: ANN001
    tok = manifest.tokenizer
    return DatasetInfo(
        data_dirs=tuple(dirs),
        split=split,
        seq_len=manifest.seq_len,
        vocab_size=tok.vocab_size,
        num_pieces=tok.num_pieces,
        mask_token_id=tok.mask_token_id,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        unk_token_id=tok.unk_token_id,
        tokenizer_path=dataset_file(dirs[0], tok.file, "tokenizer.file"),
        tokenizer_sha256=tok.sha256,
        packing=manifest.packing,
        rows=sum(shard.rows for shard in shards),
        tokens=sum(shard.tokens for shard in shards),
        samples_per_epoch=samples_per_epoch,
        language_probabilities=dict(sorted(probabilities.items())),
    )


@dataclass
class _Source:
    """One language of one data directory: the unit of blending."""

    dir_index: int
    language: str
    shard_ids: list[int]  # indices into the loader's shard list
    starts: np.ndarray  # first source row of each shard, plus the total


@dataclass
class _BatchIndex:
    """Which rows make one rank's batch: computed in the main process, read by a worker."""

    samples: np.ndarray  # global sample indices; -1 where the stream has ended (a padding row)
    epochs: np.ndarray
    shard_ids: np.ndarray
    rows: np.ndarray  # row within the shard
    row_ids: np.ndarray  # global row id (dataset-wide), -1 for padding


class _ShardReader:
    """Gathers rows from memory-mapped shards; opens each shard lazily, once per process."""

    def __init__(self, shards: Sequence[tuple[Path, ShardInfo]], seq_len: int, verify_rows: bool) -> None:
        self.shards = list(shards)
        self.seq_len = seq_len
        self.verify_rows = verify_rows
        self._open: dict[int, OpenShard] = {}

    def __getstate__(self) -> dict:
        # Memory maps do not travel to worker processes: each opens its own.
        return {"shards": self.shards, "seq_len": self.seq_len, "verify_rows": self.verify_rows, "_open": {}}

    def shard(self, index: int) -> OpenShard:
        opened = self._open.get(index)
        if opened is None:
            data_dir, info = self.shards[index]
            opened = self._open[index] = open_shard(data_dir, info, self.seq_len)
        return opened

    def gather(self, shard_ids: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy the requested rows into ``out`` (int64 ``[n, seq_len]``), checking each row's CRC-32."""
        for i, (shard_id, row) in enumerate(zip(shard_ids.tolist(), rows.tolist(), strict=True)):
            if shard_id < 0:
                continue
            shard = self.shard(shard_id)
            batch = int(np.searchsorted(shard.batch_starts, row, side="right")) - 1
            offset = row - int(shard.batch_starts[batch])
            values = shard.input_ids[batch][offset]
            if self.verify_rows and zlib.crc32(values) != int(shard.crc32[batch][offset]):
                raise ShardError(
                    f"shard {shard.path}: row {row} does not match its checksum; the shard changed since the "
                    "manifest was written (bit rot or tampering): run `dv3 data verify` and prepare the data again"
                )
            out[i] = values


class _BatchBuilder:
    """Turns a :class:`_BatchIndex` into tensors (and masks them); runs in the loader's process or a worker."""

    def __init__(
        self, reader: _ShardReader, info: DatasetInfo, masking: MaskingConfig | None, seed: int, return_indices: bool
    ) -> None:
        self.reader = reader
        self.info = info
        self.masking = masking
        self.seed = seed
        self.return_indices = return_indices

    def arrays(self, index: _BatchIndex) -> dict[str, np.ndarray]:
        """The batch as numpy arrays: what a worker sends back (pickled through a pipe, which is much
        cheaper than torch's per-tensor shared-memory segments for batches this size)."""
        ids = np.zeros((len(index.samples), self.info.seq_len), dtype=np.int64)
        self.reader.gather(index.shard_ids, index.rows, ids)
        attention_mask = (ids != self.info.pad_token_id).astype(np.int64)
        batch = {"input_ids": ids, "attention_mask": attention_mask}
        if self.masking is not None:
            epochs = np.unique(index.epochs)
            if len(epochs) == 1:
                masked, labels = self._mask(ids, attention_mask, index.samples, int(epochs[0]))
            else:  # a batch straddling an epoch boundary is masked per epoch (masks change each epoch)
                masked, labels = np.empty_like(ids), np.empty_like(ids)
                for epoch in epochs:
                    members = index.epochs == epoch
                    masked[members], labels[members] = self._mask(
                        ids[members], attention_mask[members], index.samples[members], int(epoch)
                    )
            batch["masked_input_ids"] = masked
            batch["mlm_labels"] = labels
        if self.masking is not None or self.return_indices:
            batch["sample_index"] = index.samples.astype(np.int64)
        if self.return_indices:
            batch["row_index"] = index.row_ids.astype(np.int64)
        return batch

    def _mask(
        self, ids: np.ndarray, attention_mask: np.ndarray, samples: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        result = mask_batch(
            ids,
            attention_mask,
            samples,
            seed=self.seed,
            epoch=epoch,
            config=self.masking,
            mask_token_id=self.info.mask_token_id,
            vocab_size=self.info.vocab_size,
            special_token_ids=self.info.special_token_ids,
            unk_token_id=self.info.unk_token_id,
        )
        return result.masked_input_ids.numpy(), result.mlm_labels.numpy()

    def __call__(self, index: _BatchIndex) -> dict[str, torch.Tensor]:
        return _to_tensors(self.arrays(index))


def _to_tensors(arrays: dict[str, np.ndarray], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    if pin_memory:
        tensors = {key: value.pin_memory() for key, value in tensors.items()}
    return tensors


# Token ids and labels fit int32 (vocabularies are far below 2**31): workers send them at half the
# size, and the attention mask not at all (the receiving process derives it from the ids).
_COMPACTED = ("input_ids", "masked_input_ids", "mlm_labels")


def _compact(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {key: value.astype(np.int32) if key in _COMPACTED else value for key, value in batch.items()}
    del out["attention_mask"]
    return out


def _expand(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    input_ids = batch["input_ids"].astype(np.int64)
    out = {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).astype(np.int64)}
    for key, value in batch.items():
        if key != "input_ids":
            out[key] = value.astype(np.int64) if key in _COMPACTED else value
    return out


def _keep(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """collate_fn of the worker DataLoader: leave the numpy arrays alone (no tensors in workers)."""
    return batch


class _WorkerDataset(torch.utils.data.Dataset):
    """Map-style dataset for torch's DataLoader: the 'index' is a whole :class:`_BatchIndex`."""

    def __init__(self, builder: _BatchBuilder) -> None:
        self.builder = builder

    def __getitem__(self, index: _BatchIndex) -> dict[str, np.ndarray]:
        return _compact(self.builder.arrays(index))


class PretrainLoader:
    """Batches of pretraining data for one rank; an endless iterator (``max_epochs=None``).

    Args:
        data_dir: a prepared directory, or several to blend.
        batch_size: this rank's (micro-)batch size; the global batch is ``batch_size * world_size``.
        rank, world_size: this rank and how many there are.
        seed: decides the shuffle and the masks.
        shuffle: global shuffle, new each epoch; False reads rows in manifest order.
        num_workers: worker processes building batches (0 = in this process).
        split: ``"train"`` or ``"validation"`` (the held-out shards).
        weights: one per data directory (normalized); default: proportional to their rows.
        language_alpha: languages of a directory are sampled with probability proportional to
            ``p_i ** alpha``; default 0.3 for ``train``, 1.0 (natural, every row once an epoch) for
            ``validation``.
        masking: mask batches dynamically; adds ``masked_input_ids``, ``mlm_labels``, ``sample_index``.
        tokenizer: an ``spm.model`` the data must have been tokenized with (its sha256 is checked).
        max_epochs: stop after this many epochs (the last global batch is padded with empty rows:
            ``attention_mask`` all zero, ``sample_index`` -1); None = never stop.
        pin_memory: return page-locked tensors when a CUDA device is present (faster ``.to(device)``).
        return_indices: add ``sample_index`` and ``row_index`` (the dataset-wide row id) to batches.
        verify_rows: check every row read against its CRC-32 (about 1 microsecond a row).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        split: str = "train",
        weights: Sequence[float] | None = None,
        language_alpha: float | None = None,
        masking: MaskingConfig | None = None,
        tokenizer: str | os.PathLike | None = None,
        max_epochs: int | None = None,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        return_indices: bool = False,
        verify_rows: bool = True,
    ) -> None:
        dirs = [Path(data_dir)] if isinstance(data_dir, str | os.PathLike) else [Path(d) for d in data_dir]
        if not dirs:
            raise ConfigError("data_dir must name at least one prepared directory")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if weights is not None and (len(weights) != len(dirs) or any(w <= 0 for w in weights)):
            raise ConfigError(f"weights must be {len(dirs)} positive numbers (one per data directory), got {weights}")
        alpha = language_alpha if language_alpha is not None else (DEFAULT_LANGUAGE_ALPHA if split == "train" else 1.0)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"language_alpha must be in [0, 1], got {alpha}")
        if max_epochs is not None and max_epochs < 1:
            raise ConfigError(f"max_epochs must be positive or None, got {max_epochs}")
        if masking is not None and not isinstance(masking, MaskingConfig):
            raise ConfigError(f"masking must be a MaskingConfig or None, got {type(masking).__name__}")

        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.split = split
        self.language_alpha = alpha
        self.masking = masking
        self.max_epochs = max_epochs
        self.prefetch_factor = prefetch_factor
        # Pinned memory speeds up copies to a GPU; without one there is nothing to pin.
        self.pin_memory = pin_memory and torch.cuda.is_available()

        self.manifests = [load_manifest(d) for d in dirs]
        self._check_tokenizers(dirs, tokenizer)
        self._check_compatible(dirs)

        shards: list[tuple[Path, ShardInfo]] = []
        sources: list[_Source] = []
        for dir_index, (directory, manifest) in enumerate(zip(dirs, self.manifests, strict=True)):
            split_shards = manifest.shards_of(split)
            if not split_shards:
                hint = " (prepare with --validation-fraction > 0)" if split == "validation" else ""
                raise ManifestError(f"{directory} has no {split} shards{hint}")
            for language in sorted({shard.language for shard in split_shards}):
                ids, starts = [], [0]
                for shard in split_shards:
                    if shard.language == language and shard.rows > 0:
                        ids.append(len(shards))
                        shards.append((directory, shard))
                        starts.append(starts[-1] + shard.rows)
                if ids:
                    sources.append(_Source(dir_index, language, ids, np.asarray(starts, dtype=np.int64)))
        self._sources = sources
        self._reader = _ShardReader(shards, self.manifests[0].seq_len, verify_rows)
        for index in range(len(shards)):  # the cheap checks, on every shard, before any step runs
            self._reader.shard(index)
        source_rows = [int(source.starts[-1]) for source in sources]
        dir_rows = [
            sum(r for r, s in zip(source_rows, sources, strict=True) if s.dir_index == d) for d in range(len(dirs))
        ]
        group_weights = list(weights) if weights is not None else dir_rows
        probabilities = source_probabilities(source_rows, [s.dir_index for s in sources], group_weights, alpha)
        self._plan = EpochPlan.build(source_rows, probabilities, seed, shuffle)
        # Global row ids: shards in loader order, rows consecutive.
        self._shard_row_offsets = np.cumsum([0] + [info.rows for _, info in shards])
        self._source_shards = [np.asarray(s.shard_ids, dtype=np.int64) for s in sources]

        by_language: dict[str, float] = {}
        for source, probability in zip(sources, probabilities, strict=True):
            by_language[source.language] = by_language.get(source.language, 0.0) + float(probability)
        self.info = _info(
            tuple(dirs),
            split,
            self.manifests[0],
            [info for _, info in shards],
            self._plan.samples_per_epoch,
            by_language,
        )
        self._builder = _BatchBuilder(self._reader, self.info, masking, seed, return_indices)
        self._fingerprint = self._compute_fingerprint(group_weights)
        self._consumed = 0
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    # -- checks on open -------------------------------------------------------------------------

    def _check_tokenizers(self, dirs: Sequence[Path], tokenizer: str | os.PathLike | None) -> None:
        expected = file_sha256(Path(tokenizer)) if tokenizer is not None else None
        for directory, manifest in zip(dirs, self.manifests, strict=True):
            path = dataset_file(directory, manifest.tokenizer.file, "tokenizer.file")
            if not path.exists():
                raise TokenizerError(f"{path} is missing: the tokenizer the shards of {directory} were made with")
            if file_sha256(path) != manifest.tokenizer.sha256:
                raise TokenizerError(
                    f"{path} changed after the shards were made (its sha256 differs from {directory}/manifest.json); "
                    "restore it or prepare the data again"
                )
            if expected is not None and expected != manifest.tokenizer.sha256:
                raise TokenizerError(
                    f"tokenizer {tokenizer} (sha256 {expected[:12]}…) is not the one the shards of {directory} were "
                    f"made with (sha256 {manifest.tokenizer.sha256[:12]}…): the token ids would mean other words"
                )

    def _check_compatible(self, dirs: Sequence[Path]) -> None:
        first = self.manifests[0]
        for directory, manifest in zip(dirs[1:], self.manifests[1:], strict=True):
            if manifest.tokenizer.sha256 != first.tokenizer.sha256:
                raise TokenizerError(
                    f"{directory} and {dirs[0]} were tokenized with different tokenizers; cannot blend"
                )
            if manifest.seq_len != first.seq_len:
                raise ManifestError(
                    f"{directory} has seq_len {manifest.seq_len} and {dirs[0]} {first.seq_len}; cannot blend"
                )

    def _compute_fingerprint(self, weights: Sequence[float]) -> str:
        data = {
            "manifests": [m.fingerprint for m in self.manifests],
            "split": self.split,
            "weights": [float(w) for w in weights],
            "alpha": self.language_alpha,
            "shuffle": self.shuffle,
            "samples_per_epoch": self._plan.samples_per_epoch,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    # -- positions ------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def samples_per_epoch(self) -> int:
        return self._plan.samples_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Global steps in one epoch (a step can straddle two epochs)."""
        return max(1, self.samples_per_epoch // self.global_batch_size)

    @property
    def samples_consumed(self) -> int:
        """Global samples handed out so far (by all ranks together)."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """The epoch of the next sample."""
        return self._consumed // self.samples_per_epoch

    @property
    def seq_len(self) -> int:
        return self.info.seq_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def mask_token_id(self) -> int:
        return self.info.mask_token_id

    @property
    def manifest(self) -> Manifest:
        """The (first) data directory's manifest."""
        return self.manifests[0]

    def _end(self) -> int | None:
        return None if self.max_epochs is None else self.max_epochs * self.samples_per_epoch

    def __len__(self) -> int:
        end = self._end()
        if end is None:
            raise TypeError("the loader is endless (max_epochs=None); use steps_per_epoch")
        return -(-max(0, end - self._consumed) // self.global_batch_size)

    def locate(self, samples: np.ndarray) -> _BatchIndex:
        """Where global sample indices are read from (-1 marks samples past ``max_epochs``)."""
        samples = np.asarray(samples, dtype=np.int64)
        end = self._end()
        valid = samples >= 0 if end is None else (samples >= 0) & (samples < end)
        shard_ids = np.full(len(samples), -1, dtype=np.int64)
        rows = np.zeros(len(samples), dtype=np.int64)
        row_ids = np.full(len(samples), -1, dtype=np.int64)
        epochs = np.zeros(len(samples), dtype=np.int64)
        if valid.any():
            epoch, source, source_row = self._plan.locate(samples[valid])
            shard_of = np.empty(len(source), dtype=np.int64)
            row_of = np.empty(len(source), dtype=np.int64)
            for s in np.unique(source):
                members = source == s
                starts = self._sources[s].starts
                position = np.searchsorted(starts, source_row[members], side="right") - 1
                shard_of[members] = self._source_shards[s][position]
                row_of[members] = source_row[members] - starts[position]
            shard_ids[valid], rows[valid], epochs[valid] = shard_of, row_of, epoch
            row_ids[valid] = self._shard_row_offsets[shard_of] + row_of
        out_samples = np.where(valid, samples, -1)
        return _BatchIndex(out_samples, epochs, shard_ids, rows, row_ids)

    def _batch_indices(self, start: int) -> Iterator[_BatchIndex]:
        """This rank's batches from global sample ``start`` on, located a chunk of batches at a time."""
        end = self._end()
        first = start
        own = np.arange(self.batch_size, dtype=np.int64) + self.rank * self.batch_size
        while end is None or first < end:
            steps = np.arange(_INDEX_CHUNK_BATCHES, dtype=np.int64)
            if end is not None:
                steps = steps[first + steps * self.global_batch_size < end]
            samples = (first + steps[:, None] * self.global_batch_size + own[None, :]).reshape(-1)
            located = self.locate(samples)
            for i in range(len(steps)):
                part = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield _BatchIndex(
                    located.samples[part],
                    located.epochs[part],
                    located.shard_ids[part],
                    located.rows[part],
                    located.row_ids[part],
                )
            first += len(steps) * self.global_batch_size

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._batches(self._consumed)
        batch = next(self._iterator)
        self._consumed += self.global_batch_size
        return batch

    def _batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        indices = self._batch_indices(start)
        if self.num_workers == 0:
            for index in indices:
                yield _to_tensors(self._builder.arrays(index), self.pin_memory)
            return
        loader = torch.utils.data.DataLoader(
            _WorkerDataset(self._builder),
            batch_size=None,
            sampler=indices,
            collate_fn=_keep,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )
        for arrays in loader:
            yield _to_tensors(_expand(arrays, self.info.pad_token_id), self.pin_memory)

    def close(self) -> None:
        """Stop worker processes (they also stop when the loader is garbage collected)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def reset(self) -> None:
        """Back to the first sample (e.g. before another pass over the validation split)."""
        self.close()
        self._consumed = 0

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position in global terms: the same on every rank, valid for any world size."""
        return {
            "version": STATE_VERSION,
            "samples_consumed": self._consumed,
            "epoch": self.epoch,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state``: the next batch is the one an uninterrupted loader would yield next.

        A state saved for other data, blending, split, shuffle or seed is refused; with
        ``strict=False`` only its sample count is taken (e.g. to go on training on re-prepared data),
        which continues a different stream and says so in the log."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state has version {state.get('version')!r}, this loader reads {STATE_VERSION}")
        problems = []
        if state.get("fingerprint") != self._fingerprint:
            problems.append("it was saved for other data, blending, split or shuffle settings")
        if state.get("seed") != self.seed:
            problems.append(f"it was saved with seed {state.get('seed')}, this loader has seed {self.seed}")
        if problems and strict:
            raise ConfigError(
                f"loader state does not continue this loader's sample stream: {'; '.join(problems)} "
                "(load_state_dict(state, strict=False) takes only its sample count)"
            )
        if problems:
            logger.warning("loader state: %s; continuing from its sample count only", "; ".join(problems))
        consumed = int(state["samples_consumed"])
        if consumed < 0:
            raise ConfigError(f"loader state has negative samples_consumed {consumed}")
        if state.get("global_batch_size") != self.global_batch_size:
            logger.warning(
                "resuming with global batch %d (saved with %d): the samples continue exactly, the step boundaries move",
                self.global_batch_size,
                state.get("global_batch_size"),
            )
        self.close()
        self._consumed = consumed
