"""``dv3 data stats``: what a prepared directory holds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.corpus import histogram_bucket
from data_pipeline.shards import SPLITS, load_manifest, open_shard


def dataset_stats(data_dir: str | os.PathLike) -> dict:
    """Totals per split and language, the corpus statistics recorded at preparation, and the
    distribution of tokens per row (read from the memory-mapped shards)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    splits: dict[str, dict] = {}
    row_lengths: dict[str, int] = {}
    for split in SPLITS:
        shards = manifest.shards_of(split)
        languages: dict[str, dict[str, int]] = {}
        for shard in shards:
            entry = languages.setdefault(shard.language, {"shards": 0, "rows": 0, "tokens": 0, "bytes": 0})
            entry["shards"] += 1
            entry["rows"] += shard.rows
            entry["tokens"] += shard.tokens
            entry["bytes"] += shard.bytes
        splits[split] = {
            "shards": len(shards),
            "rows": sum(s.rows for s in shards),
            "tokens": sum(s.tokens for s in shards),
            "bytes": sum(s.bytes for s in shards),
            "languages": dict(sorted(languages.items())),
        }
    lengths = []
    for shard in manifest.shards:
        opened = open_shard(data_dir, shard, manifest.seq_len)
        for rows in opened.input_ids:
            lengths.append(np.count_nonzero(rows, axis=1))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    for value, count in zip(*np.unique(all_lengths, return_counts=True), strict=True):
        bucket = histogram_bucket(int(value))
        row_lengths[bucket] = row_lengths.get(bucket, 0) + int(count)
    full = int(np.count_nonzero(all_lengths == manifest.seq_len))
    return {
        "data_dir": str(data_dir),
        "seq_len": manifest.seq_len,
        "packing": manifest.packing,
        "tokenizer": {
            "file": manifest.tokenizer.file,
            "sha256": manifest.tokenizer.sha256,
            "vocab_size": manifest.tokenizer.vocab_size,
            "mask_token_id": manifest.tokenizer.mask_token_id,
        },
        "rows": manifest.rows,
        "tokens": manifest.tokens,
        "splits": splits,
        "row_tokens": {
            "full_rows": full,
            "mean": float(all_lengths.mean()) if len(all_lengths) else 0.0,
            "min": int(all_lengths.min()) if len(all_lengths) else 0,
            "max": int(all_lengths.max()) if len(all_lengths) else 0,
            "histogram": dict(sorted(row_lengths.items(), key=lambda item: int(item[0][2:]))),
        },
        "corpus": manifest.corpus,
    }


def format_stats(stats: dict) -> str:
    """A human-readable rendering of :func:`dataset_stats`."""
    lines = [
        f"{stats['data_dir']}: {stats['rows']:,} rows, {stats['tokens']:,} tokens, seq_len {stats['seq_len']}, "
        f"packing {stats['packing']}",
        f"tokenizer {stats['tokenizer']['file']} (vocab {stats['tokenizer']['vocab_size']:,} with [MASK]="
        f"{stats['tokenizer']['mask_token_id']}, sha256 {stats['tokenizer']['sha256'][:12]}…)",
    ]
    for split, entry in stats["splits"].items():
        lines.append(
            f"{split:<10} {entry['shards']:>5} shards {entry['rows']:>12,} rows {entry['tokens']:>15,} tokens "
            f"{entry['bytes'] / 2**20:>10.1f} MiB"
        )
        for language, counts in entry["languages"].items():
            lines.append(
                f"  {language:<8} {counts['shards']:>5} shards {counts['rows']:>12,} rows "
                f"{counts['tokens']:>15,} tokens"
            )
    row = stats["row_tokens"]
    lines.append(
        f"tokens per row: mean {row['mean']:.1f}, min {row['min']}, max {row['max']}, {row['full_rows']:,} full rows"
    )
    lines.extend(_histogram(row["histogram"]))
    corpus = stats["corpus"]
    if corpus:
        lines.append(
            f"corpus: {corpus.get('files', 0)} files, {corpus.get('documents', 0):,} documents, "
            f"{corpus.get('empty_documents', 0):,} empty skipped, {corpus.get('invalid_utf8_replacements', 0):,} "
            f"invalid UTF-8 sequences replaced in {corpus.get('invalid_utf8_documents', 0):,} documents, "
            f"{corpus.get('split_documents', 0):,} long documents cut, {corpus.get('malformed_records', 0):,} "
            f"malformed records, {len(corpus.get('skipped_files', []))} files skipped"
        )
        for skipped in corpus.get("skipped_files", []):
            lines.append(f"  skipped {skipped['file']}: {skipped['reason']}")
        for language, counts in corpus.get("languages", {}).items():
            lines.append(
                f"  {language:<8} {counts['documents']:>10,} documents {counts['tokens']:>15,} tokens "
                f"({counts.get('validation_documents', 0):,} documents held out)"
            )
        if corpus.get("document_tokens_histogram"):
            lines.append("tokens per document:")
            lines.extend(_histogram(corpus["document_tokens_histogram"]))
    return "\n".join(lines)


def _histogram(histogram: dict[str, int], width: int = 40) -> list[str]:
    if not histogram:
        return []
    peak = max(histogram.values())
    return [
        f"  {bucket:>9} {count:>12,} {'#' * max(1, round(width * count / peak))}" for bucket, count in histogram.items()
    ]
