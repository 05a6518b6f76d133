"""Corpus readers: files, directories and globs of text, JSONL, Parquet, MediaWiki XML and fortune files.

Every reader yields :class:`Document` objects and keeps :class:`CorpusStats` up to date. Bad
input is survived and counted, never a crash: invalid UTF-8 is replaced (and counted), empty
documents are skipped (and counted), files that are not text are skipped with a warning and
recorded. A compressed input (``.gz``, ``.bz2``, ``.xz``) is read through its decompressor.

Languages come from ``ReaderConfig.language`` when set, otherwise from a ``corpus/<lang>/...``
directory layout (a two- or three-letter code, optionally with a region or script subtag, right
under a directory input; or the name of the directory input or of a file's parent directory when
it is a two-letter code), otherwise ``und`` (undetermined).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import logging
import lzma
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from data_pipeline.errors import ConfigError, CorpusError

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "mediawiki", "fortune")
TEXT_UNITS = ("block", "line")
UNDETERMINED_LANGUAGE = "und"

_COMPRESSED_OPENERS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    ".xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
}
_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xml": "mediawiki",
}
# A language directory right under a directory input: "en", "zh-Hans", "pt_BR", "yue".
_LANGUAGE_DIR = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?$")
# A directory input's own name, or a file's parent, must be stricter ("src", "tmp" are not languages).
_LANGUAGE_NAME = re.compile(r"^[a-z]{2}(?:[-_][A-Za-z0-9]{2,8})?$")
_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*$")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SNIFF_BYTES = 64 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


def validate_language_tag(tag: str, field_name: str = "language") -> str:
    if not _LANGUAGE_TAG.match(tag):
        raise ConfigError(f"{field_name} must be a language tag like 'en', 'de' or 'zh-Hans', got {tag!r}")
    return tag


@dataclass(frozen=True)
class ReaderConfig:
    """How to turn files into documents."""

    format: str = "auto"  # "auto" picks by extension: .jsonl/.json/.ndjson, .parquet/.pq, .xml, else text
    text_unit: str = "block"  # plain text: "block" = blank-line separated paragraphs, "line" = one per line
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    language: str | None = None  # one language for every input; None = from the directory layout
    max_document_chars: int = 1_000_000  # longer documents are cut (at whitespace) into consecutive pieces

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"format must be 'auto' or one of {list(FORMATS)}, got {self.format!r}")
        if self.text_unit not in TEXT_UNITS:
            raise ConfigError(f"text_unit must be one of {list(TEXT_UNITS)}, got {self.text_unit!r}")
        if not self.text_field:
            raise ConfigError("text_field must be a non-empty field/column name")
        if self.language is not None:
            validate_language_tag(self.language)
        if self.max_document_chars < 1024:
            raise ConfigError(f"max_document_chars must be at least 1024, got {self.max_document_chars}")


@dataclass(frozen=True)
class InputFile:
    """One file to read. ``key`` is its stable name (path relative to its input) used to assign its
    documents to train/validation, so the split does not depend on where the corpus is mounted."""

    path: Path
    format: str
    language: str
    key: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Document:
    text: str
    language: str
    source: str  # InputFile.key
    index: int  # position of the document in its file (the pieces of a cut document share it)
    piece: int = 0  # position of this piece in a document cut for length


@dataclass
class CorpusStats:
    """What reading (and tokenizing) the corpus found; stored in the manifest."""

    files: int = 0
    bytes: int = 0  # bytes read from disk (compressed size for compressed files)
    documents: int = 0  # documents kept
    empty_documents: int = 0  # skipped: nothing but whitespace
    invalid_utf8_documents: int = 0  # documents in which invalid UTF-8 was replaced
    invalid_utf8_replacements: int = 0  # replacement characters inserted
    split_documents: int = 0  # documents longer than max_document_chars, cut into pieces
    malformed_records: int = 0  # JSONL lines that are not JSON objects with the text field
    skipped_files: list[dict] = field(default_factory=list)  # {"file", "reason"}
    languages: dict[str, dict[str, int]] = field(default_factory=dict)  # per language: documents, characters, tokens
    document_tokens_histogram: dict[str, int] = field(default_factory=dict)  # "<=2^k" buckets of tokens per document

    def count_document(self, language: str, characters: int, tokens: int, split: str) -> None:
        entry = self.languages.setdefault(
            language, {"documents": 0, "characters": 0, "tokens": 0, "train_documents": 0, "validation_documents": 0}
        )
        entry["documents"] += 1
        entry["characters"] += characters
        entry["tokens"] += tokens
        entry[f"{split}_documents"] += 1
        bucket = histogram_bucket(tokens)
        self.document_tokens_histogram[bucket] = self.document_tokens_histogram.get(bucket, 0) + 1

    def merge(self, other: CorpusStats) -> None:
        for name in (
            "files",
            "bytes",
            "documents",
            "empty_documents",
            "invalid_utf8_documents",
            "invalid_utf8_replacements",
            "split_documents",
            "malformed_records",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped_files.extend(other.skipped_files)
        for language, counts in other.languages.items():
            entry = self.languages.setdefault(language, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                entry[key] = entry.get(key, 0) + value
        for bucket, count in other.document_tokens_histogram.items():
            self.document_tokens_histogram[bucket] = self.document_tokens_histogram.get(bucket, 0) + count

    def to_dict(self) -> dict:
        histogram = dict(sorted(self.document_tokens_histogram.items(), key=lambda item: _bucket_order(item[0])))
        return {
            "files": self.files,
            "bytes": self.bytes,
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "invalid_utf8_documents": self.invalid_utf8_documents,
            "invalid_utf8_replacements": self.invalid_utf8_replacements,
            "split_documents": self.split_documents,
            "malformed_records": self.malformed_records,
            "skipped_files": list(self.skipped_files),
            "languages": {key: dict(value) for key, value in sorted(self.languages.items())},
            "document_tokens_histogram": histogram,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CorpusStats:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def histogram_bucket(value: int) -> str:
    """Power-of-two bucket label: ``"<=1"``, ``"<=2"``, ``"<=4"``, ..."""
    return f"<={1 << max(0, int(value) - 1).bit_length()}"


def _bucket_order(label: str) -> int:
    return int(label[2:])


# ----------------------------------------------------------------------------------------------
# Resolving inputs


def resolve_inputs(inputs: Sequence[str | os.PathLike], config: ReaderConfig) -> list[InputFile]:
    """Expand files, directories (recursively; hidden files skipped) and globs into ``InputFile``s,
    sorted within each input and de-duplicated across inputs."""
    if not inputs:
        raise CorpusError("no input given")
    files: list[InputFile] = []
    seen: set[Path] = set()
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            for file in _walk(path):
                relative = file.relative_to(path)
                _add(files, seen, file, relative.as_posix(), _layout_language(path, relative, config), config)
        elif path.is_file():
            _add(files, seen, path, path.name, _file_language(path, config), config)
        elif _GLOB_CHARS.search(text):
            matches = sorted(Path(match) for match in glob.glob(text, recursive=True))
            matches = [match for match in matches if match.is_file()]
            if not matches:
                raise CorpusError(f"input {text!r} matches no file")
            base = Path(_glob_base(text))
            for file in matches:
                try:
                    key = file.relative_to(base).as_posix()
                except ValueError:
                    key = file.name
                _add(files, seen, file, key, _file_language(file, config), config)
        else:
            raise CorpusError(f"input {text!r} does not exist")
    return files


def _add(files: list[InputFile], seen: set[Path], path: Path, key: str, language: str, config: ReaderConfig) -> None:
    resolved = path.resolve()
    if resolved in seen:
        return
    seen.add(resolved)
    files.append(InputFile(path=path, format=detect_format(path, config.format), language=language, key=key))


def _walk(root: Path) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                file = Path(directory) / name
                if file.is_file():
                    yield file


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    base = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        base.append(part)
    return str(Path(*base)) if base else "."


def _layout_language(root: Path, relative: Path, config: ReaderConfig) -> str:
    if config.language:
        return config.language
    if len(relative.parts) > 1 and _LANGUAGE_DIR.match(relative.parts[0]):
        return relative.parts[0]
    name = root.resolve().name
    return name if _LANGUAGE_NAME.match(name) else UNDETERMINED_LANGUAGE


def _file_language(path: Path, config: ReaderConfig) -> str:
    if config.language:
        return config.language
    parent = path.resolve().parent.name
    return parent if _LANGUAGE_NAME.match(parent) else UNDETERMINED_LANGUAGE


def _strip_compression(name: str) -> tuple[str, str | None]:
    lower = name.lower()
    for suffix in _COMPRESSED_OPENERS:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def detect_format(path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    stem, _ = _strip_compression(path.name)
    return _FORMAT_BY_SUFFIX.get(Path(stem).suffix.lower(), "text")


# ----------------------------------------------------------------------------------------------
# Reading


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from disk, so progress bars advance on compressed files too."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - memoryview/bytearray
        n = self._raw.readinto(buffer)
        if n and self._progress is not None:
            self._progress(n)
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path, progress: Callable[[int], None] | None = None) -> BinaryIO:
    """Open ``path`` for reading decompressed bytes, whatever its compression suffix says."""
    raw = io.BufferedReader(_CountingReader(open(path, "rb"), progress), buffer_size=1 << 20)
    _, suffix = _strip_compression(path.name)
    if suffix is None:
        return raw
    return io.BufferedReader(_COMPRESSED_OPENERS[suffix](raw), buffer_size=1 << 20)


def decode_utf8(raw: bytes, stats: CorpusStats) -> tuple[str, int]:
    """Decode, replacing invalid UTF-8; returns the text and the number of replacements."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # A replacement character that was already in the input is valid UTF-8 (EF BF BD).
        replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        stats.invalid_utf8_replacements += replaced
        return text, replaced


def _head(path: Path, size: int) -> bytes:
    """The first ``size`` decompressed bytes; a file that cannot be read is an error, not a skip."""
    try:
        with open_binary(path) as stream:
            return stream.read(size)
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise CorpusError(f"cannot read {path}: {error} (truncated or corrupt file?)") from error


def _not_text_reason(path: Path) -> str | None:
    """Why ``path`` does not look like UTF-8 text (NUL bytes, mostly undecodable), or None."""
    head = _head(path, _SNIFF_BYTES)
    if b"\x00" in head:
        return "holds NUL bytes (binary, or UTF-16 text; convert it to UTF-8)"
    if head:
        decoded = head.decode("utf-8", errors="replace")
        bad = decoded.count("\ufffd") - head.count(b"\xef\xbf\xbd")
        if bad > 0.3 * len(decoded):
            return f"is not UTF-8 text ({bad} of its first {len(decoded)} characters do not decode)"
    return None


def _not_xml_reason(path: Path) -> str | None:
    """XML may be UTF-16 (the parser reads its byte order mark), so only its first character is checked."""
    head = _head(path, 4096)
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            head = head[len(bom) :].decode(encoding, errors="replace").encode("utf-8")
            break
    if not head.lstrip().startswith(b"<"):
        return "is not XML (a MediaWiki dump starts with '<')"
    return None


def _not_parquet_reason(path: Path) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        return f"is not a readable Parquet file ({error})"
    return None


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, at whitespace where possible."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start + max_chars // 2, end))
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [piece for piece in pieces if piece.strip()]


class DocumentReader:
    """Reads the documents of input files, updating one :class:`CorpusStats`."""

    def __init__(self, config: ReaderConfig, stats: CorpusStats | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else CorpusStats()

    def read(self, file: InputFile, progress: Callable[[int], None] | None = None) -> Iterator[Document]:
        """Documents of ``file`` in order. A file that is not text is skipped (warned, recorded)."""
        if file.format not in FORMATS:
            raise ConfigError(f"unknown format {file.format!r} for {file.path}")
        sniff = {"parquet": _not_parquet_reason, "mediawiki": _not_xml_reason}.get(file.format, _not_text_reason)
        reason = sniff(file.path)
        if reason is not None:
            self._skip(file, reason, progress)
            return
        self.stats.files += 1
        self.stats.bytes += file.size
        readers = {
            "text": self._read_text,
            "jsonl": self._read_jsonl,
            "parquet": self._read_parquet,
            "mediawiki": self._read_mediawiki,
            "fortune": self._read_fortune,
        }
        index = -1
        piece = 0
        counted_split = counted_utf8 = False
        try:
            for text, replaced, continued in readers[file.format](file, progress):
                if not continued:
                    if not text.strip():
                        self.stats.empty_documents += 1
                        continue
                    self.stats.documents += 1
                    index, piece = index + 1, 0
                    counted_split = counted_utf8 = False
                pieces = split_long_text(text, self.config.max_document_chars)
                if (continued or len(pieces) > 1) and not counted_split:
                    self.stats.split_documents += 1
                    counted_split = True
                if replaced and not counted_utf8:
                    self.stats.invalid_utf8_documents += 1
                    counted_utf8 = True
                for text_piece in pieces:
                    yield Document(text=text_piece, language=file.language, source=file.key, index=index, piece=piece)
                    piece += 1
        except (OSError, EOFError, lzma.LZMAError) as error:
            raise CorpusError(f"cannot read {file.path}: {error} (truncated or corrupt file?)") from error

    def _skip(self, file: InputFile, reason: str, progress: Callable[[int], None] | None) -> None:
        logger.warning("skipping %s: it %s", file.path, reason)
        self.stats.skipped_files.append({"file": str(file.path), "reason": reason})
        if progress is not None:
            progress(file.size)

    # Each reader yields (text, replacements, continued) for every document, empty ones included;
    # ``continued`` marks the next bounded piece of a document too large to hold at once.

    def _lines(self, file: InputFile, progress) -> Iterator[tuple[str, int]]:
        with open_binary(file.path, progress) as stream:
            first = True
            for raw in stream:
                text, replaced = decode_utf8(raw, self.stats)
                if first:
                    text = text.removeprefix("\ufeff")
                    first = False
                yield text.rstrip("\r\n"), replaced

    def _read_text(self, file: InputFile, progress) -> Iterator[tuple[str, int, bool]]:
        if self.config.text_unit == "line":
            for line, replaced in self._lines(file, progress):
                yield line, replaced, False
            return
        block: list[str] = []
        size = 0
        replaced_in_block = 0
        continuing = False
        for line, replaced in self._lines(file, progress):
            if line.strip():
                block.append(line)
                size += len(line) + 1
                replaced_in_block += replaced
                if size < self.config.max_document_chars:
                    continue
                # A block without blank lines can be arbitrarily large: emit it in bounded pieces.
                yield "\n".join(block), replaced_in_block, continuing
                block, size, replaced_in_block, continuing = [], 0, 0, True
                continue
            if block:
                yield "\n".join(block), replaced_in_block, continuing
            block, size, replaced_in_block, continuing = [], 0, 0, False
        if block:
            yield "\n".join(block), replaced_in_block, continuing

    def _read_fortune(self, file: InputFile, progress) -> Iterator[tuple[str, int, bool]]:
        entry: list[str] = []
        replaced_in_entry = 0
        for line, replaced in self._lines(file, progress):
            if line.strip() == "%":
                yield _ANSI_ESCAPE.sub("", "\n".join(entry)), replaced_in_entry, False
                entry, replaced_in_entry = [], 0
            else:
                entry.append(line)
                replaced_in_entry += replaced
        if entry:
            yield _ANSI_ESCAPE.sub("", "\n".join(entry)), replaced_in_entry, False

    def _read_jsonl(self, file: InputFile, progress) -> Iterator[tuple[str, int, bool]]:
        field_name = self.config.text_field
        for number, (line, replaced) in enumerate(self._lines(file, progress), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get(field_name), str | type(None)):
                self._malformed(file, number, f"not a JSON object with a string field {field_name!r}")
                continue
            if field_name not in record:
                self._malformed(file, number, f"no field {field_name!r}")
                continue
            yield record[field_name] or "", replaced, False

    def _malformed(self, file: InputFile, line: int, reason: str) -> None:
        self.stats.malformed_records += 1
        if self.stats.malformed_records <= 10:
            logger.warning("skipping %s line %d: %s", file.path, line, reason)

    def _read_parquet(self, file: InputFile, progress) -> Iterator[tuple[str, int, bool]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file.path)
        column = self.config.text_field
        names = parquet.schema_arrow.names
        if column not in names:
            raise CorpusError(f"{file.path} has no column {column!r} (columns: {', '.join(names)}); use --text-field")
        if not pa.types.is_string(parquet.schema_arrow.field(column).type) and not pa.types.is_large_string(
            parquet.schema_arrow.field(column).type
        ):
            raise CorpusError(
                f"column {column!r} of {file.path} is {parquet.schema_arrow.field(column).type}, not a string column"
            )
        groups = max(1, parquet.num_row_groups)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=[column])
            for value in table.column(0).to_pylist():
                yield value or "", 0, False
            if progress is not None:
                progress(file.size // groups)

    def _read_mediawiki(self, file: InputFile, progress) -> Iterator[tuple[str, int, bool]]:
        import xml.etree.ElementTree as ElementTree

        try:
            with open_binary(file.path, progress) as stream:
                for _, element in ElementTree.iterparse(stream, events=("end",)):
                    if _local_name(element.tag) != "page":
                        continue
                    namespace = element.find("{*}ns")
                    text = element.find("{*}revision/{*}text")
                    wikitext = (text.text if text is not None else None) or ""
                    is_article = namespace is None or (namespace.text or "0").strip() == "0"
                    is_redirect = element.find("{*}redirect") is not None or wikitext.lstrip().upper().startswith(
                        "#REDIRECT"
                    )
                    element.clear()
                    if is_article and not is_redirect:
                        yield clean_wikitext(wikitext), 0, False
        except ElementTree.ParseError as error:
            raise CorpusError(f"{file.path} is not valid MediaWiki XML: {error}") from error


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# ----------------------------------------------------------------------------------------------
# Wiki markup

# Trailing sections that are lists of links and citations rather than prose.
_WIKI_TAIL = re.compile(
    r"^==+\s*(See also|References|Notes|External links|Further reading|Bibliography|Sources|Citations|Footnotes)"
    r"\s*==+\s*$",
    re.M | re.I,
)
_WIKI_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*?>.*?</ref\s*>", re.S | re.I)
_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
_WIKI_NON_TEXT_LINKS = ("file:", "image:", "category:", "media:")
_WIKI_IMAGE_LINE = re.compile(
    r"^\s*(?:\[\[\s*(?:File|Image):|(?:thumb|thumbnail|frame|frameless|left|right|center|upright[=0-9.]*)\|)", re.I
)


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: references, comments, tables, files, categories and the
    trailing link/citation sections removed; templates dropped; links reduced to their text."""
    try:
        import mwparserfromhell
    except ImportError as error:
        raise CorpusError(
            "reading MediaWiki XML needs mwparserfromhell: pip install mwparserfromhell (or pip install -e '.[corpus]')"
        ) from error
    tail = _WIKI_TAIL.search(wikitext)
    if tail:
        wikitext = wikitext[: tail.start()]
    wikitext = _WIKI_REF.sub("", _WIKI_COMMENT.sub("", wikitext))
    wikitext = _drop_wiki_tables(wikitext)
    code = mwparserfromhell.parse(wikitext)
    # Filtering the top-level node list is linear; Wikicode.remove searches the tree for each node.
    code.nodes = [
        node
        for node in code.nodes
        if not (
            isinstance(node, mwparserfromhell.nodes.Wikilink)
            and str(node.title).strip().lower().startswith(_WIKI_NON_TEXT_LINKS)
        )
    ]
    text = code.strip_code(normalize=True, collapse=True)
    # Image captions whose link the parser could not close survive as "thumb|..." lines.
    lines = [line.strip() for line in text.split("\n") if not _WIKI_IMAGE_LINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _drop_wiki_tables(wikitext: str) -> str:
    kept = []
    depth = 0
    for line in wikitext.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)
