"""Corpus readers: formats, compression, directories and globs, languages, counted bad input,
MediaWiki cleaning and the embedded default corpora."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path
from xml.sax.saxutils import escape

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.corpus import (
    CorpusStats,
    DocumentReader,
    InputFile,
    ReaderConfig,
    clean_wikitext,
    resolve_inputs,
    split_long_text,
)
from data_pipeline.default_corpus import default_corpus_inputs, fortune_inputs
from data_pipeline.errors import ConfigError, CorpusError


def read_all(inputs: list, config: ReaderConfig | None = None) -> tuple[list, CorpusStats]:
    config = config or ReaderConfig()
    reader = DocumentReader(config)
    documents = [d for file in resolve_inputs([str(i) for i in inputs], config) for d in reader.read(file)]
    return documents, reader.stats


TEXT = "First paragraph, line one.\nLine two.\n\n\nSecond paragraph.\n\nThird.\n"


def test_plain_text_by_blocks_or_by_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\ufeff" + TEXT, encoding="utf-8")
    blocks, _ = read_all([path])
    assert [d.text for d in blocks] == ["First paragraph, line one.\nLine two.", "Second paragraph.", "Third."]
    lines, stats = read_all([path], ReaderConfig(text_unit="line"))
    assert [d.text for d in lines] == ["First paragraph, line one.", "Line two.", "Second paragraph.", "Third."]
    assert stats.empty_documents == 3 and stats.documents == 4


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_files_read_like_plain_ones(tmp_path: Path, suffix: str, opener) -> None:  # noqa: ANN001
    plain = tmp_path / "plain.jsonl"
    records = [{"text": f"document {i} ü"} for i in range(50)] + [{"text": ""}]
    plain.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    packed = tmp_path / f"packed.jsonl{suffix}"
    with opener(packed, "wb") as stream:
        stream.write(plain.read_bytes())
    expected, _ = read_all([plain])
    got, stats = read_all([packed])
    assert [d.text for d in got] == [d.text for d in expected] and len(got) == 50
    assert stats.empty_documents == 1


def test_a_corrupt_compressed_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt.gz"
    data = gzip.compress(("some text\n" * 50_000).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="broken.txt.gz.*truncated or corrupt"):
        read_all([path])


def test_jsonl_counts_malformed_records(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"text": "kept one"}\nnot json\n{"body": "no text field"}\n[1, 2]\n{"text": 5}\n\n{"text": "kept two"}\n',
        encoding="utf-8",
    )
    documents, stats = read_all([path])
    assert [d.text for d in documents] == ["kept one", "kept two"]
    assert stats.malformed_records == 4
    other, _ = read_all([path], ReaderConfig(text_field="body"))
    assert [d.text for d in other] == ["no text field"]


def test_parquet_text_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["alpha beta", None, "gamma"]}), path, row_group_size=2)
    documents, stats = read_all([path], ReaderConfig(text_field="content"))
    assert [d.text for d in documents] == ["alpha beta", "gamma"] and stats.empty_documents == 1
    with pytest.raises(CorpusError, match="no column 'text'.*id, content"):
        read_all([path])
    with pytest.raises(CorpusError, match="not a string column"):
        read_all([path], ReaderConfig(text_field="id"))


def test_directories_globs_hidden_files_and_language_layout(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for language in ("en", "zh-Hans", "de"):
        (corpus / language / "deep").mkdir(parents=True)
        (corpus / language / "deep" / "b.txt").write_text(f"{language} b\n", encoding="utf-8")
        (corpus / language / "a.txt").write_text(f"{language} a\n", encoding="utf-8")
    (corpus / "en" / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (corpus / "loose.txt").write_text("loose\n", encoding="utf-8")
    documents, _ = read_all([corpus])
    assert [(d.language, d.text) for d in documents] == [
        ("und", "loose"), ("de", "de a"), ("de", "de b"), ("en", "en a"), ("en", "en b"),
        ("zh-Hans", "zh-Hans a"), ("zh-Hans", "zh-Hans b"),
    ]  # fmt: skip
    assert {d.source for d in documents} >= {"en/a.txt", "en/deep/b.txt", "loose.txt"}
    globbed, _ = read_all([str(corpus / "*" / "a.txt"), corpus / "de"])  # overlapping inputs: each file once
    assert [(d.language, d.text) for d in globbed] == [
        ("de", "de a"), ("en", "en a"), ("zh-Hans", "zh-Hans a"), ("de", "de b"),
    ]  # fmt: skip
    recursive, _ = read_all([str(corpus / "**" / "b.txt")])
    assert [d.text for d in recursive] == ["de b", "en b", "zh-Hans b"]
    forced, _ = read_all([corpus], ReaderConfig(language="fr"))
    assert {d.language for d in forced} == {"fr"}
    with pytest.raises(CorpusError, match="matches no file"):
        read_all([str(corpus / "*.parquet")])
    with pytest.raises(CorpusError, match="does not exist"):
        read_all([tmp_path / "nope.txt"])
    with pytest.raises(ConfigError, match="language"):
        ReaderConfig(language="not a tag!")


def test_invalid_utf8_is_replaced_and_counted_per_document(tmp_path: Path) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"ok \xff\xfe line\nsecond \xc3 line\n\nclean \xef\xbf\xbd already replaced\n")
    documents, stats = read_all([path])
    assert documents[0].text == "ok \ufffd\ufffd line\nsecond \ufffd line"
    assert stats.invalid_utf8_replacements == 3 and stats.invalid_utf8_documents == 1
    assert documents[1].text == "clean \ufffd already replaced"


def test_files_that_are_not_text_are_skipped_and_recorded(tmp_path: Path) -> None:
    (tmp_path / "utf16.txt").write_text("text in UTF-16", encoding="utf-16")
    (tmp_path / "fake.parquet").write_text("this is not parquet", encoding="utf-8")
    (tmp_path / "fake.xml").write_text("plain words, no markup", encoding="utf-8")
    (tmp_path / "good.txt").write_text("good text\n", encoding="utf-8")
    documents, stats = read_all([tmp_path])
    assert [d.text for d in documents] == ["good text"]
    reasons = {Path(s["file"]).name: s["reason"] for s in stats.skipped_files}
    assert "NUL" in reasons["utf16.txt"] and "Parquet" in reasons["fake.parquet"] and "not XML" in reasons["fake.xml"]
    assert stats.files == 1


def test_an_enormous_block_is_read_in_bounded_pieces_of_one_document(tmp_path: Path) -> None:
    line = "word " * 20_000  # 100k characters
    path = tmp_path / "huge.txt"
    path.write_text("\n".join([line] * 30) + "\n\nnext document\n", encoding="utf-8")
    documents, stats = read_all([path], ReaderConfig(max_document_chars=250_000))
    assert max(len(d.text) for d in documents) <= 250_000
    assert sum(len(d.text) for d in documents[:-1]) >= 30 * 99_999
    assert {d.index for d in documents[:-1]} == {0} and documents[-1].index == 1
    assert [d.piece for d in documents[:-1]] == list(range(len(documents) - 1))
    assert stats.documents == 2 and stats.split_documents == 1


def test_split_long_text_cuts_at_whitespace_and_keeps_everything() -> None:
    text = " ".join(f"w{i}" for i in range(5000))
    pieces = split_long_text(text, 1000)
    assert all(len(p) <= 1000 for p in pieces) and "".join(pieces) == text
    assert all(p.startswith(" ") or i == 0 for i, p in enumerate(pieces))
    assert split_long_text("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]


def test_fortune_files_split_on_percent_lines_without_terminal_escapes(tmp_path: Path) -> None:
    path = tmp_path / "fortunes"
    path.write_text("First\nfortune.\n%\n\x1b[33m  -- colored\x1b[m\n%\n%\nLast one\n", encoding="utf-8")
    documents, stats = read_all([path], ReaderConfig(format="fortune"))
    assert [d.text for d in documents] == ["First\nfortune.", "  -- colored", "Last one"]
    assert stats.empty_documents == 1


WIKITEXT = """'''Albedo''' is the [[diffuse reflection|diffuse]] reflectivity
of a surface.<ref>{{cite book|title=Optics}}</ref> {{Infobox|x=1}}
[[File:Albedo.png|thumb|A caption]]
{| class="wikitable"
| cell || cell
|}
It is measured on a scale from 0 to 1.<!-- hidden -->
[[Category:Physics]]

== See also ==
* [[Reflectance]]
"""
# As in a real dump: the wikitext is escaped XML character data.
WIKI_XML = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Albedo</title><ns>0</ns><revision><text>{escape(WIKITEXT)}</text></revision></page>
  <page><title>AccessibleComputing</title><ns>0</ns><redirect title="Computer accessibility" />
    <revision><text>#REDIRECT [[Computer accessibility]]</text></revision></page>
  <page><title>Talk:Albedo</title><ns>1</ns><revision><text>A talk page.</text></revision></page>
</mediawiki>
"""


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_mediawiki_articles_are_cleaned_of_markup(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(WIKI_XML.encode(encoding)))
    documents, stats = read_all([path])
    assert len(documents) == 1 and stats.documents == 1
    assert documents[0].text == (
        "Albedo is the diffuse reflectivity\nof a surface.\n\nIt is measured on a scale from 0 to 1."
    )


def test_clean_wikitext_drops_templates_refs_and_link_targets() -> None:
    text = clean_wikitext("A [[Link|shown]] and [[Plain]].<ref name=a/> {{lang|el|x}}Done.")
    assert text == "A shown and Plain. Done."


def test_default_english_corpus_is_gensims_wikipedia_sample() -> None:
    inputs = default_corpus_inputs("english")
    assert {i.language for i in inputs} == {"en"} and all(i.format == "mediawiki" for i in inputs)
    assert all("gensim" in str(i.path) and i.path.exists() for i in inputs)
    reader = DocumentReader(ReaderConfig())
    first = next(reader.read(inputs[0]))
    assert first.text.startswith("Anarchism is a political philosophy")


def test_default_multilingual_corpus_covers_every_fortune_language() -> None:
    inputs = default_corpus_inputs("multilingual")
    languages = {i.language for i in inputs}
    assert languages == {"de", "es", "it", "ru", "zh", "pl", "pt", "cs", "bg", "en"}
    assert not any("/off/" in str(i.path) or i.path.suffix in (".dat", ".u8") for i in inputs)
    reader = DocumentReader(ReaderConfig())
    for language in sorted(languages):
        file = next(i for i in inputs if i.language == language)
        document = next(reader.read(file))
        assert document.text.strip(), language


def test_a_missing_fortunes_package_says_what_to_install() -> None:
    with pytest.raises(CorpusError, match="apt-get install fortunes-xx"):
        fortune_inputs({"fortunes-xx": "xx"})
    with pytest.raises(ConfigError, match="default corpus"):
        default_corpus_inputs("klingon")


def test_input_files_know_their_size(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("12345", encoding="utf-8")
    assert InputFile(path, "text", "en", "x.txt").size == 5
