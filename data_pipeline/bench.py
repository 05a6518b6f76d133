"""``dv3 bench data`` (also ``python -m data_pipeline.bench``): how fast the data path is, on this machine.

Measured in one run, on the same token data:

- tokenization: tokens/s on one core and on all cores (SentencePiece encoding with the
  normalization the tokenizer needs), and ``dv3 data prepare`` end to end (read, encode, pack,
  write, hash) on a JSONL copy of the corpus;
- the loader: tokens/s of masked batches (``PretrainLoader``, RTD masking) in one process and
  with worker processes; unmasked in one process as well;
- the baseline, the way users typically feed MLM today: Hugging Face ``datasets`` (memory-mapped
  Arrow via ``save_to_disk``/``load_from_disk``) through a PyTorch ``DataLoader`` with
  transformers' ``DataCollatorForLanguageModeling``, in one process and with workers;
- the ceiling: this machine's memory-copy bandwidth (and the tokens/s it would carry at 4 bytes
  a token).

Targets (issue 3): the loader at least 10x faster than the baseline, and at least 2 million masked
tokens/s on one core. Figures are printed and written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TARGET_RATIO = 10.0
TARGET_TOKENS_PER_S = 2_000_000


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, metavar="DIR",
        help="a prepared directory to read (default: prepare the default English corpus in --work-dir)",
    )  # fmt: skip
    parser.add_argument(
        "--corpus", nargs="+", metavar="INPUT",
        help="text to time tokenization on, in --data's language (default: the English default corpus; "
        "with --data and no --corpus, tokenization is not timed)",
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--seq-len", type=int, default=512, help="row length when preparing the default corpus")
    parser.add_argument("--vocab-size", type=int, default=16000, help="tokenizer pieces when preparing the default")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (one rank's micro-batch)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time of each loader figure")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes for the 'with workers' figures (0 = cores - 1: the training process keeps one)",
    )
    parser.add_argument("--masking", default="rtd", choices=["rtd", "bert", "electra"], help="masking strategy")
    parser.add_argument("--skip-baseline", action="store_true", help="do not measure the datasets baseline")
    parser.add_argument(
        "--documents", type=int, default=0, help="tokenize only this many documents of the corpus (0 = all)"
    )
    parser.add_argument("--copy-mib", type=int, default=256, help="buffer size of the memory-copy measurement")
    parser.add_argument(
        "--output", type=Path, help="JSON file to write (default: benchmarks/results/data-bench-<date>.json)"
    )


def _cores() -> int:
    from data_pipeline.tokenizer import default_num_threads

    return default_num_threads()  # the cores this process may use


def machine_info() -> dict:
    import pyarrow
    import torch

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": _cores(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
    }
    for name in ("datasets", "transformers", "sentencepiece"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def tokens_per_second(batches: Iterator, tokens_per_batch: int, seconds: float, warmup: int = 3) -> dict:
    """Draw ``warmup`` batches (start-up, worker spawn), then time batches for ``seconds``."""
    for _ in range(warmup):
        next(batches)
    count = 0
    start = time.perf_counter()
    while True:
        next(batches)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"tokens_per_s": count * tokens_per_batch / elapsed, "batches": count, "seconds": elapsed}


def memory_copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    source = np.ones(megabytes << 18, dtype=np.int32)  # megabytes MiB
    target = np.empty_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    bandwidth = source.nbytes / best
    return {"bytes_per_s": bandwidth, "gib_per_s": bandwidth / 2**30, "tokens_per_s_at_4_bytes": bandwidth / 4}


def _forever(make: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _time_tokenization(corpus_files, tokenizer, args: argparse.Namespace, cores: int, seq_len: int,
                       work: Path) -> dict:
    """SentencePiece encoding on one core and on all, then ``dv3 data prepare`` end to end."""
    from data_pipeline.corpus import DocumentReader, ReaderConfig
    from data_pipeline.prepare import PrepareConfig, prepare

    _log("tokenization ...")
    reader = DocumentReader(ReaderConfig())
    documents = (d.text for f in corpus_files for d in reader.read(f))
    texts = list(itertools.islice(documents, args.documents or None))
    tokenization = {"characters": sum(len(t) for t in texts)}
    for label, threads in (("one_core", 1), ("all_cores", cores)):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            encoded = tokenizer.encode(texts, num_threads=threads)
            best = min(best, time.perf_counter() - start)
        tokenization["tokens"] = sum(len(ids) for ids in encoded)
        tokenization[f"tokens_per_s_{label}"] = tokenization["tokens"] / best
    tokenization["cores"] = cores
    tokenization["tokens_per_s_per_core_all_cores"] = tokenization["tokens_per_s_all_cores"] / cores
    corpus = work / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}) + "\n")
    start = time.perf_counter()
    prepared = prepare(
        PrepareConfig(
            output=work / "prepare-bench", inputs=(str(corpus),), tokenizer=tokenizer.path, seq_len=seq_len,
            validation_fraction=0.0, progress=False, overwrite=True,
        )
    ).manifest  # fmt: skip
    elapsed = time.perf_counter() - start
    tokenization["prepare_end_to_end_tokens_per_s"] = prepared.tokens / elapsed
    tokenization["prepare_end_to_end_note"] = "JSONL in, verified shards and manifest out, all cores, one part"
    return tokenization


def run(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import ReaderConfig, resolve_inputs
    from data_pipeline.default_corpus import default_corpus_inputs
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.loader import PretrainLoader
    from data_pipeline.masking import MaskingConfig
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.shards import load_manifest
    from data_pipeline.tokenizer import SentencePieceTokenizer, TokenizerTrainingConfig

    cores = _cores()
    workers = args.workers or max(1, cores - 1)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dv3-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = args.data
        if data is None:
            data = work / "default"
            _log(f"preparing the default English corpus in {data} ...")
            prepare(
                PrepareConfig(
                    output=data, seq_len=args.seq_len, training=TokenizerTrainingConfig(vocab_size=args.vocab_size),
                    validation_fraction=0.0, progress=False,
                )
            )  # fmt: skip
        manifest = load_manifest(data)
        seq_len = manifest.seq_len
        batch_tokens = args.batch_size * seq_len
        tokenizer = SentencePieceTokenizer(data / manifest.tokenizer.file)
        result: dict = {
            "benchmark": "data",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "settings": {
                "batch_size": args.batch_size, "seq_len": seq_len, "seconds": args.seconds, "workers": workers,
                "masking": args.masking, "mask_prob": 0.15,
            },
            # a temporary folder's name would only say which machine ran it
            "dataset": {"dir": str(args.data) if args.data else "the default English corpus, prepared for this run",
                        "rows": manifest.rows, "tokens": manifest.tokens,
                        "vocab_size": manifest.tokenizer.vocab_size},
        }  # fmt: skip

        # -- tokenization -----------------------------------------------------------------------
        if args.corpus:
            corpus_files = resolve_inputs(args.corpus, ReaderConfig())
        elif args.data is None:
            corpus_files = default_corpus_inputs("english")  # the text the default data was made from
        else:
            corpus_files = None  # another language's tokenizer on English text would time nothing useful
        result["tokenization"] = (_time_tokenization(corpus_files, tokenizer, args, cores, seq_len, work)
                                  if corpus_files is not None else
                                  {"skipped": "--data given without --corpus: pass text in the data's language"})

        # -- our loader -------------------------------------------------------------------------
        masking = MaskingConfig(args.masking)
        loader_figures = {}
        for label, kwargs in (
            ("single_process_masked", {"masking": masking}),
            ("single_process_unmasked", {}),
            ("workers_masked", {"masking": masking, "num_workers": workers}),
        ):
            _log(f"loader: {label} ...")
            loader = PretrainLoader(data, batch_size=args.batch_size, seed=0, **kwargs)
            loader_figures[label] = tokens_per_second(loader, batch_tokens, args.seconds)
            loader.close()
        result["loader"] = loader_figures

        # -- the datasets baseline --------------------------------------------------------------
        if not args.skip_baseline:
            result["baseline"] = _baseline(data, work, args.batch_size, batch_tokens, args.seconds, workers)
            ours, theirs = result["loader"], result["baseline"]
            result["ratios"] = {
                "single_process": ours["single_process_masked"]["tokens_per_s"]
                / theirs["single_process"]["tokens_per_s"],
                "workers": ours["workers_masked"]["tokens_per_s"] / theirs["workers"]["tokens_per_s"],
            }

        _log("memory copy ...")
        result["memory_copy"] = memory_copy_bandwidth(args.copy_mib)
        single = result["loader"]["single_process_masked"]["tokens_per_s"]
        result["targets"] = {
            "masked_tokens_per_s_one_core": {"target": TARGET_TOKENS_PER_S, "value": single,
                                             "met": single >= TARGET_TOKENS_PER_S},
        }  # fmt: skip
        if "ratios" in result:
            ratio = result["ratios"]["single_process"]
            result["targets"]["ratio_to_datasets"] = {
                "target": TARGET_RATIO,
                "value": ratio,
                "met": ratio >= TARGET_RATIO,
            }
    except DataPipelineError as error:
        print(f"dv3 bench data: error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    output = args.output or Path("benchmarks/results") / f"data-bench-{dt.date.today().isoformat()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(format_result(result))
    print(f"wrote {output}")
    return 0


def _baseline(data: Path, work: Path, batch_size: int, batch_tokens: int, seconds: float, workers: int) -> dict:
    """The same rows through datasets (memory-mapped Arrow) + DataLoader + DataCollatorForLanguageModeling."""
    import datasets
    import torch
    from transformers import DataCollatorForLanguageModeling, DebertaV2Tokenizer

    from data_pipeline.shards import load_manifest, open_shard

    _log("baseline: building the datasets copy ...")
    manifest = load_manifest(data)
    rows = np.concatenate(
        [np.concatenate(open_shard(data, s, manifest.seq_len).input_ids) for s in manifest.shards_of("train")]
    )
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    dataset = datasets.Dataset.from_dict({"input_ids": [row[row != 0].tolist() for row in rows]}, features=features)
    dataset.save_to_disk(str(work / "hf-dataset"))
    dataset = datasets.load_from_disk(str(work / "hf-dataset"))  # memory-mapped Arrow, as after map() in run_mlm
    tokenizer = DebertaV2Tokenizer.from_pretrained(data)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True, mlm_probability=0.15)
    figures = {"how": "datasets.load_from_disk -> torch DataLoader(shuffle=True) -> DataCollatorForLanguageModeling"}
    for label, count in (("single_process", 0), ("workers", workers)):
        _log(f"baseline: {label} ...")

        def batches(num_workers: int = count) -> Iterator:
            return iter(
                torch.utils.data.DataLoader(
                    dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=num_workers,
                    drop_last=True,
                )
            )  # fmt: skip

        figures[label] = tokens_per_second(_forever(batches), batch_tokens, seconds)
    return figures


def format_result(result: dict) -> str:
    def rate(value: float) -> str:
        return f"{value / 1e6:8.2f} M tokens/s"

    tok = result["tokenization"]
    lines = [
        f"data pipeline benchmark, {result['date']}, {result['machine'].get('cpu', '?')} ({result['machine']['cores']} cores)",
        f"batch {result['settings']['batch_size']} x {result['settings']['seq_len']}, masking {result['settings']['masking']}",
    ]
    if "skipped" in tok:
        lines.append(f"tokenization not timed: {tok['skipped']}")
    else:
        lines += [
            f"tokenization, one core            {rate(tok['tokens_per_s_one_core'])}",
            f"tokenization, {tok['cores']} cores ({rate(tok['tokens_per_s_per_core_all_cores']).strip()} per core)"
            f" {rate(tok['tokens_per_s_all_cores'])}",
            f"prepare end to end                {rate(tok['prepare_end_to_end_tokens_per_s'])}",
        ]
    loader = result["loader"]
    lines += [
        f"loader, masked, one process       {rate(loader['single_process_masked']['tokens_per_s'])}",
        f"loader, unmasked, one process     {rate(loader['single_process_unmasked']['tokens_per_s'])}",
        f"loader, masked, {result['settings']['workers']} workers         {rate(loader['workers_masked']['tokens_per_s'])}",
    ]
    if "baseline" in result:
        base = result["baseline"]
        lines += [
            f"datasets baseline, one process    {rate(base['single_process']['tokens_per_s'])}",
            f"datasets baseline, {result['settings']['workers']} workers      {rate(base['workers']['tokens_per_s'])}",
            f"ratio, one process                {result['ratios']['single_process']:8.1f} x",
            f"ratio, workers                    {result['ratios']['workers']:8.1f} x",
        ]
    copy = result["memory_copy"]
    lines.append(
        f"memory copy ceiling               {rate(copy['tokens_per_s_at_4_bytes'])} ({copy['gib_per_s']:.1f} GiB/s)"
    )
    for name, target in result["targets"].items():
        lines.append(
            f"target {name}: {target['value']:.3g} vs {target['target']:.3g}: {'met' if target['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
