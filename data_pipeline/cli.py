"""``dv3 data``: corpus to shards (``prepare``), the tokenizer alone (``train-tokenizer``), job-array
parts into one dataset (``merge``), integrity (``verify``) and contents (``stats``).

``register(subparsers)`` adds the ``data`` command to the ``dv3`` parser; every subcommand's
``func`` returns an exit status and turns an :class:`InputError` (every data pipeline error is one)
into a one-line message and status 2. ``python -m data_pipeline.cli data ...`` runs the same commands without the engine.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from data_pipeline.errors import InputError

_PREPARE_EPILOG = textwrap.dedent(
    """\
    inputs:
      Files, directories (read recursively, hidden files skipped) and globs (quote them; ** recurses)
      of plain text, JSONL (.jsonl/.json/.ndjson), Parquet (.parquet/.pq) and MediaWiki XML dumps
      (.xml), optionally compressed (.gz, .bz2, .xz). Languages come from --language, else from a
      corpus/<lang>/... layout (a directory named like 'en', 'de' or 'zh-Hans' right under a
      directory input), else 'und'. With no input the default corpus is used: --default-corpus
      english = the English Wikipedia articles in gensim's test data; multilingual = Debian's
      fortunes-{de,es,it,ru,zh,pl,br,cs} packages plus the Bulgarian and English Wikipedia articles
      in gensim's test data.

    output (DIR):
      spm.model, shards/*.arrow (uncompressed Arrow IPC, fixed-size lists of int32 input_ids),
      parts/*.json and, written last, manifest.json. A rerun with the same inputs and settings
      does nothing, or resumes part by part after an interruption.

    job arrays (SLURM):
      dv3 data train-tokenizer INPUT... --output DIR --vocab-size N      # once
      dv3 data prepare INPUT... --output DIR --num-parts K --part $SLURM_ARRAY_TASK_ID
      dv3 data merge DIR                                                 # after all K parts
    """
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its subcommands to the ``dv3`` command line."""
    data = subparsers.add_parser(
        "data",
        help="prepare, merge, verify and inspect pretraining shards",
        description="Corpus to verified Arrow shards, and what is in them.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: _print_help(data))

    prepare = commands.add_parser(
        "prepare",
        help="tokenize a corpus into Arrow shards with a manifest",
        description="Tokenize a corpus (or the embedded default corpus) into packed Arrow shards of "
        "seq-len tokens, with a tokenizer trained on it (or given) and a manifest that vouches for every shard.",
        epilog=_PREPARE_EPILOG,
        formatter_class=_Formatter,
    )
    prepare.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus files, directories or globs")
    prepare.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="dataset directory")
    _add_corpus_arguments(prepare)
    prepare.add_argument(
        "--tokenizer",
        type=Path,
        metavar="SPM_MODEL",
        help="use this SentencePiece model (e.g. DeBERTa-v3's spm.model) instead of training one",
    )
    _add_training_arguments(prepare)
    prepare.add_argument(
        "--seq-len", type=int, default=512, help="tokens per row, [CLS] and [SEP] included (8 to 65536)"
    )
    prepare.add_argument(
        "--packing",
        choices=["stream", "document"],
        default="stream",
        help="stream: documents concatenated and cut into seq-len - 2 pieces (official); "
        "document: rows never cross a document boundary, the last row of each document is padded",
    )
    prepare.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        help="share of documents held out as validation shards (chosen by a hash of file and document)",
    )
    prepare.add_argument("--split-seed", type=int, default=0, help="seed of the held-out document choice")
    prepare.add_argument(
        "--rows-per-shard", type=int, help="rows per shard file (default: 64 MiB of rows, 32768 at --seq-len 512)"
    )
    prepare.add_argument(
        "--record-batch-rows",
        type=int,
        help="rows per Arrow record batch (default: 8 MiB of rows, 4096 at --seq-len 512)",
    )
    prepare.add_argument(
        "--num-parts",
        type=int,
        default=1,
        help="split the input files into this many parts (balanced by size); the unit of resumption and of job arrays",
    )
    prepare.add_argument(
        "--part",
        type=int,
        metavar="I",
        help="prepare only part I (0-based) of --num-parts, e.g. $SLURM_ARRAY_TASK_ID; needs the tokenizer "
        "fixed beforehand (train-tokenizer or --tokenizer); then run `dv3 data merge DIR`",
    )
    prepare.add_argument(
        "--threads", type=int, default=0, help="tokenizer training and tokenization threads (0 = all cores)"
    )
    prepare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset in DIR prepared from other inputs or settings",
    )
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    prepare.set_defaults(func=_guarded(_prepare))

    train = commands.add_parser(
        "train-tokenizer",
        help="train DIR/spm.model only (before a job array of prepare --part)",
        description="Train the SentencePiece unigram tokenizer on the whole corpus and write DIR/spm.model "
        "(and DIR/spm.json, how it was trained), so the parts of a job array all tokenize with it.",
        formatter_class=_Formatter,
    )
    train.add_argument("inputs", nargs="*", metavar="INPUT", help="corpus files, directories or globs")
    train.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="dataset directory")
    _add_corpus_arguments(train)
    _add_training_arguments(train)
    train.add_argument("--threads", type=int, default=0, help="training threads (0 = all cores)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_guarded(_train_tokenizer))

    merge = commands.add_parser(
        "merge",
        help="verify the parts of a job array and write DIR/manifest.json",
        description="Check that every part of a `prepare --num-parts K --part I` job array is present and was "
        "made with the same inputs, settings and tokenizer, verify every shard (sha256 and row checksums) "
        "and write DIR/manifest.json.",
        formatter_class=_Formatter,
    )
    merge.add_argument("data_dir", type=Path, metavar="DIR")
    merge.add_argument("--no-verify", action="store_true", help="check sizes and footers only, not the sha256")
    merge.add_argument("--threads", type=int, default=0, help="hashing threads (0 = all cores)")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.set_defaults(func=_guarded(_merge))

    verify = commands.add_parser(
        "verify",
        help="check every shard against the manifest",
        description="Check the tokenizer and every shard of DIR against DIR/manifest.json (size, Arrow footer, "
        "schema, rows, sha256 and every row's checksum). Prints each bad shard and exits with status 2 if any.",
        formatter_class=_Formatter,
    )
    verify.add_argument("data_dir", type=Path, metavar="DIR")
    verify.add_argument("--quick", action="store_true", help="sizes, footers and row counts only (no hashing)")
    verify.add_argument(
        "--tokenizer", type=Path, metavar="SPM_MODEL", help="also check that the shards were made with this tokenizer"
    )
    verify.add_argument("--threads", type=int, default=0, help="hashing threads (0 = all cores)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(func=_guarded(_verify))

    stats = commands.add_parser(
        "stats",
        help="tokens, rows, languages and length distributions",
        description="Print what DIR holds: rows and tokens per split and language, tokens per row and per "
        "document, and what preparing the corpus found (empty documents, invalid UTF-8, skipped files).",
        formatter_class=_Formatter,
    )
    stats.add_argument("data_dir", type=Path, metavar="DIR")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(func=_guarded(_stats))


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-corpus",
        choices=["english", "multilingual"],
        default="english",
        help="the embedded corpus used when no INPUT is given",
    )
    parser.add_argument(
        "--format",
        choices=["auto", "text", "jsonl", "parquet", "mediawiki", "fortune"],
        default="auto",
        help="input format; auto decides by extension",
    )
    parser.add_argument(
        "--text-unit",
        choices=["block", "line"],
        default="block",
        help="plain text: one document per blank-line separated block, or per line",
    )
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--language", metavar="LANG", help="language of every input (default: from the layout)")
    parser.add_argument(
        "--max-document-chars",
        type=int,
        default=1_000_000,
        help="longer documents are cut at whitespace into consecutive pieces (bounds memory)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=16000,
        help="SentencePiece pieces to train, [PAD] [CLS] [SEP] [UNK] included; [MASK] is added after them, "
        "so the model's vocabulary is this + 1",
    )
    parser.add_argument("--character-coverage", type=float, default=0.9995, help="share of characters covered")
    parser.add_argument(
        "--input-sentence-size", type=int, default=1_000_000, help="sentences sampled from the corpus for training"
    )
    parser.add_argument(
        "--byte-fallback",
        action="store_true",
        help="unknown characters as byte pieces (note: Hugging Face's DebertaV2Tokenizer gives [UNK] instead)",
    )
    parser.add_argument(
        "--language-alpha",
        type=float,
        default=0.3,
        help="multilingual: language i's share of training sentences is proportional to p_i ** alpha",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sampling")


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command``; bad input becomes one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        _configure_logging()
        try:
            return command(args)
        except InputError as error:
            print(f"dv3 data {_name(args)}: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # what the commands did not name themselves: still one line, naming the file
            reason = os.strerror(error.errno) if error.errno else str(error)
            full = "no space left: " if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
            where = f"{error.filename}: " if error.filename else ""
            print(f"dv3 data {_name(args)}: error: {full}{where}{reason}", file=sys.stderr)
            return 2

    return run


def _name(args: argparse.Namespace) -> str:
    return getattr(args, "data_command", None) or "data"


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("gensim", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _reader_config(args: argparse.Namespace):  # noqa: ANN202
    from data_pipeline.corpus import ReaderConfig

    return ReaderConfig(
        format=args.format,
        text_unit=args.text_unit,
        text_field=args.text_field,
        language=args.language,
        max_document_chars=args.max_document_chars,
    )


def _training_config(args: argparse.Namespace):  # noqa: ANN202
    from data_pipeline.tokenizer import TokenizerTrainingConfig

    return TokenizerTrainingConfig(
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        byte_fallback=args.byte_fallback,
        language_alpha=args.language_alpha,
        seed=args.seed,
        num_threads=args.threads,
    )


def _prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        output=args.output,
        inputs=tuple(args.inputs),
        default_corpus=args.default_corpus,
        reader=_reader_config(args),
        tokenizer=args.tokenizer,
        training=_training_config(args),
        seq_len=args.seq_len,
        packing=args.packing,
        validation_fraction=args.validation_fraction,
        split_seed=args.split_seed,
        rows_per_shard=args.rows_per_shard,
        record_batch_rows=args.record_batch_rows,
        num_parts=args.num_parts,
        part=args.part,
        num_threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    result = prepare(config)
    print(result.message)
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import PrepareConfig, train_tokenizer_only

    config = PrepareConfig(
        output=args.output,
        inputs=tuple(args.inputs),
        default_corpus=args.default_corpus,
        reader=_reader_config(args),
        training=_training_config(args),
        progress=not args.no_progress,
    )
    tokenizer = train_tokenizer_only(config)
    print(
        f"wrote {tokenizer.path}: {tokenizer.num_pieces} pieces, [MASK]={tokenizer.mask_token_id}, "
        f"model vocabulary {tokenizer.vocab_size}, sha256 {tokenizer.sha256}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import merge, skipped_summary

    manifest = merge(args.data_dir, verify=not args.no_verify, num_threads=args.threads, progress=not args.no_progress)
    text_field = manifest.settings.get("reader", {}).get("text_field", "text")
    print(
        f"merged {manifest.num_parts} parts into {args.data_dir / 'manifest.json'}: {manifest.rows} rows, "
        f"{manifest.tokens} tokens in {len(manifest.shards)} shards{skipped_summary(manifest.corpus, text_field)}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_pipeline.errors import ShardError
    from data_pipeline.prepare import progress_bar
    from data_pipeline.shards import load_manifest, verify_dataset
    from data_pipeline.tokenizer import default_num_threads

    total = sum(shard.bytes for shard in load_manifest(args.data_dir).shards)
    bar = progress_bar(not args.no_progress, total=total, unit="B", unit_scale=True, desc="verifying")
    try:
        report = verify_dataset(
            args.data_dir,
            full=not args.quick,
            tokenizer=args.tokenizer,
            num_threads=args.threads or default_num_threads(),
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    for file, reason in report.bad:
        print(f"BAD {file}: {reason}")
    if not report.ok:
        names = ", ".join(file for file, _ in report.bad)
        raise ShardError(f"{len(report.bad)} problem(s) in {args.data_dir} ({report.checked} shards checked): {names}")
    kind = "sizes, footers and row counts" if args.quick else "sha256 and row checksums"
    print(f"{args.data_dir}: all {report.checked} shards match the manifest ({kind})")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from data_pipeline.stats import dataset_stats, format_stats

    stats = dataset_stats(args.data_dir)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    """A stand-alone ``dv3``-like parser holding only the data commands."""
    parser = argparse.ArgumentParser(prog="dv3", description="dv3 data commands")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(subparsers)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
