"""Builders the data tests share: small real corpora, a small tokenizer, prepared datasets.

Real text only: English Wikipedia articles from gensim's test data and fortunes from Debian's
fortunes-* packages (both installed by scripts/bootstrap.sh). Everything expensive is built once
per session and cached here; tests/conftest.py wraps the builders in session fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.corpus import DocumentReader, InputFile, ReaderConfig
from data_pipeline.default_corpus import default_corpus_inputs

SEQ_LEN = 64
_CACHE: dict[str, object] = {}


def _cached(name: str, build):  # noqa: ANN001, ANN202
    if name not in _CACHE:
        _CACHE[name] = build()
    return _CACHE[name]


def wikipedia_articles(count: int = 40) -> list[str]:
    """The first ``count`` cleaned English Wikipedia articles of gensim's test data."""

    def build() -> list[str]:
        reader = DocumentReader(ReaderConfig())
        texts = []
        for document in reader.read(default_corpus_inputs("english")[0]):
            if document.piece == 0:
                texts.append(document.text)
            if len(texts) == 60:
                break
        return texts

    return _cached("wikipedia", build)[:count]


FORTUNE_FILES = {
    "de": "/usr/share/games/fortunes/de/witze",
    "ru": "/usr/share/games/fortunes/ru/2001.03",
    "zh": "/usr/share/games/fortunes/tang300",
    "es": "/usr/share/games/fortunes/es/refranes.fortunes",
}


def fortunes(language: str, count: int = 200) -> list[str]:
    def build() -> list[str]:
        path = Path(FORTUNE_FILES[language])
        if not path.exists():
            pytest.fail(f"{path} is missing: install Debian's fortunes packages (scripts/bootstrap.sh)")
        reader = DocumentReader(ReaderConfig())
        return [d.text for d in reader.read(InputFile(path, "fortune", language, path.name))]

    return _cached(f"fortunes-{language}", build)[:count]


def write_corpus(root: Path, documents_by_language: dict[str, list[str]], files_per_language: int = 2) -> Path:
    """A ``root/<lang>/part-N.txt`` corpus, documents separated by blank lines."""
    root.mkdir(parents=True, exist_ok=True)
    for language, documents in documents_by_language.items():
        directory = root / language
        directory.mkdir(exist_ok=True)
        for index in range(files_per_language):
            chunk = documents[index::files_per_language]
            # Blank lines inside a document would split it: fold them away.
            text = "\n\n".join("\n".join(line for line in doc.split("\n") if line.strip()) for doc in chunk)
            (directory / f"part-{index}.txt").write_text(text + "\n", encoding="utf-8")
    return root


def multilingual_documents() -> dict[str, list[str]]:
    return {
        "en": wikipedia_articles(12),
        "de": fortunes("de", 300),
        "ru": fortunes("ru", 150),
        "zh": fortunes("zh", 60),
    }


def build_corpus(factory: pytest.TempPathFactory) -> Path:
    """A small multilingual corpus in the ``corpus/<lang>/`` layout (built once per session)."""
    return _cached("corpus_dir", lambda: write_corpus(factory.mktemp("corpus") / "corpus", multilingual_documents()))


def build_tokenizer(factory: pytest.TempPathFactory) -> Path:
    """A 3000-piece unigram model trained on :func:`build_corpus`."""

    def build() -> Path:
        from data_pipeline.prepare import PrepareConfig, train_tokenizer_only
        from data_pipeline.tokenizer import TokenizerTrainingConfig

        config = PrepareConfig(
            output=factory.mktemp("tokenizer"),
            inputs=(str(build_corpus(factory)),),
            training=TokenizerTrainingConfig(vocab_size=3000, input_sentence_size=20000),
            progress=False,
        )
        return train_tokenizer_only(config).path

    return _cached("small_tokenizer", build)


def prepare_small(output: Path, inputs, tokenizer: Path | None, **overrides):  # noqa: ANN001, ANN201
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer import TokenizerTrainingConfig

    settings = {
        "seq_len": SEQ_LEN,
        "rows_per_shard": 40,
        "record_batch_rows": 16,
        "validation_fraction": 0.05,
        "progress": False,
        "training": TokenizerTrainingConfig(vocab_size=3000, input_sentence_size=20000),
    }
    settings.update(overrides)
    config = PrepareConfig(output=output, inputs=tuple(str(i) for i in inputs), tokenizer=tokenizer, **settings)
    return prepare(config)


def build_prepared(factory: pytest.TempPathFactory) -> Path:
    """:func:`build_corpus` prepared with :func:`build_tokenizer`: 64-token rows, 40-row shards, 5% held
    out. Read-only: tests that damage data work on a copy (:func:`copy_dataset`)."""
    return _cached(
        "prepared_dir",
        lambda: (
            prepare_small(factory.mktemp("prepared") / "data", [build_corpus(factory)], build_tokenizer(factory)).output
        ),
    )


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def read_rows(data_dir: Path, shard_file: str) -> np.ndarray:
    """A shard's ``input_ids`` read with plain pyarrow, independently of the loader."""
    import pyarrow as pa

    with pa.memory_map(str(data_dir / shard_file)) as source:
        table = pa.ipc.open_file(source).read_all()
    return np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)


def all_rows(data_dir: Path, split: str = "train") -> np.ndarray:
    """Every row of a split in manifest order (the loader's row ids number them the same way)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    rows = [read_rows(data_dir, s["file"]) for s in manifest["shards"] if s["split"] == split]
    return np.concatenate(rows)
