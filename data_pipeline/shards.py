"""Arrow IPC shards and the manifest that vouches for them.

A shard is an uncompressed Arrow IPC *file* (it has a footer) with two columns:

- ``input_ids``: ``fixed_size_list<int32>[seq_len]``, one packed sequence per row, ``[PAD]=0`` after
  the text when a row is not full;
- ``crc32``: ``uint32``, the CRC-32 of the row's ``input_ids`` bytes, so the loader can check
  every row it reads for the price of reading it and refuse a bit-flipped shard.

Rows are grouped in record batches of a few thousand. Files are written under a temporary name,
flushed to disk and renamed, so a shard with its final name is always complete; the manifest
(``manifest.json``) is written the same way and last, and it is the only thing that makes shards
count: it records every shard's file, rows, tokens, bytes, sha256, language and split, the
tokenizer's sha256 and vocabulary, the sequence length, the packing and the corpus statistics.
A manifest names only files inside its own directory: an entry that is absolute, climbs out with
``..`` or resolves outside (a symbolic link) is refused before anything is opened.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np

from data_pipeline.errors import DataPipelineError, ManifestError, OutputError, ShardError

FORMAT_NAME = "dv3-pretrain-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "spm.model"
SHARD_DIR = "shards"
SPLITS = ("train", "validation")
TEMPORARY_PREFIX = ".tmp-"


def shard_schema(seq_len: int):  # noqa: ANN201 - pyarrow.Schema, imported lazily
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("crc32", pa.uint32(), nullable=False),
        ],
        metadata={
            b"dv3.format": FORMAT_NAME.encode(),
            b"dv3.format_version": str(FORMAT_VERSION).encode(),
            b"dv3.seq_len": str(seq_len).encode(),
        },
    )


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (int32, native little-endian layout, as stored)."""
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the data directory
    rows: int
    tokens: int  # non-padding tokens, [CLS] and [SEP] included
    bytes: int
    sha256: str
    language: str
    split: str
    record_batches: int
    part: int = 0


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    sha256: str
    num_pieces: int
    vocab_size: int  # num_pieces + 1: [MASK] comes after the pieces
    mask_token_id: int
    normalization: str
    byte_fallback: bool
    pad_token_id: int = 0
    cls_token_id: int = 1
    sep_token_id: int = 2
    unk_token_id: int = 3


@dataclass
class Manifest:
    seq_len: int
    packing: str
    tokenizer: TokenizerInfo
    shards: list[ShardInfo]
    corpus: dict
    fingerprint: str  # of the inputs and settings; a rerun with the same ones reuses the result
    settings: dict = field(default_factory=dict)
    num_parts: int = 1
    part: int | None = None  # set in a part manifest (parts/part-XXXXX-of-YYYYY.json)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [shard for shard in self.shards if shard.split == split]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["totals"] = {
            split: {"shards": len(self.shards_of(split)), "rows": sum(s.rows for s in self.shards_of(split))}
            for split in SPLITS
        }
        data["totals"]["tokens"] = self.tokens
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source} is not a dv3 shard manifest (format {data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{source} has format version {version}; this dv3 reads version {FORMAT_VERSION}: "
                "prepare the data again with this version"
            )
        try:
            manifest = cls(
                seq_len=int(data["seq_len"]),
                packing=data["packing"],
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                shards=[ShardInfo(**shard) for shard in data["shards"]],
                corpus=data.get("corpus", {}),
                fingerprint=data["fingerprint"],
                settings=data.get("settings", {}),
                num_parts=int(data.get("num_parts", 1)),
                part=data.get("part"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"{source} is missing or has a malformed field: {error!r}") from error
        check_entry(manifest.tokenizer.file, "tokenizer.file", source)
        for index, shard in enumerate(manifest.shards):
            check_entry(shard.file, f"shards[{index}].file", source)
        return manifest


def check_entry(name: object, entry: str, source: str) -> None:
    """Refuse a file name from a manifest that is not a plain relative path inside its directory."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is not a file name"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        problem = "is an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        problem = "climbs out of the dataset directory with '..'"
    if problem is not None:
        raise ManifestError(
            f"{source}: {entry} {name!r} {problem}; a manifest may only name files inside its own directory, "
            "so nothing was opened (the manifest was edited or corrupted: prepare the data again)"
        )


def dataset_file(data_dir: Path, name: str, entry: str) -> Path:
    """``data_dir / name`` after checking that it resolves inside ``data_dir`` (symbolic links
    followed); ``entry`` names the manifest field in the error."""
    path = data_dir / name
    root = data_dir.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ManifestError(
            f"{data_dir / MANIFEST_NAME}: {entry} {name!r} resolves to {resolved}, outside {root} (a symbolic "
            "link?); a manifest may only name files inside its own directory, so it was not opened"
        )
    return path


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def output_error(error: OSError, path: Path, consequence: str) -> OutputError:
    """One line for a failed write of ``path``: says "no space left" when the disk (or a quota, or a
    file size limit) is full, else the system's reason."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    if is_disk_full(error):
        return OutputError(f"no space left while writing {path} ({reason}); {consequence}")
    return OutputError(f"cannot write {path}: {reason}; {consequence}")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it into place."""
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, flush it to disk, then rename it into place: a
    reader sees the old file or the whole new one, never a torn one. A failed write (no space,
    no permission) removes the temporary file and raises :class:`OutputError` naming ``path``."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # a read-only directory: nothing was created there either
            pass
        if isinstance(error, OSError):
            kept = "the previous version is unchanged" if path.exists() else "nothing was written"
            raise output_error(error, path, kept) from error
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems do not support it; the rename is still atomic
        pass
    finally:
        os.close(descriptor)


def read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"{path} does not exist: the directory holds no finished dataset "
            "(run `dv3 data prepare ... --output DIR`, or `dv3 data merge DIR` after a job array)"
        ) from None
    except OSError as error:
        raise ManifestError(f"cannot read {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); prepare the data again") from error
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a dv3 shard manifest")
    return Manifest.from_dict(data, source=str(path))


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """The manifest of a prepared data directory (``DIR/manifest.json``)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ManifestError(f"data directory {data_dir} is a file, not a directory")
    if not data_dir.is_dir():
        raise ManifestError(f"data directory {data_dir} does not exist")
    return read_manifest(data_dir / MANIFEST_NAME)


# ----------------------------------------------------------------------------------------------
# Writing


class _HashingFile:
    """A binary sink that hashes and counts what passes through it, for pyarrow's writer."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.closed = False

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        view = memoryview(data)
        self._stream.write(view)
        self.sha256.update(view)
        self.bytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        # pyarrow closes its sink when the writer closes; the shard writer closes the real file.
        self.closed = True


def _open_for_write(path: Path) -> BinaryIO:
    """Where shard bytes go; a separate function so a test can make the disk fill up."""
    return open(path, "wb")


class ShardWriter:
    """Writes one shard: rows are buffered into record batches; ``close`` flushes the file to disk
    and renames it from its temporary name, so an interrupted write never leaves a complete-looking
    shard. ``abort`` removes the temporary file."""

    def __init__(self, path: Path, seq_len: int, record_batch_rows: int) -> None:
        import pyarrow as pa

        self.path = path
        self.seq_len = seq_len
        self.record_batch_rows = record_batch_rows
        self.temporary = temporary_path(path)
        self._stream = _open_for_write(self.temporary)
        self._sink = _HashingFile(self._stream)
        self._schema = shard_schema(seq_len)
        self._writer = pa.ipc.new_file(self._sink, self._schema)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self.rows = 0
        self.tokens = 0
        self.record_batches = 0

    @property
    def buffered_rows(self) -> int:
        """Rows written or waiting for their record batch."""
        return self.rows + self._pending_rows

    def write(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.seq_len:
            raise ValueError(f"rows must be [n, {self.seq_len}], got {rows.shape}")
        self._pending.append(rows.astype(np.int32, copy=False))
        self._pending_rows += len(rows)
        while self._pending_rows >= self.record_batch_rows:
            self._flush(self.record_batch_rows)

    def _flush(self, count: int) -> None:
        import pyarrow as pa

        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        batch_rows, rest = rows[:count], rows[count:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        values = pa.array(np.ascontiguousarray(batch_rows).reshape(-1), type=pa.int32())
        column = pa.FixedSizeListArray.from_arrays(values, self.seq_len)
        checksums = pa.array(row_checksums(batch_rows), type=pa.uint32())
        self._writer.write_batch(pa.record_batch([column, checksums], schema=self._schema))
        self.rows += len(batch_rows)
        self.tokens += int(np.count_nonzero(batch_rows))
        self.record_batches += 1

    def close(self, language: str, split: str, part: int) -> ShardInfo:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.temporary, self.path)
        return ShardInfo(
            file=f"{SHARD_DIR}/{self.path.name}",
            rows=self.rows,
            tokens=self.tokens,
            bytes=self._sink.bytes,
            sha256=self._sink.sha256.hexdigest(),
            language=language,
            split=split,
            record_batches=self.record_batches,
            part=part,
        )

    def abort(self) -> None:
        try:
            self._stream.close()
        except OSError:  # the disk may be full; the file is removed regardless
            pass
        self.temporary.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Reading and checking


@dataclass
class OpenShard:
    """A memory-mapped shard: per record batch, zero-copy views of its rows and checksums."""

    info: ShardInfo
    path: Path
    input_ids: list[np.ndarray]  # [rows_in_batch, seq_len] int32 views into the mapped file
    crc32: list[np.ndarray]  # [rows_in_batch] uint32 views
    batch_starts: np.ndarray  # first row of each record batch, plus the total at the end


def open_shard(data_dir: Path, info: ShardInfo, seq_len: int) -> OpenShard:
    """Memory-map a shard after the cheap checks: it exists, its size is the manifest's, its footer
    reads, its schema and row count are right. Raises :class:`ShardError` naming the shard."""
    import pyarrow as pa

    path = dataset_file(data_dir, info.file, "shard")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"shard {info.file} is missing from {data_dir} (deleted after preparation?)") from None
    if size != info.bytes:
        raise ShardError(
            f"shard {path} is {size} bytes, the manifest says {info.bytes}: it changed since it was written "
            "(truncated or replaced); run `dv3 data verify` and prepare the data again"
        )
    try:
        mapped = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(mapped)
        if not reader.schema.equals(shard_schema(seq_len), check_metadata=False):
            raise ShardError(f"shard {path} has schema {reader.schema}, not dv3's with seq_len {seq_len}")
        input_ids, crc32, starts = [], [], [0]
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            values = batch.column(0).values.to_numpy(zero_copy_only=True)
            input_ids.append(values.reshape(batch.num_rows, seq_len))
            crc32.append(batch.column(1).to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + batch.num_rows)
    except ShardError:
        raise
    except (pa.ArrowException, OSError, ValueError) as error:
        raise ShardError(f"shard {path} cannot be read as an Arrow IPC file ({error}): it is corrupt") from error
    if starts[-1] != info.rows or reader.num_record_batches != info.record_batches:
        raise ShardError(
            f"shard {path} has {starts[-1]} rows in {reader.num_record_batches} record batches, the manifest says "
            f"{info.rows} in {info.record_batches}: it changed since it was written"
        )
    return OpenShard(info=info, path=path, input_ids=input_ids, crc32=crc32, batch_starts=np.asarray(starts))


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    @property
    def ok(self) -> bool:
        return not self.bad


def check_shard(data_dir: Path, info: ShardInfo, seq_len: int, full: bool = True) -> str | None:
    """Why ``info``'s shard does not match the manifest, or None. ``full`` also hashes the file and
    checks every row's checksum."""
    try:
        shard = open_shard(data_dir, info, seq_len)
    except (ShardError, ManifestError) as error:
        return str(error)
    if not full:
        return None
    try:
        digest = file_sha256(shard.path)
    except DataPipelineError as error:
        return str(error)
    if digest != info.sha256:
        return f"shard {shard.path} has sha256 {digest}, the manifest says {info.sha256}: its bytes changed"
    for batch, (rows, checksums) in enumerate(zip(shard.input_ids, shard.crc32, strict=True)):
        bad = np.nonzero(row_checksums(rows) != checksums)[0]
        if len(bad):
            row = int(shard.batch_starts[batch] + bad[0])
            return f"shard {shard.path}: row {row} fails its checksum"
    return None


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    except OSError as error:  # a missing --tokenizer, an unreadable shard: one line naming the file
        raise DataPipelineError(f"{path} cannot be read: {error.strerror or error}") from error
    return digest.hexdigest()


def verify_shards(
    data_dir: Path, shards: Sequence[ShardInfo], seq_len: int, *, full: bool = True, num_threads: int = 4, progress=None
) -> VerifyReport:
    """Check every shard (in parallel threads: hashing releases the GIL); collect each failure."""
    report = VerifyReport()

    def check(info: ShardInfo) -> tuple[ShardInfo, str | None]:
        return info, check_shard(data_dir, info, seq_len, full=full)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for info, reason in pool.map(check, shards):
            report.checked += 1
            if reason is not None:
                report.bad.append((info.file, reason))
            if progress is not None:
                progress(info.bytes)
    return report


def verify_dataset(
    data_dir: str | os.PathLike,
    *,
    full: bool = True,
    tokenizer: str | os.PathLike | None = None,
    num_threads: int = 4,
    progress=None,  # noqa: ANN001 - a callable taking a byte count
) -> VerifyReport:
    """Check a prepared directory against its manifest: the tokenizer's hash (and that of
    ``tokenizer`` when given), every shard (see :func:`check_shard`), and that no ``.arrow`` file
    the manifest does not list lies in the directory (a stray shard means a mixed dataset). Raises
    for a missing or unreadable manifest; returns a report listing every problem."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    report = VerifyReport()
    tokenizer_path = dataset_file(data_dir, manifest.tokenizer.file, "tokenizer.file")
    if not tokenizer_path.exists():
        report.bad.append((manifest.tokenizer.file, f"tokenizer {tokenizer_path} is missing"))
    elif file_sha256(tokenizer_path) != manifest.tokenizer.sha256:
        report.bad.append((manifest.tokenizer.file, f"tokenizer {tokenizer_path} changed since the shards were made"))
    if tokenizer is not None and file_sha256(Path(tokenizer)) != manifest.tokenizer.sha256:
        report.bad.append(
            (str(tokenizer), f"tokenizer {tokenizer} is not the one the shards were made with (sha256 differs)")
        )
    shards = verify_shards(
        data_dir, manifest.shards, manifest.seq_len, full=full, num_threads=num_threads, progress=progress
    )
    report.checked = shards.checked
    report.bad.extend(shards.bad)
    for name in unlisted_shards(data_dir, manifest.shards):
        report.bad.append(
            (
                name,
                f"{data_dir / name} is not listed in {data_dir / MANIFEST_NAME}: a shard of another dataset or "
                "run mixed into this one; remove it, or prepare the data again into an empty directory",
            )
        )
    return report


def unlisted_shards(data_dir: Path, listed: Sequence[ShardInfo]) -> list[str]:
    """``.arrow`` files under ``data_dir`` (relative, ``/``-separated) that ``listed`` does not name."""
    names = {PurePosixPath(shard.file).as_posix() for shard in listed}
    found = (path.relative_to(data_dir).as_posix() for path in data_dir.rglob("*.arrow") if path.is_file())
    return sorted(name for name in found if name not in names)
