"""``dv3 data prepare / merge / verify / stats``: shards and manifest, packing, the held-out split,
reruns, job-array parts, and every bad input (empty corpus, a file that is not text, non-UTF-8
bytes, one enormous document, damaged shards, a tokenizer mismatch, a deleted shard, a full disk,
a killed prepare, a manifest naming files outside its directory, a stray shard, skipped JSONL
lines, --overwrite next to other files, an output that is a file or read-only)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data_pipeline.shards as shards_module
from data_pipeline import PretrainLoader
from data_pipeline import errors as errors_module
from data_pipeline.cli import main as cli_main
from data_pipeline.errors import (
    ConfigError,
    CorpusError,
    DataPipelineError,
    InputError,
    ManifestError,
    OutputError,
    TokenizerError,
)
from data_pipeline.prepare import merge
from data_pipeline.shards import load_manifest, verify_dataset
from data_pipeline.tokenizer import CLS_ID, PAD_ID, SEP_ID, SentencePieceTokenizer
from tests.support.data import (
    SEQ_LEN,
    copy_dataset,
    prepare_small,
    read_rows,
    wikipedia_articles,
)
from tests.support.disk import tmpfs

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> tuple[int, str, str]:
    """``dv3 data ...`` in a fresh interpreter, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.cli", "data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout, result.stderr


def text_bodies(rows: np.ndarray) -> list[np.ndarray]:
    """Each row's tokens between [CLS] and [SEP]."""
    bodies = []
    for row in rows:
        assert row[0] == CLS_ID
        length = int(np.count_nonzero(row != PAD_ID))
        assert row[length - 1] == SEP_ID and not row[length:].any()
        bodies.append(row[1 : length - 1])
    return bodies


# -- shards and manifest -------------------------------------------------------------------------


def test_prepare_writes_tokenizer_shards_and_a_manifest_that_vouches_for_them(prepared_dir: Path) -> None:
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    assert manifest["format"] == "dv3-pretrain-shards" and manifest["format_version"] == 1
    assert manifest["seq_len"] == SEQ_LEN and manifest["packing"] == "stream"
    tokenizer = SentencePieceTokenizer(prepared_dir / "spm.model")
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.num_pieces + 1 == manifest["tokenizer"]["mask_token_id"] + 1
    assert {s["language"] for s in manifest["shards"]} == {"de", "en", "ru", "zh"}
    assert {s["split"] for s in manifest["shards"]} == {"train", "validation"}
    for shard in manifest["shards"]:
        path = prepared_dir / shard["file"]
        assert path.stat().st_size == shard["bytes"]
        assert shards_module.file_sha256(path) == shard["sha256"]
        rows = read_rows(prepared_dir, shard["file"])
        assert rows.shape == (shard["rows"], SEQ_LEN) and shard["rows"] <= 40
        assert int(np.count_nonzero(rows)) == shard["tokens"]
    corpus = manifest["corpus"]
    for language, counts in corpus["languages"].items():
        assert counts["documents"] == counts["train_documents"] + counts["validation_documents"] > 0, language
    assert sum(corpus["document_tokens_histogram"].values()) == corpus["documents"]
    assert not list(prepared_dir.rglob(".tmp-*")), "no temporary file is left behind"
    assert verify_dataset(prepared_dir).ok


def test_stream_packing_cuts_the_token_stream_into_seq_len_minus_2_pieces(
    tmp_path: Path, small_tokenizer: Path
) -> None:
    articles = wikipedia_articles(4)
    corpus = tmp_path / "en.txt"
    corpus.write_text("\n\n".join(a.replace("\n\n", "\n") for a in articles), encoding="utf-8")
    result = prepare_small(tmp_path / "data", [corpus], small_tokenizer, validation_fraction=0.0, rows_per_shard=30)
    rows = np.concatenate([read_rows(result.output, s.file) for s in result.manifest.shards])
    bodies = text_bodies(rows)
    assert all(len(body) == SEQ_LEN - 2 for body in bodies[:-1]), "only the very last row is padded"
    expected = np.concatenate(
        SentencePieceTokenizer(small_tokenizer).encode([a.replace("\n\n", "\n") for a in articles])
    )
    assert np.array_equal(np.concatenate(bodies), expected)


def test_document_packing_never_crosses_a_document_boundary(tmp_path: Path, small_tokenizer: Path) -> None:
    documents = [a.replace("\n\n", "\n") for a in wikipedia_articles(3)] + ["Short one.", "Another short one."]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    result = prepare_small(tmp_path / "data", [corpus], small_tokenizer, validation_fraction=0.0, packing="document")
    rows = np.concatenate([read_rows(result.output, s.file) for s in result.manifest.shards])
    bodies = text_bodies(rows)
    encoded = SentencePieceTokenizer(small_tokenizer).encode(documents)
    expected_bodies = [np.asarray(ids[i : i + SEQ_LEN - 2]) for ids in encoded for i in range(0, len(ids), SEQ_LEN - 2)]
    assert len(bodies) == len(expected_bodies)
    assert all(np.array_equal(a, b) for a, b in zip(bodies, expected_bodies, strict=True))
    assert result.manifest.packing == "document"


def test_held_out_documents_do_not_depend_on_the_number_of_parts(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    one = prepare_small(tmp_path / "one", [corpus_dir], small_tokenizer, validation_fraction=0.2).manifest
    three = prepare_small(tmp_path / "three", [corpus_dir], small_tokenizer, validation_fraction=0.2, num_parts=3)
    three = three.manifest
    assert three.num_parts == 3 and {s.part for s in three.shards} == {0, 1, 2}
    for language, counts in one.corpus["languages"].items():
        assert counts == three.corpus["languages"][language]
        assert 0 < counts["validation_documents"] < counts["documents"]
    # Text tokens (every row's tokens minus its [CLS] and [SEP]) are the same however the work is split.
    for split in ("train", "validation"):
        text = [sum(s.tokens - 2 * s.rows for s in m.shards_of(split)) for m in (one, three)]
        assert text[0] == text[1]


# -- reruns, parts, merge -------------------------------------------------------------------------


def test_rerun_with_the_same_inputs_does_nothing_and_other_settings_need_overwrite(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    first = prepare_small(tmp_path / "data", [corpus_dir / "de"], small_tokenizer)
    stamp = (first.output / "manifest.json").stat().st_mtime_ns
    again = prepare_small(tmp_path / "data", [corpus_dir / "de"], small_tokenizer)
    assert "nothing to do" in again.message and again.parts_prepared == []
    assert (first.output / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ManifestError, match="--overwrite"):
        prepare_small(tmp_path / "data", [corpus_dir / "de"], small_tokenizer, seq_len=32)
    replaced = prepare_small(tmp_path / "data", [corpus_dir / "de"], small_tokenizer, seq_len=32, overwrite=True)
    assert replaced.manifest.seq_len == 32 and verify_dataset(replaced.output).ok
    assert len(list((replaced.output / "shards").glob("*.arrow"))) == len(replaced.manifest.shards)


def test_job_array_parts_then_merge(tmp_path: Path, corpus_dir: Path, small_tokenizer: Path) -> None:
    output = tmp_path / "data"
    for part in (2, 0):
        result = prepare_small(output, [corpus_dir], small_tokenizer, num_parts=3, part=part)
        assert result.manifest is None and "dv3 data merge" in result.message
    assert not (output / "manifest.json").exists()
    with pytest.raises(ManifestError, match=r"1 of 3 parts are not prepared yet \(parts 1\)"):
        merge(output)
    prepare_small(output, [corpus_dir], small_tokenizer, num_parts=3, part=1)
    manifest = merge(output)
    assert manifest.num_parts == 3 and verify_dataset(output).ok
    reference = prepare_small(tmp_path / "all", [corpus_dir], small_tokenizer, num_parts=3).manifest
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in reference.shards]


def test_a_part_needs_the_tokenizer_fixed_beforehand(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="train-tokenizer"):
        prepare_small(tmp_path / "data", [corpus_dir], None, num_parts=2, part=0)
    with pytest.raises(ConfigError, match="overwrite"):
        prepare_small(tmp_path / "data", [corpus_dir], None, num_parts=2, part=0, overwrite=True)


def test_merge_refuses_parts_made_with_other_settings(tmp_path: Path, corpus_dir: Path, small_tokenizer: Path) -> None:
    output = tmp_path / "data"
    prepare_small(output, [corpus_dir], small_tokenizer, num_parts=2, part=0)
    prepare_small(output, [corpus_dir], small_tokenizer, num_parts=2, part=1, seq_len=32)
    with pytest.raises(ManifestError, match="part 1 was prepared from other inputs, settings or tokenizer"):
        merge(output)


# -- bad input ------------------------------------------------------------------------------------


def test_empty_corpus_is_a_clear_error(tmp_path: Path, small_tokenizer: Path) -> None:
    corpus = tmp_path / "empty"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n   \n\t\n", encoding="utf-8")
    (corpus / "b.jsonl").write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="the corpus is empty.*2 empty document"):
        prepare_small(tmp_path / "data", [corpus], small_tokenizer)
    with pytest.raises(CorpusError, match="no text to train a tokenizer"):
        prepare_small(tmp_path / "data2", [corpus], None)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_a_file_that_is_not_text_is_skipped_and_recorded(tmp_path: Path, small_tokenizer: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("A real sentence about anarchism and albedo.\n", encoding="utf-8")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 20)
    (corpus / "random.bin").write_bytes(np.random.default_rng(0).bytes(5000).replace(b"\x00", b"\x01"))
    result = prepare_small(tmp_path / "data", [corpus], small_tokenizer, validation_fraction=0.0)
    skipped = {Path(entry["file"]).name: entry["reason"] for entry in result.manifest.corpus["skipped_files"]}
    assert set(skipped) == {"image.png", "random.bin"}
    assert "NUL" in skipped["image.png"] and "not UTF-8" in skipped["random.bin"]
    assert result.manifest.corpus["documents"] == 1


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path, small_tokenizer: Path) -> None:
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(
        "Grüße aus Köln.\n\nNoch ein Absatz über Bären.\n".encode("latin-1") + "Ein gültiges ü.\n".encode()
    )
    result = prepare_small(tmp_path / "data", [corpus], small_tokenizer, validation_fraction=0.0)
    stats = result.manifest.corpus
    assert stats["invalid_utf8_replacements"] == 5 and stats["invalid_utf8_documents"] == 2
    assert stats["documents"] == 2


def test_a_single_enormous_document_is_cut_into_bounded_pieces(tmp_path: Path, small_tokenizer: Path) -> None:
    text = " ".join(a.replace("\n", " ") for a in wikipedia_articles(40))
    while len(text) < 3_000_000:
        text += " " + text
    corpus = tmp_path / "huge.txt"
    corpus.write_text(text[:3_000_000], encoding="utf-8")  # one line, one document
    result = prepare_small(
        tmp_path / "data",
        [corpus],
        small_tokenizer,
        validation_fraction=0.0,
        rows_per_shard=4096,
        record_batch_rows=1024,
    )
    stats = result.manifest.corpus
    assert stats["documents"] == 1 and stats["split_documents"] == 1
    assert stats["languages"]["und"]["characters"] >= 2_999_000
    assert result.manifest.rows >= stats["languages"]["und"]["tokens"] // (SEQ_LEN - 2)
    assert verify_dataset(result.output).ok


def test_disk_full_during_prepare_is_a_clear_error_and_accepts_no_shard(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = {"bytes": 0}

    class FillingDisk:
        """A real file on a disk that fills up after 60 kB of shard data."""

        def __init__(self, path: Path) -> None:
            self._file = open(path, "wb")

        def write(self, data) -> int:  # noqa: ANN001
            written["bytes"] += len(data)
            if written["bytes"] > 60_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._file.write(data)

        def flush(self) -> None:
            self._file.flush()

        def fileno(self) -> int:
            return self._file.fileno()

        def close(self) -> None:
            self._file.close()

    monkeypatch.setattr(shards_module, "_open_for_write", FillingDisk)
    output = tmp_path / "data"
    with pytest.raises(OutputError, match="no space left while writing shards"):
        prepare_small(output, [corpus_dir], small_tokenizer)
    assert written["bytes"] > 60_000
    assert not (output / "manifest.json").exists() and not list((output / "parts").glob("*.json"))
    assert not list((output / "shards").iterdir()), "unrecorded shards and temporary files are removed"
    code, _, stderr = run_cli("verify", str(output))
    assert code == 2 and "manifest.json does not exist" in stderr
    monkeypatch.undo()
    result = prepare_small(output, [corpus_dir], small_tokenizer)
    assert verify_dataset(result.output).ok


def test_file_size_limit_hit_in_a_real_process_fails_cleanly(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us

    output = tmp_path / "data"
    command = [
        sys.executable,
        "-m",
        "data_pipeline.cli",
        "data",
        "prepare",
        str(corpus_dir),
        "--output",
        str(output),
        "--tokenizer",
        str(small_tokenizer),
        "--seq-len",
        "64",
        "--rows-per-shard",
        "2000",
        "--no-progress",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "no space left" in error_lines[0] and "File too large" in error_lines[0]
    assert not (output / "manifest.json").exists() and not list((output / "shards").iterdir())


def test_killed_prepare_leaves_nothing_accepted_and_a_rerun_completes(tmp_path: Path, small_tokenizer: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for copy in range(3):
        text = "\n\n".join(a.replace("\n\n", "\n") for a in wikipedia_articles(40))
        (corpus / f"wiki-{copy}.txt").write_text(text, encoding="utf-8")
    output = tmp_path / "data"
    args = [
        str(corpus),
        "--output",
        str(output),
        "--tokenizer",
        str(small_tokenizer),
        "--seq-len",
        "64",
        "--rows-per-shard",
        "20",
        "--record-batch-rows",
        "8",
        "--no-progress",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.cli", "data", "prepare", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if list((output / "shards").glob("*.arrow")) if (output / "shards").exists() else []:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be killed: make the corpus larger"
    assert list((output / "shards").glob("*.arrow")), "it was killed while writing shards"
    assert not (output / "manifest.json").exists()
    with pytest.raises(ManifestError, match="does not exist"):
        PretrainLoader(output, batch_size=2)
    code, _, stderr = run_cli("verify", str(output))
    assert code == 2 and "manifest.json does not exist" in stderr

    code, stdout, stderr = run_cli("prepare", *args)
    assert code == 0, stderr
    assert not list(output.rglob(".tmp-*"))
    assert verify_dataset(output).ok
    reference = prepare_small(
        tmp_path / "reference",
        [corpus],
        small_tokenizer,
        rows_per_shard=20,
        record_batch_rows=8,
        validation_fraction=0.01,
    )
    assert [s.sha256 for s in load_manifest(output).shards] == [s.sha256 for s in reference.manifest.shards]


# -- verify, tokenizer mismatch, CLI --------------------------------------------------------------


def test_verify_names_each_truncated_bit_flipped_or_deleted_shard(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    shards = sorted((data / "shards").glob("train-*.arrow"))
    truncated, flipped, deleted = shards[0], shards[3], shards[5]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    deleted.unlink()
    report = verify_dataset(data)
    bad = {Path(file).name: reason for file, reason in report.bad}
    assert set(bad) == {truncated.name, flipped.name, deleted.name}
    assert "bytes" in bad[truncated.name] and "sha256" in bad[flipped.name] and "missing" in bad[deleted.name]
    code, stdout, stderr = run_cli("verify", str(data))
    assert code == 2
    for name in (truncated.name, flipped.name, deleted.name):
        assert f"BAD shards/{name}" in stdout and name in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, stdout, _ = run_cli("verify", str(prepared_dir))
    assert code == 0 and "all" in stdout, "the original still verifies"


def test_verify_catches_a_tokenizer_that_is_not_the_manifests(tmp_path: Path, prepared_dir: Path) -> None:
    other = tmp_path / "other.model"
    from data_pipeline.corpus import ReaderConfig, resolve_inputs
    from data_pipeline.prepare import train_tokenizer_for
    from data_pipeline.tokenizer import TokenizerTrainingConfig

    english = tmp_path / "en.txt"
    english.write_text("\n\n".join(wikipedia_articles(3)), encoding="utf-8")
    trained = train_tokenizer_for(
        resolve_inputs([str(english)], ReaderConfig()),
        ReaderConfig(),
        TokenizerTrainingConfig(vocab_size=400),
        tmp_path / "tok",
        False,
    )
    other.write_bytes(trained.path.read_bytes())
    report = verify_dataset(prepared_dir, tokenizer=other)
    assert [file for file, _ in report.bad] == [str(other)]
    code, _, stderr = run_cli("verify", str(prepared_dir), "--tokenizer", str(other), "--quick")
    assert code == 2 and "other.model" in stderr
    copy = copy_dataset(prepared_dir, tmp_path / "copy")
    (copy / "manifest.json").unlink()  # e.g. a job array whose tasks were given different tokenizers
    with pytest.raises(TokenizerError, match="differs from --tokenizer"):
        prepare_small(copy, [english], other)


def test_stats_reports_rows_languages_and_length_distributions(prepared_dir: Path) -> None:
    code, stdout, _ = run_cli("stats", str(prepared_dir), "--json")
    assert code == 0
    stats = json.loads(stdout)
    manifest = load_manifest(prepared_dir)
    assert stats["rows"] == manifest.rows and stats["tokens"] == manifest.tokens
    assert set(stats["splits"]["train"]["languages"]) == {"de", "en", "ru", "zh"}
    assert sum(stats["row_tokens"]["histogram"].values()) == manifest.rows
    assert stats["row_tokens"]["max"] == SEQ_LEN
    code, text, _ = run_cli("stats", str(prepared_dir))
    assert code == 0 and "tokens per row" in text and "tokens per document" in text


def test_cli_help_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("prepare", "train-tokenizer", "merge", "verify", "stats"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["data", command, "--help"])
        assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--vocab-size",
        "--seq-len",
        "--packing",
        "--validation-fraction",
        "--num-parts",
        "--part",
        "--tokenizer",
        "--default-corpus",
        "--text-unit",
        "--quick",
        "--json",
        "--no-verify",
    ):
        assert flag in help_text
    assert cli_main(["data", "prepare", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o")]) == 2
    assert cli_main(["data", "prepare", "--output", str(tmp_path / "o"), "--seq-len", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == f"dv3 data prepare: error: input {str(tmp_path / 'missing.txt')!r} does not exist"
    assert err[-1] == "dv3 data prepare: error: seq_len must be in [8, 65536], got 4"


def test_every_data_pipeline_error_is_an_input_error() -> None:
    classes = [c for c in vars(errors_module).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {c.__name__ for c in classes} >= {"InputError", "DataPipelineError", "ConfigError", "ShardError"}
    for error_class in classes:
        assert issubclass(error_class, InputError), error_class
    assert InputError.__bases__ == (Exception,)
    assert issubclass(ConfigError, DataPipelineError) and issubclass(ConfigError, ValueError)


@pytest.mark.slow
def test_prepare_with_no_input_builds_the_default_english_corpus(tmp_path: Path) -> None:
    output = tmp_path / "default"
    code, stdout, stderr = run_cli("prepare", "--output", str(output))
    assert code == 0, stderr
    manifest = load_manifest(output)
    assert manifest.settings["inputs"] == ["default:english"]
    assert manifest.corpus["files"] == 2 and manifest.corpus["documents"] > 100
    assert {s.language for s in manifest.shards} == {"en"} and manifest.rows > 1000
    assert verify_dataset(output).ok
    assert manifest.tokenizer.vocab_size == 16001 and manifest.tokenizer.mask_token_id == 16000
    code, stdout, _ = run_cli("prepare", "--output", str(output))
    assert code == 0 and "nothing to do" in stdout


# -- robustness: paths, stray shards, skipped lines, --overwrite, unwritable outputs ----------------


def _edit_manifest(data: Path, change) -> None:  # noqa: ANN001
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "tokenizer"])
def test_a_manifest_entry_outside_the_dataset_is_refused_and_never_opened(
    tmp_path: Path, prepared_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow

    data = copy_dataset(prepared_dir, tmp_path / "data")
    first = load_manifest(data).shards[0].file
    # A byte-identical copy outside the dataset: were it opened, it would load without complaint.
    outside = tmp_path / "outside.arrow"
    outside.write_bytes((data / first).read_bytes())
    if kind == "dotdot":
        _edit_manifest(data, lambda m: m["shards"][0].update(file="../outside.arrow"))
    elif kind == "absolute":
        _edit_manifest(data, lambda m: m["shards"][0].update(file=str(outside)))
    elif kind == "symlink":
        (data / first).unlink()
        (data / first).symlink_to(outside)
    else:
        (tmp_path / "spm.model").write_bytes((data / "spm.model").read_bytes())
        _edit_manifest(data, lambda m: m["tokenizer"].update(file="../spm.model"))
    opened: list[str] = []
    real_memory_map, real_sha256 = pyarrow.memory_map, shards_module.file_sha256

    def memory_map(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real_memory_map(path, *args, **kwargs)

    def file_sha256(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real_sha256(path, *args, **kwargs)

    monkeypatch.setattr(pyarrow, "memory_map", memory_map)
    monkeypatch.setattr(shards_module, "file_sha256", file_sha256)
    entry = "tokenizer.file" if kind == "tokenizer" else "shards[0].file" if kind != "symlink" else first
    with pytest.raises(ManifestError, match=r"manifest\.json: .*" + re.escape(entry)) as refused:
        loader = PretrainLoader(data, batch_size=4, seed=0)
        for _ in range(200):
            next(loader)
    assert "outside" in str(refused.value) or "'..'" in str(refused.value) or "absolute" in str(refused.value)
    if kind != "symlink":
        with pytest.raises(ManifestError, match=re.escape(entry)):
            verify_dataset(data)
    else:
        assert [file for file, _ in verify_dataset(data).bad] == [first]
    assert not [path for path in opened if Path(path).resolve().parent == tmp_path], "nothing outside was opened"
    code, stdout, stderr = run_cli("verify", str(data))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert str(data / "manifest.json") in (stdout if kind == "symlink" else stderr)  # symlink: a BAD line


def test_verify_reports_a_shard_file_the_manifest_does_not_list(tmp_path: Path, prepared_dir: Path) -> None:
    data = copy_dataset(prepared_dir, tmp_path / "data")
    listed = sorted((data / "shards").glob("train-*.arrow"))[0]
    stray = data / "shards" / "train-en-p00007-00000.arrow"  # e.g. left by another run
    stray.write_bytes(listed.read_bytes())
    report = verify_dataset(data, full=False)
    assert [file for file, _ in report.bad] == ["shards/train-en-p00007-00000.arrow"]
    assert "not listed in" in report.bad[0][1] and str(data / "manifest.json") in report.bad[0][1]
    code, stdout, stderr = run_cli("verify", str(data), "--quick")
    assert code == 2 and "BAD shards/train-en-p00007-00000.arrow" in stdout
    assert len(stderr.strip().splitlines()) == 1 and "train-en-p00007-00000.arrow" in stderr
    # merge does not write a manifest over a mixed shard folder either
    before = (data / "manifest.json").read_bytes()
    with pytest.raises(ManifestError, match="no part manifest lists .*train-en-p00007-00000.arrow"):
        merge(data)
    assert (data / "manifest.json").read_bytes() == before
    stray.unlink()
    assert verify_dataset(data).ok


def clean_jsonl(directory: Path) -> Path:
    path = directory / "clean.jsonl"
    path.write_text(json.dumps({"text": "A clean line about anarchism."}) + "\n", encoding="utf-8")
    return path


def test_prepare_prints_how_many_jsonl_lines_it_skipped(tmp_path: Path, small_tokenizer: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "A real sentence about anarchism and albedo."}),
        "not json at all",
        json.dumps({"title": "no text field"}),
        json.dumps({"text": 5}),
        "[1, 2]",
        json.dumps({"text": "Another sentence about the sea."}),
    ]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "data"
    code, stdout, stderr = run_cli(
        "prepare", str(corpus), "--output", str(output), "--tokenizer", str(small_tokenizer), "--seq-len", "64",
        "--validation-fraction", "0", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "skipped 4 JSONL line(s) that are not a JSON object with a string field 'text'" in stdout
    assert load_manifest(output).corpus["malformed_records"] == 4
    # a job array's part says so for its own lines, and merge for all of them
    parts, clean = tmp_path / "parts", clean_jsonl(tmp_path)
    for part in ("0", "1"):
        code, stdout, stderr = run_cli(
            "prepare", str(corpus), str(clean), "--output", str(parts), "--tokenizer",
            str(small_tokenizer), "--seq-len", "64", "--validation-fraction", "0", "--num-parts", "2", "--part", part,
            "--no-progress",
        )  # fmt: skip
        assert code == 0, stderr
        assert ("skipped 4 JSONL line(s)" in stdout) == (part == "0"), stdout  # the larger file goes to part 0
    code, stdout, stderr = run_cli("merge", str(parts), "--no-progress")
    assert code == 0 and "skipped 4 JSONL line(s)" in stdout, stderr
    code, stdout, _ = run_cli(
        "prepare", str(clean_jsonl(tmp_path)), "--output", str(tmp_path / "clean"), "--tokenizer", str(small_tokenizer),
        "--seq-len", "64", "--validation-fraction", "0", "--no-progress",
    )  # fmt: skip
    assert code == 0 and "skipped" not in stdout


def test_overwrite_deletes_only_what_prepare_wrote_and_refuses_beside_other_files(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    output = tmp_path / "data"
    prepare_small(output, [corpus_dir / "de"], small_tokenizer)
    own_temporary = output / "shards" / ".tmp-train-de-p00000-00009.arrow.4242"  # a killed run's leftover
    own_temporary.write_bytes(b"partial")
    mine = {output / "notes.txt": b"my notes", output / "shards" / "README": b"about these shards"}
    (output / "mine").mkdir()
    mine[output / "mine" / "keep.txt"] = b"keep"
    for path, content in mine.items():
        path.write_bytes(content)
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    with pytest.raises(OutputError, match=r"--overwrite deletes only .* also holds mine, notes.txt, shards/README;"):
        prepare_small(output, [corpus_dir / "de"], small_tokenizer, seq_len=32, overwrite=True)
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before, "nothing deleted"
    assert verify_dataset(output).ok
    for path in mine:
        path.unlink()
    (output / "mine").rmdir()
    replaced = prepare_small(output, [corpus_dir / "de"], small_tokenizer, seq_len=32, overwrite=True)
    assert replaced.manifest.seq_len == 32 and verify_dataset(output).ok
    assert not own_temporary.exists(), "prepare's own leftovers go"
    # Pointed at a folder that merely has a 'shards' folder of someone else's, nothing is touched.
    home = tmp_path / "home"
    (home / "shards").mkdir(parents=True)
    (home / "shards" / "photo.arrow").write_bytes(b"not ours")
    code, _, stderr = run_cli("prepare", str(corpus_dir / "de"), "--output", str(home), "--tokenizer",
                              str(small_tokenizer), "--overwrite", "--no-progress")  # fmt: skip
    assert code == 2 and "shards/photo.arrow" in stderr and len(stderr.strip().splitlines()) == 1
    assert (home / "shards" / "photo.arrow").read_bytes() == b"not ours"


def test_output_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path, corpus_dir: Path, small_tokenizer: Path) -> None:
    target = tmp_path / "a-file"
    target.write_bytes(b"precious")
    for command in (
        ["prepare", str(corpus_dir / "de"), "--output", str(target), "--tokenizer", str(small_tokenizer)],
        ["train-tokenizer", str(corpus_dir / "de"), "--output", str(target), "--vocab-size", "300"],
        ["verify", str(target)],
        ["merge", str(target)],
        ["stats", str(target)],
    ):
        code, _, stderr = run_cli(*command, *(["--no-progress"] if command[0] not in ("stats",) else []))
        assert code == 2, (command, stderr)
        assert len(stderr.strip().splitlines()) == 1 and str(target) in stderr and "Traceback" not in stderr, stderr
    assert target.read_bytes() == b"precious"


def test_read_only_output_directory_is_one_line_exit_2_and_keeps_the_dataset(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    output = tmp_path / "ro"
    args = ["--output", str(output), "--tokenizer", str(small_tokenizer), "--seq-len", "64", "--no-progress"]
    with tmpfs(output, "size=8m"):
        code, _, stderr = run_cli("prepare", str(corpus_dir / "de"), *args)
        assert code == 0, stderr
        before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(output)], check=True)
        code, stdout, stderr = run_cli("prepare", str(corpus_dir / "de"), *args)
        assert code == 0 and "nothing to do" in stdout, stderr  # reading a finished dataset needs no writing
        for command in (
            ["prepare", str(corpus_dir / "de"), *args, "--seq-len", "32", "--overwrite"],
            ["prepare", str(corpus_dir / "ru"), "--output", str(output / "new"), "--no-progress"],
            ["train-tokenizer", str(corpus_dir / "de"), "--output", str(output / "tok"), "--no-progress"],
            ["merge", str(output), "--no-progress"],
        ):
            code, _, stderr = run_cli(*command)
            assert code == 2, (command, stderr)
            assert len(stderr.strip().splitlines()) == 1 and "Read-only file system" in stderr, stderr
            assert str(output) in stderr and "Traceback" not in stderr
        assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before
        assert verify_dataset(output).ok


def test_disk_full_on_a_real_filesystem_says_no_space_left_and_a_rerun_completes(
    tmp_path: Path, corpus_dir: Path, small_tokenizer: Path
) -> None:
    args = ["--tokenizer", str(small_tokenizer), "--seq-len", "64", "--rows-per-shard", "40", "--no-progress"]
    # 16 kB: the tokenizer copy (40 kB) does not fit; 96 kB: it does, the shards do not.
    for size, culprit in (("16k", "spm.model"), ("96k", "shards")):
        mount = tmp_path / f"disk-{size}"
        with tmpfs(mount, f"size={size}"):
            output = mount / "data"
            code, _, stderr = run_cli("prepare", str(corpus_dir), "--output", str(output), *args)
            assert code == 2, stderr
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and "no space left while writing" in lines[0], stderr
            assert str(output / culprit) in lines[0]
            assert not (output / "manifest.json").exists()
            assert not [p for p in output.rglob("*") if p.is_file() and p.name != "spm.model"], "no partial file"
    output = tmp_path / "data"
    code, _, stderr = run_cli("prepare", str(corpus_dir), "--output", str(output), *args)
    assert code == 0 and verify_dataset(output).ok, stderr


def test_disk_full_while_writing_the_manifest_keeps_the_old_one_and_the_parts(
    tmp_path: Path, prepared_dir: Path, corpus_dir: Path, small_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open

    class FullDisk:
        def __init__(self, stream) -> None:  # noqa: ANN001
            self._stream = stream

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self._stream.close()

        def write(self, data) -> int:  # noqa: ANN001
            self._stream.write(bytes(data)[:100])  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def filling_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        stream = real_open(path, mode, *args, **kwargs)
        return FullDisk(stream) if "manifest.json" in str(path) and "w" in mode else stream

    monkeypatch.setattr(shards_module, "open", filling_open, raising=False)
    # merge over an existing dataset: the manifest it replaces stays whole
    data = copy_dataset(prepared_dir, tmp_path / "copy")
    before = (data / "manifest.json").read_bytes()
    with pytest.raises(OutputError, match="no space left while writing .*manifest.json.*previous version is unchanged"):
        merge(data)
    assert (data / "manifest.json").read_bytes() == before and verify_dataset(data).ok
    assert not list(data.rglob(".tmp-*"))
    # a fresh prepare: the parts are written and kept, the manifest is not; a rerun only merges
    output = tmp_path / "data"
    with pytest.raises(OutputError, match="no space left while writing .*manifest.json.*nothing was written"):
        prepare_small(output, [corpus_dir / "de"], small_tokenizer)
    assert not (output / "manifest.json").exists() and not list(output.rglob(".tmp-*"))
    assert list((output / "parts").glob("part-*.json"))
    monkeypatch.undo()
    again = prepare_small(output, [corpus_dir / "de"], small_tokenizer)
    assert again.parts_reused == [0] and again.parts_prepared == [] and verify_dataset(output).ok
