"""The SentencePiece tokenizer: DeBERTa-v3 special ids, [MASK] after the pieces, the same ids as
Hugging Face's DebertaV2Tokenizer, multilingual sentence sampling, and clear errors."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.cli import main as cli_main
from data_pipeline.corpus import Document
from data_pipeline.errors import ConfigError, CorpusError, TokenizerError
from data_pipeline.sampling import largest_remainder
from data_pipeline.tokenizer import (
    SentencePieceTokenizer,
    SentenceSampler,
    TokenizerTrainingConfig,
    language_probabilities,
    normalize_text,
    train_tokenizer,
)
from tests.support.data import build_corpus, fortunes, wikipedia_articles


def documents(texts: list[str], language: str) -> list[Document]:
    return [Document(text, language, "test", i) for i, text in enumerate(texts)]


def test_special_ids_are_debertas_and_mask_follows_the_pieces(small_tokenizer: Path) -> None:
    tokenizer = SentencePieceTokenizer(small_tokenizer)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert tokenizer.num_pieces == 3000 and tokenizer.mask_token_id == 3000 and tokenizer.vocab_size == 3001
    assert tokenizer.id_to_piece(tokenizer.mask_token_id) == "[MASK]"
    assert tokenizer.special_token_ids == {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": 3000}
    ids = tokenizer.encode(["Der General soll kommen."])[0]
    assert ids and min(ids) > 3 and tokenizer.decode(ids) == "Der General soll kommen."


def test_hugging_face_deberta_v2_tokenizer_gives_the_same_ids(small_tokenizer: Path) -> None:
    from transformers import DebertaV2Tokenizer

    ours = SentencePieceTokenizer(small_tokenizer)
    theirs = DebertaV2Tokenizer.from_pretrained(small_tokenizer.parent)
    assert len(theirs) == ours.vocab_size
    assert (theirs.pad_token_id, theirs.cls_token_id, theirs.sep_token_id, theirs.unk_token_id) == (0, 1, 2, 3)
    assert theirs.mask_token_id == ours.mask_token_id == ours.num_pieces
    texts = wikipedia_articles(6) + fortunes("de", 200) + fortunes("ru", 100) + fortunes("zh", 60) + fortunes("es", 100)
    texts += [
        "  leading\tand trailing  \n",
        "Cafe\u0301 au lait",
        "a\u00a0b\u00a0\u00a0c",
        "ﬁ Ⅻ ＡＢＣ",
        "",
        "😀 emoji",
    ]
    ours_ids = ours.encode(texts)
    theirs_ids = theirs(texts, add_special_tokens=False)["input_ids"]
    identical = sum(a == b for a, b in zip(ours_ids, theirs_ids, strict=True))
    for text, a, b in zip(texts, ours_ids, theirs_ids, strict=True):
        # Runs of one repeated character ("-----") can have several segmentations of equal score, and
        # the two implementations break such ties differently: the same pieces, in another order.
        assert a == b or (Counter(a) == Counter(b) and re.search(r"([^\w\s])\1\1", text)), repr(text[:80])
    assert identical >= len(texts) - 2
    with_specials = theirs(texts[0])["input_ids"]
    assert with_specials[0] == 1 and with_specials[-1] == 2 and with_specials[1:-1] == ours_ids[0]


@pytest.mark.parametrize(
    "text",
    [
        "  two  spaces\tand\ttabs\n\nand newlines  ",
        "Cafe\u0301",
        "\u00a0single nbsp",
        "x\u00a0\u00a0y",
        "end\u3000",
        "ok",
    ],
)
def test_normalization_is_hugging_faces(small_tokenizer: Path, text: str) -> None:
    from transformers import DebertaV2Tokenizer

    hf = DebertaV2Tokenizer.from_pretrained(small_tokenizer.parent)
    assert normalize_text(text) == hf.backend_tokenizer.normalizer.normalize_str(text)


def test_multilingual_sentences_are_sampled_with_p_to_the_alpha() -> None:
    sampler = SentenceSampler(capacity=10_000, max_sentence_chars=4096, seed=0)
    for language, count in (("big", 900), ("mid", 90), ("small", 10)):
        for i in range(count):
            sampler.add_document(f"{language} sentence {i}", language)
    sentences, used = sampler.sample(1000, alpha=0.3)
    probabilities = language_probabilities({"big": 900, "mid": 90, "small": 10}, 0.3)
    expected = largest_remainder([probabilities[k] for k in ("big", "mid", "small")], 1000)
    assert [used[k] for k in ("big", "mid", "small")] == expected.tolist()
    assert Counter(s.split()[0] for s in sentences) == used
    assert used["small"] > 10, "the smallest language is upsampled by repetition"
    natural, used_natural = SentenceSampler(10_000, 4096, 0), None
    for language, count in (("big", 900), ("small", 100)):
        for i in range(count):
            natural.add_document(f"{language} {i}", language)
    _, used_natural = natural.sample(1000, alpha=1.0)
    assert used_natural == {"big": 900, "small": 100}


def test_reservoir_keeps_a_bounded_uniform_sample() -> None:
    sampler = SentenceSampler(capacity=100, max_sentence_chars=4096, seed=1)
    for i in range(10_000):
        sampler.add_document(f"s{i}", "en")
    sentences, used = sampler.sample(100, alpha=0.3)
    numbers = [int(s[1:]) for s in sentences]
    assert used == {"en": 100} and len(set(numbers)) == 100 and sampler.seen == {"en": 10_000}
    assert 2500 < sum(numbers) / 100 < 7500, "a uniform sample, not the first sentences"


def test_training_is_deterministic(tmp_path: Path) -> None:
    texts = documents(fortunes("de", 300), "de")
    config = TokenizerTrainingConfig(vocab_size=800)
    first, summary = train_tokenizer(texts, config, tmp_path / "a.model")
    second, _ = train_tokenizer(texts, config, tmp_path / "b.model")
    assert first.sha256 == second.sha256
    assert summary["sentences_used"] == {"de": summary["sentences_seen"]["de"]}
    assert first.normalization == "identity" and not first.byte_fallback


def test_byte_fallback_encodes_unseen_characters_as_bytes(tmp_path: Path) -> None:
    tokenizer, _ = train_tokenizer(
        documents(fortunes("de", 300), "de"),
        TokenizerTrainingConfig(vocab_size=800, byte_fallback=True),
        tmp_path / "b.model",
    )
    assert tokenizer.byte_fallback
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(["日"])[0]]
    assert pieces[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]


def test_a_model_with_other_special_ids_is_refused(tmp_path: Path) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fortunes("de", 300)), model_writer=model, vocab_size=300, minloglevel=2
    )  # SentencePiece's defaults: <unk>=0 <s>=1 </s>=2, no pad
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match=r"wrong special ids.*\[PAD\] is -1.*\[UNK\] is 0"):
        SentencePieceTokenizer(path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match="cannot read"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def test_a_model_that_has_a_mask_piece_is_refused(tmp_path: Path) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fortunes("de", 300)), model_writer=model, vocab_size=300, minloglevel=2,
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3,
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"],
    )  # fmt: skip
    path = tmp_path / "mask.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match=r"has a \[MASK\] piece"):
        SentencePieceTokenizer(path)


def test_training_errors_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="smaller --vocab-size"):
        train_tokenizer(documents(fortunes("de", 20), "de"), TokenizerTrainingConfig(vocab_size=5000), tmp_path / "x")
    with pytest.raises(TokenizerError, match="larger --vocab-size or a lower --character-coverage"):
        train_tokenizer(documents(fortunes("zh", 60), "zh"), TokenizerTrainingConfig(vocab_size=100), tmp_path / "y")
    with pytest.raises(CorpusError, match="no text"):
        train_tokenizer(documents(["", "  "], "de"), TokenizerTrainingConfig(vocab_size=100), tmp_path / "z")
    with pytest.raises(ConfigError, match="character_coverage"):
        TokenizerTrainingConfig(character_coverage=0.5)
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerTrainingConfig(vocab_size=100, byte_fallback=True)


def test_train_tokenizer_command_writes_the_model_and_reuses_it(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = build_corpus(tmp_path_factory) / "de"
    args = ["data", "train-tokenizer", str(corpus), "--output", str(tmp_path), "--vocab-size", "700", "--no-progress"]
    assert cli_main(args) == 0
    record = json.loads((tmp_path / "spm.json").read_text())
    model = SentencePieceTokenizer(tmp_path / "spm.model")
    assert record["sha256"] == model.sha256 and record["num_pieces"] == 700
    assert "[MASK]=700" in capsys.readouterr().out
    stamp = (tmp_path / "spm.model").stat().st_mtime_ns
    assert cli_main(args) == 0
    assert (tmp_path / "spm.model").stat().st_mtime_ns == stamp, "the same corpus and settings reuse the model"
    assert cli_main([*args[:-3], "--vocab-size", "600", "--no-progress"]) == 0
    assert SentencePieceTokenizer(tmp_path / "spm.model").num_pieces == 600


def test_training_refuses_to_replace_the_tokenizer_of_prepared_shards(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.support.data import build_prepared, copy_dataset

    data = copy_dataset(build_prepared(tmp_path_factory), tmp_path / "data")
    before = (data / "spm.model").read_bytes()
    corpus = build_corpus(tmp_path_factory) / "de"
    args = ["data", "train-tokenizer", str(corpus), "--output", str(data), "--vocab-size", "700", "--no-progress"]
    assert cli_main(args) == 2
    assert (data / "spm.model").read_bytes() == before
