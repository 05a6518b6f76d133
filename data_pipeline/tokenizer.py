"""SentencePiece unigram tokenizer: training on a corpus, loading an existing ``spm.model``, encoding.

Ids follow DeBERTa-v3: ``[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3`` are pieces of the model and ``[MASK]``
comes right after the pieces (``mask_token_id = num_pieces``), so the model's vocabulary is
``num_pieces + 1``. This is also what Hugging Face's ``DebertaV2Tokenizer`` makes of the same
``spm.model`` (``DebertaV2Tokenizer.from_pretrained(folder_holding_spm_model)``).

Hugging Face's tokenizer (transformers 5) normalizes text itself (runs of whitespace, newlines and
tabs become one space, then NFC, then trailing whitespace is stripped) and ignores the model's own
normalization rule and byte fallback. So the tokenizers trained here use the ``identity`` rule,
and :func:`normalize_text` applies Hugging Face's normalization before SentencePiece sees the
text: the same text gives the same ids either way. Byte fallback is available as an option, but
Hugging Face's tokenizer then gives ``[UNK]`` where SentencePiece gives byte pieces.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.corpus import Document, split_long_text
from data_pipeline.errors import ConfigError, CorpusError, TokenizerError
from data_pipeline.sampling import largest_remainder
from data_pipeline.shards import write_bytes_atomic

logger = logging.getLogger(__name__)

PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {PAD_ID: "[PAD]", CLS_ID: "[CLS]", SEP_ID: "[SEP]", UNK_ID: "[UNK]"}
MASK_TOKEN = "[MASK]"

# Unicode White_Space, as Rust's regex `\s` and `char::is_whitespace` (Hugging Face tokenizers) define it.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITE_SPACE_RUN = re.compile(f"[{re.escape(_WHITE_SPACE)}]{{2,}}|[\n\r\t]")


def normalize_text(text: str) -> str:
    """Hugging Face ``DebertaV2Tokenizer``'s normalization: whitespace runs, newlines and tabs to one
    space, NFC, trailing whitespace stripped."""
    text = _WHITE_SPACE_RUN.sub(" ", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text.rstrip(_WHITE_SPACE)


def default_num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class SentencePieceTokenizer:
    """A loaded ``spm.model`` with dv3's special ids checked."""

    def __init__(self, path: str | os.PathLike) -> None:
        import sentencepiece

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise TokenizerError(f"cannot read tokenizer {self.path}: {error}") from error
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._model_proto = data
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as error:
            raise TokenizerError(f"{self.path} is not a SentencePiece model: {error}") from error
        roles = {
            "[PAD]": (self._sp.pad_id(), PAD_ID),
            "[CLS] (bos)": (self._sp.bos_id(), CLS_ID),
            "[SEP] (eos)": (self._sp.eos_id(), SEP_ID),
            "[UNK]": (self._sp.unk_id(), UNK_ID),
        }
        wrong = [f"{name} is {got}" for name, (got, want) in roles.items() if got != want]
        if wrong:
            raise TokenizerError(
                f"tokenizer {self.path} has the wrong special ids ({', '.join(wrong)}); dv3 needs "
                "[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 as in DeBERTa-v3 (train one with `dv3 data train-tokenizer`)"
            )
        if self._sp.piece_to_id(MASK_TOKEN) != UNK_ID:
            raise TokenizerError(
                f"tokenizer {self.path} has a {MASK_TOKEN} piece (id {self._sp.piece_to_id(MASK_TOKEN)}); dv3 puts "
                f"{MASK_TOKEN} after the pieces, so the model must not contain it"
            )

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def num_pieces(self) -> int:
        return self._sp.get_piece_size()

    @property
    def mask_token_id(self) -> int:
        return self.num_pieces

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the pieces plus ``[MASK]``."""
        return self.num_pieces + 1

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {"pad": PAD_ID, "cls": CLS_ID, "sep": SEP_ID, "unk": UNK_ID, "mask": self.mask_token_id}

    @property
    def byte_fallback(self) -> bool:
        return self._model().trainer_spec.byte_fallback

    @property
    def normalization(self) -> str:
        return self._model().normalizer_spec.name

    def _model(self):  # noqa: ANN202 - the protobuf class is generated
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._model_proto)
        return proto

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no ``[CLS]``/``[SEP]``), after :func:`normalize_text`."""
        normalized = [normalize_text(text) for text in texts]
        return self._sp.encode(normalized, num_threads=max(1, num_threads))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) < self.num_pieces])

    def id_to_piece(self, token_id: int) -> str:
        return MASK_TOKEN if token_id == self.mask_token_id else self._sp.id_to_piece(int(token_id))


@dataclass(frozen=True)
class TokenizerTrainingConfig:
    """How to train the unigram model."""

    vocab_size: int = 16000  # SentencePiece pieces, [PAD] [CLS] [SEP] [UNK] included; [MASK] comes after
    character_coverage: float = 0.9995  # share of characters covered by pieces; the rest become [UNK]
    input_sentence_size: int = 1_000_000  # sentences sampled from the corpus to train on
    byte_fallback: bool = False  # unknown characters as UTF-8 byte pieces (Hugging Face's tokenizer ignores it)
    language_alpha: float = 0.3  # multilingual: language i's share of sentences is proportional to p_i ** alpha
    seed: int = 0
    num_threads: int = 0  # 0 = every core this process may use
    max_sentence_chars: int = 4096  # longer lines are cut at whitespace (SentencePiece skips over-long ones)

    def __post_init__(self) -> None:
        if self.vocab_size < 8:
            raise ConfigError(f"vocab_size must be at least 8 (4 special pieces and some text), got {self.vocab_size}")
        if self.byte_fallback and self.vocab_size < 256 + 8:
            raise ConfigError(f"vocab_size must exceed 264 with byte_fallback (256 byte pieces), got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(f"character_coverage must be in [0.9, 1], got {self.character_coverage}")
        if self.input_sentence_size < 1:
            raise ConfigError(f"input_sentence_size must be positive, got {self.input_sentence_size}")
        if not 0.0 <= self.language_alpha <= 1.0:
            raise ConfigError(f"language_alpha must be in [0, 1], got {self.language_alpha}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0 (0 = all cores), got {self.num_threads}")
        if self.max_sentence_chars < 64:
            raise ConfigError(f"max_sentence_chars must be at least 64, got {self.max_sentence_chars}")

    def to_dict(self) -> dict:
        return asdict(self)


def language_probabilities(counts: dict[str, int], alpha: float) -> dict[str, float]:
    """Sampling probability of each language: ``p_i ** alpha`` normalized, ``p_i`` its share of ``counts``."""
    total = sum(counts.values())
    if total <= 0:
        raise ValueError("language_probabilities needs at least one positive count")
    weights = {language: (count / total) ** alpha for language, count in counts.items() if count > 0}
    norm = sum(weights.values())
    return {language: weights.get(language, 0.0) / norm for language in counts}


class SentenceSampler:
    """A uniform sample of each language's sentences (reservoir sampling, bounded memory), then
    resampled so language i contributes ``p_i ** alpha``-proportional shares of the training set."""

    def __init__(self, capacity: int, max_sentence_chars: int, seed: int) -> None:
        self.capacity = capacity
        self.max_sentence_chars = max_sentence_chars
        self._rng = random.Random(seed)
        self.seen: dict[str, int] = {}
        self._reservoirs: dict[str, list[str]] = {}

    def add_document(self, text: str, language: str) -> None:
        for line in text.split("\n"):
            line = normalize_text(line)
            if line.strip():
                for sentence in split_long_text(line, self.max_sentence_chars):
                    self._add(sentence, language)

    def _add(self, sentence: str, language: str) -> None:
        seen = self.seen.get(language, 0)
        reservoir = self._reservoirs.setdefault(language, [])
        if seen < self.capacity:
            reservoir.append(sentence)
        else:
            slot = self._rng.randrange(seen + 1)
            if slot < self.capacity:
                reservoir[slot] = sentence
        self.seen[language] = seen + 1

    def sample(self, total: int, alpha: float) -> tuple[list[str], dict[str, int]]:
        """``min(total, sentences seen)`` sentences, shuffled, and how many came from each language."""
        available = sum(self.seen.values())
        if available == 0:
            return [], {}
        budget = min(total, available)
        probabilities = language_probabilities(self.seen, alpha)
        languages = sorted(probabilities)
        counts = largest_remainder([probabilities[language] for language in languages], budget)
        quotas = dict(zip(languages, counts.tolist(), strict=True))
        chosen: list[str] = []
        for language in sorted(quotas):
            reservoir = self._reservoirs[language]
            quota = quotas[language]
            repeats, rest = divmod(quota, len(reservoir))
            # A small language is upsampled by repetition, as XLM-R's sampling does.
            chosen.extend(reservoir * repeats)
            chosen.extend(self._rng.sample(reservoir, rest))
        self._rng.shuffle(chosen)
        return chosen, quotas


def train_tokenizer(
    documents: Iterable[Document], config: TokenizerTrainingConfig, output: str | os.PathLike
) -> tuple[SentencePieceTokenizer, dict]:
    """Train a unigram model on ``documents`` and write it atomically to ``output``.

    Returns the loaded tokenizer and a summary (sentences seen and used per language) for the record.
    """
    import sentencepiece

    output = Path(output)
    sampler = SentenceSampler(config.input_sentence_size, config.max_sentence_chars, config.seed)
    for document in documents:
        sampler.add_document(document.text, document.language)
    sentences, used = sampler.sample(config.input_sentence_size, config.language_alpha)
    if not sentences:
        raise CorpusError("the corpus holds no text to train a tokenizer on (every document is empty)")
    num_threads = config.num_threads or default_num_threads()
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="unigram",
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            byte_fallback=config.byte_fallback,
            pad_id=PAD_ID,
            pad_piece=SPECIAL_PIECES[PAD_ID],
            bos_id=CLS_ID,
            bos_piece=SPECIAL_PIECES[CLS_ID],
            eos_id=SEP_ID,
            eos_piece=SPECIAL_PIECES[SEP_ID],
            unk_id=UNK_ID,
            unk_piece=SPECIAL_PIECES[UNK_ID],
            normalization_rule_name="identity",  # normalize_text does Hugging Face's normalization
            input_sentence_size=0,  # the sampler already chose the sentences
            shuffle_input_sentence=False,
            max_sentence_length=4 * config.max_sentence_chars + 16,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1]
        hint = ""
        if "Vocabulary size too high" in message:
            hint = "; the corpus is too small for this many pieces: pass a smaller --vocab-size"
        elif "required_chars" in message:
            hint = "; the corpus has more distinct characters than pieces: pass a larger --vocab-size or a lower --character-coverage"
        raise TokenizerError(f"SentencePiece training failed: {message}{hint}") from error
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output, model.getvalue())
    tokenizer = SentencePieceTokenizer(output)
    summary = {
        "sentences_seen": dict(sorted(sampler.seen.items())),
        "sentences_used": dict(sorted(used.items())),
        "config": config.to_dict(),
    }
    logger.info(
        "trained a %d-piece unigram tokenizer on %d sentences (%s)",
        tokenizer.num_pieces,
        len(sentences),
        ", ".join(f"{language}: {count}" for language, count in sorted(used.items())),
    )
    return tokenizer, summary
