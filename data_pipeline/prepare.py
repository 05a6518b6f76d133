"""Corpus to verified shards: ``dv3 data prepare``, ``dv3 data train-tokenizer`` and ``dv3 data merge``.

Layout of a prepared directory::

    DIR/spm.model                     the tokenizer (trained here, or a copy of the one given)
    DIR/spm.json                      how it was trained (reused on a rerun with the same corpus)
    DIR/shards/<split>-<lang>-pPPPPP-NNNNN.arrow
    DIR/parts/part-PPPPP-of-NNNNN.json  one per finished part
    DIR/manifest.json                 written last; only it makes the shards a dataset

Work is split into parts (``num_parts``, input files assigned to parts by size). One process may
prepare every part in turn (the default, one part) or one part of a job array (``part=I``); then
:func:`merge` checks every part's shards and writes the manifest. A part is the unit of resumption:
a rerun skips parts whose part manifest matches the inputs and settings, and redoes any other part
from a clean start (its leftover shards and temporary files removed). Nothing is ever half-accepted:
a shard is renamed into place only when complete, a part counts only once its part manifest is
written, and the dataset only once ``manifest.json`` is.

``overwrite`` deletes only what prepare writes (the manifest, part manifests, shards and its own
temporary files; ``spm.model`` is replaced or reused by the tokenizer step) and refuses, before
deleting anything, a directory that holds any other file. A write that fails (the output is a file,
read-only, or the disk is full) ends in an :class:`OutputError` naming the path, with partial files
removed and everything written before left as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.corpus import CorpusStats, Document, DocumentReader, InputFile, ReaderConfig, resolve_inputs
from data_pipeline.default_corpus import DEFAULT_CORPORA, default_corpus_inputs
from data_pipeline.errors import (
    ConfigError,
    CorpusError,
    DataPipelineError,
    ManifestError,
    OutputError,
    TokenizerError,
)
from data_pipeline.packing import PACKINGS, Packer
from data_pipeline.shards import (
    MANIFEST_NAME,
    SHARD_DIR,
    SPLITS,
    TEMPORARY_PREFIX,
    TOKENIZER_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    TokenizerInfo,
    dataset_file,
    file_sha256,
    is_disk_full,
    output_error,
    read_manifest,
    temporary_path,
    unlisted_shards,
    verify_shards,
    write_bytes_atomic,
    write_json_atomic,
)
from data_pipeline.tokenizer import (
    SentencePieceTokenizer,
    TokenizerTrainingConfig,
    default_num_threads,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
TOKENIZER_RECORD = "spm.json"
_WRITE_CHECK = "write-check"
# Names of everything prepare writes, per folder (the temporary ones end in ".<pid>").
_OWN_TOP = re.compile(rf"({re.escape(MANIFEST_NAME)}|{re.escape(TOKENIZER_NAME)}|{re.escape(TOKENIZER_RECORD)})")
_OWN_TOP_TEMPORARY = re.compile(rf"{re.escape(TEMPORARY_PREFIX)}({_OWN_TOP.pattern}|{_WRITE_CHECK})\.\d+")
_OWN_SHARD = re.compile(r"(train|validation)-.+-p\d{5}-\d{5}\.arrow")
_OWN_PART = re.compile(r"part-\d{5}-of-\d{5}\.json")
SHARD_BYTES = 64 << 20  # default shard size
RECORD_BATCH_BYTES = 8 << 20  # default record batch size
_ENCODE_BATCH_DOCUMENTS = 1024
_ENCODE_BATCH_CHARS = 8 << 20


def rows_for_bytes(size: int, seq_len: int) -> int:
    """Rows of ``seq_len`` int32 tokens in about ``size`` bytes (at least one)."""
    return max(1, size // (4 * seq_len))


@dataclass(frozen=True)
class PrepareConfig:
    """Everything ``dv3 data prepare`` needs; validated on construction."""

    output: Path
    inputs: tuple[str, ...] = ()  # files, directories, globs; empty = the default corpus
    default_corpus: str = "english"  # "english" or "multilingual", used when inputs is empty
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    tokenizer: Path | None = None  # an existing spm.model; None = train one (or reuse DIR/spm.model)
    training: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    seq_len: int = 512
    packing: str = "stream"
    validation_fraction: float = 0.01  # share of documents held out as split="validation"
    split_seed: int = 0  # which documents are held out is a hash of (split_seed, file key, document index)
    rows_per_shard: int | None = None  # None: 64 MiB of rows (32768 at seq_len 512, 2048 at 8192)
    record_batch_rows: int | None = None  # None: 8 MiB of rows (4096 at seq_len 512, 256 at 8192)
    num_parts: int = 1
    part: int | None = None  # prepare only this part (a job array task); None = every part, then merge
    num_threads: int = 0  # tokenization threads; 0 = every core this process may use
    overwrite: bool = False  # replace a dataset in ``output`` prepared from other inputs or settings
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.default_corpus not in DEFAULT_CORPORA:
            raise ConfigError(f"default_corpus must be one of {list(DEFAULT_CORPORA)}, got {self.default_corpus!r}")
        if not 8 <= self.seq_len <= 1 << 16:
            raise ConfigError(f"seq_len must be in [8, 65536], got {self.seq_len}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing must be one of {list(PACKINGS)}, got {self.packing!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        # Sized in bytes, so long rows do not make huge record batches (the writer buffers one per
        # language and split) or gigabyte shards.
        if self.rows_per_shard is None:
            object.__setattr__(self, "rows_per_shard", rows_for_bytes(SHARD_BYTES, self.seq_len))
        if self.record_batch_rows is None:
            object.__setattr__(self, "record_batch_rows", rows_for_bytes(RECORD_BATCH_BYTES, self.seq_len))
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be positive, got {self.rows_per_shard}")
        if not 1 <= self.record_batch_rows:
            raise ConfigError(f"record_batch_rows must be positive, got {self.record_batch_rows}")
        if self.num_parts < 1:
            raise ConfigError(f"num_parts must be positive, got {self.num_parts}")
        if self.part is not None and not 0 <= self.part < self.num_parts:
            raise ConfigError(f"part must be in [0, num_parts={self.num_parts}), got {self.part}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0 (0 = all cores), got {self.num_threads}")
        if self.overwrite and self.part is not None and self.num_parts > 1:
            raise ConfigError(
                "overwrite cannot be combined with part: each task of the job array would delete the others' work; "
                "empty the output directory once before the job array instead"
            )

    def settings(self) -> dict:
        """What determines the shards' contents (besides the input files and the tokenizer)."""
        return {
            "reader": asdict(self.reader),
            "seq_len": self.seq_len,
            "packing": self.packing,
            "validation_fraction": self.validation_fraction,
            "split_seed": self.split_seed,
            "rows_per_shard": self.rows_per_shard,
            "record_batch_rows": self.record_batch_rows,
            "num_parts": self.num_parts,
        }


@dataclass
class PrepareResult:
    output: Path
    manifest: Manifest | None  # None when only some parts of a job array were prepared
    parts_prepared: list[int]
    parts_reused: list[int]
    message: str


# ----------------------------------------------------------------------------------------------
# Inputs and fingerprints


def corpus_files(config: PrepareConfig) -> list[InputFile]:
    if config.inputs:
        return resolve_inputs(config.inputs, config.reader)
    return default_corpus_inputs(config.default_corpus)


def _describe_files(files: Sequence[InputFile]) -> list[dict]:
    described = []
    for file in files:
        stat = file.path.stat()
        described.append(
            {
                "key": file.key,
                "format": file.format,
                "language": file.language,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        )
    return described


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def corpus_fingerprint(files: Sequence[InputFile], reader: ReaderConfig) -> str:
    return _digest({"files": _describe_files(files), "reader": asdict(reader)})


def assign_parts(files: Sequence[InputFile], num_parts: int) -> list[list[InputFile]]:
    """Input files per part, balanced by size (largest first onto the lightest part); deterministic."""
    parts: list[list[InputFile]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    order = sorted(range(len(files)), key=lambda i: (-files[i].size, files[i].key))
    for index in order:
        lightest = min(range(num_parts), key=lambda p: (loads[p], p))
        parts[lightest].append(files[index])
        loads[lightest] += files[index].size
    position = {id(file): i for i, file in enumerate(files)}
    return [sorted(part, key=lambda file: position[id(file)]) for part in parts]


def part_manifest_path(output: Path, part: int, num_parts: int) -> Path:
    return output / PARTS_DIR / f"part-{part:05d}-of-{num_parts:05d}.json"


def _shard_name(split: str, language: str, part: int, index: int) -> str:
    return f"{split}-{language}-p{part:05d}-{index:05d}.arrow"


def _is_validation(split_seed: int, key: str, index: int, fraction: float) -> bool:
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{split_seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


# ----------------------------------------------------------------------------------------------
# Tokenizer


def progress_bar(enabled: bool, **kwargs):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(disable=None, dynamic_ncols=True, **kwargs)


def _read_all(files: Sequence[InputFile], reader: DocumentReader, bar) -> Iterator[Document]:  # noqa: ANN001
    update = bar.update if bar is not None else None
    for file in files:
        yield from reader.read(file, update)


def train_tokenizer_for(
    files: Sequence[InputFile],
    reader_config: ReaderConfig,
    training: TokenizerTrainingConfig,
    output: Path,
    progress: bool = True,
) -> SentencePieceTokenizer:
    """Train ``output/spm.model`` on ``files`` and record how in ``output/spm.json``; reuse an existing
    one trained on the same files with the same settings."""
    ensure_output_dir(output)
    model_path = output / TOKENIZER_NAME
    record_path = output / TOKENIZER_RECORD
    source = {"corpus": corpus_fingerprint(files, reader_config), "training": training.to_dict()}
    if model_path.exists() and record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            record = {}
        if record.get("source") == source and record.get("sha256") == file_sha256(model_path):
            logger.info("reusing %s (trained on the same corpus with the same settings)", model_path)
            return SentencePieceTokenizer(model_path)
    check_writable(output)
    parts_dir = output / PARTS_DIR
    if (output / MANIFEST_NAME).exists() or (parts_dir.exists() and any(parts_dir.glob("part-*.json"))):
        raise TokenizerError(
            f"{output} holds shards made with its current {TOKENIZER_NAME}; training another would orphan them: "
            "train into an empty directory, or use `dv3 data prepare ... --overwrite` to rebuild the dataset"
        )
    total = sum(file.size for file in files)
    bar = progress_bar(progress, total=total, unit="B", unit_scale=True, desc="reading corpus for the tokenizer")
    stats = CorpusStats()
    try:
        documents = _read_all(files, DocumentReader(reader_config, stats), bar)
        tokenizer, summary = train_tokenizer(documents, training, model_path)
    finally:
        if bar is not None:
            bar.close()
    record = {"sha256": tokenizer.sha256, "num_pieces": tokenizer.num_pieces, "source": source, **summary}
    write_json_atomic(record_path, record)
    return tokenizer


def _install_tokenizer(given: Path, output: Path, overwrite: bool) -> SentencePieceTokenizer:
    """Check ``given`` and place a copy at ``output/spm.model`` (it may already be that file)."""
    tokenizer = SentencePieceTokenizer(given)
    target = output / TOKENIZER_NAME
    if target.exists():
        if target.resolve() == given.resolve():
            return tokenizer
        existing = file_sha256(target)
        if existing == tokenizer.sha256:
            return SentencePieceTokenizer(target)
        if not overwrite:
            raise TokenizerError(
                f"{target} exists and differs from --tokenizer {given} (sha256 {existing[:12]} vs "
                f"{tokenizer.sha256[:12]}); pass --overwrite to replace the dataset in {output}"
            )
    write_bytes_atomic(target, Path(given).read_bytes())  # a few MB at most
    (output / TOKENIZER_RECORD).unlink(missing_ok=True)
    return SentencePieceTokenizer(target)


def _tokenizer_source(config: PrepareConfig, files: Sequence[InputFile]) -> dict:
    """What decides the tokenizer, known before any training: a given file's hash, or how to train."""
    if config.tokenizer is not None:
        if not config.tokenizer.is_file():
            raise TokenizerError(f"--tokenizer {config.tokenizer} does not exist")
        return {"file_sha256": file_sha256(config.tokenizer)}
    if config.part is not None and config.num_parts > 1:
        existing = config.output / TOKENIZER_NAME
        if not existing.is_file():
            raise TokenizerError(
                f"preparing part {config.part} of {config.num_parts} needs the tokenizer fixed beforehand, and "
                f"{existing} does not exist: run `dv3 data train-tokenizer ... --output {config.output}` first "
                "(or pass --tokenizer)"
            )
        return {"file_sha256": file_sha256(existing)}
    return {"corpus": corpus_fingerprint(files, config.reader), "training": config.training.to_dict()}


def _tokenizer_info(tokenizer: SentencePieceTokenizer) -> TokenizerInfo:
    return TokenizerInfo(
        file=TOKENIZER_NAME,
        sha256=tokenizer.sha256,
        num_pieces=tokenizer.num_pieces,
        vocab_size=tokenizer.vocab_size,
        mask_token_id=tokenizer.mask_token_id,
        normalization=tokenizer.normalization,
        byte_fallback=tokenizer.byte_fallback,
    )


# ----------------------------------------------------------------------------------------------
# Prepare


def prepare(config: PrepareConfig) -> PrepareResult:
    """Prepare the shards of ``config.inputs`` (or the default corpus) in ``config.output``."""
    output = config.output
    ensure_output_dir(output)
    files = corpus_files(config)
    if not files:
        raise CorpusError("the inputs hold no files")
    settings = config.settings()
    settings_fingerprint = _digest(
        {"files": _describe_files(files), "settings": settings, "tokenizer": _tokenizer_source(config, files)}
    )

    if (output / MANIFEST_NAME).exists():
        existing = _readable_manifest(output / MANIFEST_NAME)
        if (
            existing is not None
            and existing.settings.get("fingerprint") == settings_fingerprint
            and (_tokenizer_unchanged(output, existing))
        ):
            message = f"{output} already holds this dataset ({existing.rows} rows); nothing to do"
            logger.info(message)
            return PrepareResult(output, existing, [], list(range(config.num_parts)), message)
        if not config.overwrite:
            fix = (
                "empty it once before the job array (--overwrite cannot be combined with --part)"
                if config.part is not None and config.num_parts > 1
                else "pass --overwrite to replace it"
            )
            raise ManifestError(
                f"{output} already holds a dataset prepared from other inputs or settings; {fix}, or choose "
                "another --output"
            )
    check_writable(output)
    if config.overwrite:
        foreign = foreign_files(output)
        if foreign:
            shown = ", ".join(str(path.relative_to(output)) for path in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise OutputError(
                f"--overwrite deletes only what dv3 data prepare wrote, and {output} also holds {shown}{more}; "
                "nothing was deleted: move those away or choose another --output"
            )
        _clear_dataset(output)

    if config.tokenizer is not None:
        tokenizer = _install_tokenizer(config.tokenizer, output, config.overwrite)
    elif config.part is not None and config.num_parts > 1:
        tokenizer = SentencePieceTokenizer(output / TOKENIZER_NAME)
    else:
        tokenizer = train_tokenizer_for(files, config.reader, config.training, output, config.progress)
    fingerprint = _digest({"settings": settings_fingerprint, "tokenizer": tokenizer.sha256})

    assignment = assign_parts(files, config.num_parts)
    parts = [config.part] if config.part is not None else list(range(config.num_parts))
    prepared, reused = [], []
    for part in parts:
        if _part_is_complete(output, part, config.num_parts, fingerprint):
            logger.info("part %d of %d is already prepared; reusing it", part, config.num_parts)
            reused.append(part)
            continue
        _prepare_part(config, part, assignment[part], tokenizer, fingerprint, settings_fingerprint)
        prepared.append(part)

    if config.part is not None and config.num_parts > 1:
        done = [p for p in range(config.num_parts) if part_manifest_path(output, p, config.num_parts).exists()]
        corpus = read_manifest(part_manifest_path(output, config.part, config.num_parts)).corpus
        message = (
            f"part {config.part} of {config.num_parts} is prepared ({len(done)} of {config.num_parts} parts done); "
            f"run `dv3 data merge {output}` once every part has finished"
            f"{skipped_summary(corpus, config.reader.text_field)}"
        )
        return PrepareResult(output, None, prepared, reused, message)
    manifest = merge(output, verify=False)
    message = (
        f"prepared {output}: {manifest.rows} rows ({manifest.tokens} tokens) of {config.seq_len} tokens in "
        f"{len(manifest.shards)} shards{skipped_summary(manifest.corpus, config.reader.text_field)}"
    )
    return PrepareResult(output, manifest, prepared, reused, message)


def skipped_summary(corpus: dict, text_field: str = "text") -> str:
    """``"; skipped ..."`` for what reading the corpus left out (empty when nothing was)."""
    parts = []
    if corpus.get("malformed_records"):
        parts.append(
            f"{corpus['malformed_records']} JSONL line(s) that are not a JSON object with a string field {text_field!r}"
        )
    if corpus.get("empty_documents"):
        parts.append(f"{corpus['empty_documents']} empty document(s)")
    if corpus.get("skipped_files"):
        parts.append(f"{len(corpus['skipped_files'])} file(s) that are not text")
    return f"; skipped {', '.join(parts)} (counted in manifest.json 'corpus')" if parts else ""


def ensure_output_dir(output: Path) -> None:
    """Create ``output`` if needed; refuse a path that is a file."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file, not a directory: choose a directory (it is left as it was)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, output, "nothing was written") from error


def check_writable(output: Path) -> None:
    """Write and remove a small file in ``output``, so a read-only directory is refused before any
    long work (training a tokenizer, tokenizing) and before anything is deleted."""
    probe = temporary_path(output / _WRITE_CHECK)
    try:
        with open(probe, "wb") as stream:
            stream.write(b"\0")
            stream.flush()
        probe.unlink()
    except OSError as error:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise output_error(error, output, "nothing was written") from error


def foreign_files(output: Path) -> list[Path]:
    """Files and folders in ``output`` that prepare did not write (what --overwrite must not delete)."""
    foreign = []
    for entry in sorted(output.iterdir()):
        name = entry.name
        if entry.is_file() and (_OWN_TOP.fullmatch(name) or _OWN_TOP_TEMPORARY.fullmatch(name)):
            continue
        if name in (SHARD_DIR, PARTS_DIR) and entry.is_dir() and not entry.is_symlink():
            pattern = _OWN_SHARD if name == SHARD_DIR else _OWN_PART
            for child in sorted(entry.iterdir()):
                own = (
                    child.is_file()
                    and not child.is_symlink()
                    and (pattern.fullmatch(child.name) or _is_own_temporary(child.name, pattern))
                )
                if not own:
                    foreign.append(child)
            continue
        foreign.append(entry)
    return foreign


def _is_own_temporary(name: str, pattern: re.Pattern) -> bool:
    if not name.startswith(TEMPORARY_PREFIX):
        return False
    stem, _, pid = name[len(TEMPORARY_PREFIX) :].rpartition(".")
    return pid.isdigit() and pattern.fullmatch(stem) is not None


def _readable_manifest(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except ManifestError:
        return None


def _tokenizer_unchanged(output: Path, manifest: Manifest) -> bool:
    path = output / TOKENIZER_NAME
    return path.exists() and file_sha256(path) == manifest.tokenizer.sha256


def _clear_dataset(output: Path) -> None:
    """Remove a previous dataset (only files prepare writes; :func:`foreign_files` was checked):
    manifest first, so no manifest ever names a shard being replaced."""
    try:
        (output / MANIFEST_NAME).unlink(missing_ok=True)
        for folder in (PARTS_DIR, SHARD_DIR):
            if (output / folder).is_dir():
                for file in (output / folder).iterdir():
                    file.unlink(missing_ok=True)
        for file in output.iterdir():
            if _OWN_TOP_TEMPORARY.fullmatch(file.name):
                file.unlink(missing_ok=True)
    except OSError as error:
        raise output_error(error, Path(error.filename or output), "delete the old dataset by hand") from error


def _part_is_complete(output: Path, part: int, num_parts: int, fingerprint: str) -> bool:
    path = part_manifest_path(output, part, num_parts)
    if not path.exists():
        return False
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return False
    if manifest.fingerprint != fingerprint:
        return False
    for shard in manifest.shards:
        file = output / shard.file
        if not file.exists() or file.stat().st_size != shard.bytes:
            return False
    return True


def _remove_part_files(output: Path, part: int, num_parts: int) -> None:
    """Leftovers of an earlier, unfinished or different run of this part (none of them is recorded)."""
    part_manifest_path(output, part, num_parts).unlink(missing_ok=True)
    shard_dir = output / SHARD_DIR
    if not shard_dir.exists():
        return
    tag = f"-p{part:05d}-"
    for file in shard_dir.iterdir():
        if tag in file.name and (_OWN_SHARD.fullmatch(file.name) or _is_own_temporary(file.name, _OWN_SHARD)):
            file.unlink(missing_ok=True)


class _PartWriter:
    """Packs and writes the rows of one part: one packer and one open shard per (language, split)."""

    def __init__(self, config: PrepareConfig, part: int) -> None:
        self.config = config
        self.part = part
        self.shard_dir = config.output / SHARD_DIR
        self.packers: dict[tuple[str, str], Packer] = {}
        self.writers: dict[tuple[str, str], ShardWriter] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.shards: list[ShardInfo] = []

    def add(self, language: str, split: str, ids: Sequence[int]) -> None:
        key = (language, split)
        packer = self.packers.get(key)
        if packer is None:
            packer = self.packers[key] = Packer(self.config.seq_len, self.config.packing)
        self._write(key, packer.add(ids))

    def _write(self, key: tuple[str, str], rows: np.ndarray) -> None:
        while len(rows):
            writer = self.writers.get(key)
            if writer is None:
                index = self.counts.get(key, 0)
                self.counts[key] = index + 1
                path = self.shard_dir / _shard_name(key[1], key[0], self.part, index)
                writer = self.writers[key] = ShardWriter(path, self.config.seq_len, self.config.record_batch_rows)
            room = self.config.rows_per_shard - writer.buffered_rows
            writer.write(rows[:room])
            rows = rows[room:]
            if writer.buffered_rows >= self.config.rows_per_shard:
                self.shards.append(writer.close(key[0], key[1], self.part))
                del self.writers[key]

    def finish(self) -> list[ShardInfo]:
        for key, packer in self.packers.items():
            self._write(key, packer.finish())
        for key, writer in list(self.writers.items()):
            self.shards.append(writer.close(key[0], key[1], self.part))
            del self.writers[key]
        return self.shards

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def _prepare_part(
    config: PrepareConfig,
    part: int,
    files: Sequence[InputFile],
    tokenizer: SentencePieceTokenizer,
    fingerprint: str,
    settings_fingerprint: str,
) -> Manifest:
    output = config.output
    try:
        _remove_part_files(output, part, config.num_parts)
        (output / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (output / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, Path(error.filename or output), "nothing of this part was written") from error
    stats = CorpusStats()
    reader = DocumentReader(config.reader, stats)
    writer = _PartWriter(config, part)
    tally = _DocumentTally(stats)
    num_threads = config.num_threads or default_num_threads()
    total = sum(file.size for file in files)
    description = "tokenizing" if config.num_parts == 1 else f"tokenizing part {part}/{config.num_parts}"
    bar = progress_bar(config.progress, total=total, unit="B", unit_scale=True, desc=description)
    try:
        batch: list[Document] = []
        batch_chars = 0
        for document in _read_all(files, reader, bar):
            batch.append(document)
            batch_chars += len(document.text)
            if len(batch) >= _ENCODE_BATCH_DOCUMENTS or batch_chars >= _ENCODE_BATCH_CHARS:
                _encode_batch(batch, tokenizer, num_threads, writer, tally, config)
                batch, batch_chars = [], 0
        if batch:
            _encode_batch(batch, tokenizer, num_threads, writer, tally, config)
        tally.flush()
        shards = writer.finish()
    except BaseException as error:
        writer.abort()
        # Unrecorded shards of this part would only be redone by a rerun; give their space back now.
        try:
            _remove_part_files(output, part, config.num_parts)
        except OSError:
            logger.warning("could not remove the unfinished shards of part %d in %s", part, output / SHARD_DIR)
        if isinstance(error, OSError):
            raise _part_write_error(error, output, part) from error
        raise
    finally:
        if bar is not None:
            bar.close()
    if not shards and config.num_parts == 1:
        raise CorpusError(_empty_corpus_message(files, stats))
    manifest = Manifest(
        seq_len=config.seq_len,
        packing=config.packing,
        tokenizer=_tokenizer_info(tokenizer),
        shards=shards,
        corpus=stats.to_dict(),
        fingerprint=fingerprint,
        settings={
            **config.settings(),
            "fingerprint": settings_fingerprint,
            "inputs": list(config.inputs) or [f"default:{config.default_corpus}"],
        },
        num_parts=config.num_parts,
        part=part,
    )
    write_json_atomic(part_manifest_path(output, part, config.num_parts), manifest.to_dict())
    logger.info("part %d of %d: %d rows in %d shards", part, config.num_parts, manifest.rows, len(shards))
    return manifest


def _part_write_error(error: OSError, output: Path, part: int) -> DataPipelineError:
    """One line for an OSError while a part was read and written."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    culprit = Path(error.filename) if error.filename else output / SHARD_DIR
    if is_disk_full(error):
        return OutputError(
            f"no space left while writing shards to {output / SHARD_DIR} ({reason}); part {part}'s unfinished "
            "shards were removed and nothing was recorded: free space and rerun the same command"
        )
    if not culprit.resolve().is_relative_to(output.resolve()):
        return CorpusError(f"cannot read {culprit}: {reason}")
    return OutputError(
        f"cannot write {culprit}: {reason}; part {part}'s unfinished shards were removed and nothing was recorded"
    )


def _empty_corpus_message(files: Sequence[InputFile], stats: CorpusStats) -> str:
    details = [f"{len(files)} file(s)", f"{stats.empty_documents} empty document(s) skipped"]
    if stats.skipped_files:
        details.append(f"{len(stats.skipped_files)} file(s) skipped as not text")
    if stats.malformed_records:
        details.append(f"{stats.malformed_records} malformed record(s)")
    return "the corpus is empty: no document has any text (" + ", ".join(details) + ")"


class _DocumentTally:
    """Counts each document once in the corpus statistics, summing the pieces of a document cut for
    length (its pieces arrive one after another)."""

    def __init__(self, stats: CorpusStats) -> None:
        self.stats = stats
        self._current: list | None = None  # [source, index, language, characters, tokens, split]

    def add(self, document: Document, tokens: int, split: str) -> None:
        current = self._current
        if current is not None and current[0] == document.source and current[1] == document.index:
            current[3] += len(document.text)
            current[4] += tokens
            return
        self.flush()
        self._current = [document.source, document.index, document.language, len(document.text), tokens, split]

    def flush(self) -> None:
        if self._current is not None:
            _, _, language, characters, tokens, split = self._current
            self.stats.count_document(language, characters, tokens, split)
            self._current = None


def _encode_batch(
    batch: Sequence[Document],
    tokenizer: SentencePieceTokenizer,
    num_threads: int,
    writer: _PartWriter,
    tally: _DocumentTally,
    config: PrepareConfig,
) -> None:
    encoded = tokenizer.encode([document.text for document in batch], num_threads=num_threads)
    for document, ids in zip(batch, encoded, strict=True):
        # Every piece of a document goes to the same split: the choice hashes the document, not the piece.
        held_out = _is_validation(config.split_seed, document.source, document.index, config.validation_fraction)
        split = "validation" if held_out else "train"
        tally.add(document, len(ids), split)
        if ids:
            writer.add(document.language, split, ids)


# ----------------------------------------------------------------------------------------------
# Merge


def merge(output: str | os.PathLike, *, verify: bool = True, num_threads: int = 0, progress: bool = False) -> Manifest:
    """Check that every part is present and consistent, verify their shards (sha256 and row checksums
    when ``verify``; size and footer otherwise) and write ``manifest.json``."""
    output = Path(output)
    parts_dir = output / PARTS_DIR
    paths = sorted(parts_dir.glob("part-*-of-*.json")) if parts_dir.exists() else []
    if not paths:
        raise ManifestError(f"{parts_dir} holds no part manifests: run `dv3 data prepare ... --output {output}` first")
    manifests = [read_manifest(path) for path in paths]
    num_parts = {manifest.num_parts for manifest in manifests}
    if len(num_parts) != 1:
        raise ManifestError(
            f"{parts_dir} mixes part manifests of different --num-parts ({sorted(num_parts)}); remove the stale ones "
            "or prepare again with --overwrite"
        )
    (count,) = num_parts
    by_part = {manifest.part: manifest for manifest in manifests}
    missing = [p for p in range(count) if p not in by_part]
    if missing:
        raise ManifestError(
            f"{len(missing)} of {count} parts are not prepared yet (parts {_ranges(missing)}); run them with "
            f"`dv3 data prepare ... --num-parts {count} --part I` and merge again"
        )
    reference = by_part[0]
    for part, manifest in sorted(by_part.items()):
        if manifest.fingerprint != reference.fingerprint:
            raise ManifestError(
                f"part {part} was prepared from other inputs, settings or tokenizer than part 0; prepare it again "
                "with the same command line as the others"
            )
    tokenizer_path = dataset_file(output, reference.tokenizer.file, "tokenizer.file")
    if not tokenizer_path.exists():
        raise TokenizerError(f"{tokenizer_path} is missing; the parts were tokenized with it")
    if file_sha256(tokenizer_path) != reference.tokenizer.sha256:
        raise TokenizerError(
            f"{tokenizer_path} changed after the parts were tokenized with it (sha256 differs from the part manifests)"
        )
    shards = [shard for part in range(count) for shard in by_part[part].shards]
    shards.sort(key=lambda shard: (SPLITS.index(shard.split), shard.language, shard.part, shard.file))
    if not any(shard.split == "train" for shard in shards):
        stats = CorpusStats()
        for manifest in manifests:
            stats.merge(CorpusStats.from_dict(manifest.corpus))
        raise CorpusError(
            _empty_corpus_message([], stats)
            if not shards
            else "every document went to the validation split; lower --validation-fraction"
        )
    stray = unlisted_shards(output, shards)
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise ManifestError(
            f"{output} holds {len(stray)} shard file(s) that no part manifest lists ({shown}): leftovers of another "
            "run would mix two datasets; no manifest written: remove them, or prepare again with --overwrite"
        )
    bar = progress_bar(progress, total=sum(s.bytes for s in shards), unit="B", unit_scale=True, desc="verifying")
    try:
        report = verify_shards(
            output,
            shards,
            reference.seq_len,
            full=verify,
            num_threads=num_threads or default_num_threads(),
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    if not report.ok:
        raise ManifestError(
            f"{len(report.bad)} shard(s) failed verification, no manifest written: "
            + "; ".join(reason for _, reason in report.bad)
        )
    stats = CorpusStats()
    for part in range(count):
        stats.merge(CorpusStats.from_dict(by_part[part].corpus))
    settings = dict(reference.settings)
    manifest = Manifest(
        seq_len=reference.seq_len,
        packing=reference.packing,
        tokenizer=reference.tokenizer,
        shards=shards,
        corpus=stats.to_dict(),
        fingerprint=reference.fingerprint,
        settings=settings,
        num_parts=count,
        part=None,
    )
    write_json_atomic(output / MANIFEST_NAME, manifest.to_dict())
    return manifest


def _ranges(numbers: Sequence[int]) -> str:
    spans, start, previous = [], None, None
    for number in numbers:
        if start is None:
            start = previous = number
        elif number == previous + 1:
            previous = number
        else:
            spans.append((start, previous))
            start = previous = number
    if start is not None:
        spans.append((start, previous))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ----------------------------------------------------------------------------------------------
# Train the tokenizer alone (before a job array)


def train_tokenizer_only(config: PrepareConfig) -> SentencePieceTokenizer:
    """``dv3 data train-tokenizer``: train ``output/spm.model`` on the inputs (all of them), once,
    before the parts of a job array tokenize with it."""
    files = corpus_files(config)
    if not files:
        raise CorpusError("the inputs hold no files")
    return train_tokenizer_for(files, config.reader, config.training, config.output, config.progress)
