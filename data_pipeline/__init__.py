"""dv3 data pipeline: corpus readers, SentencePiece tokenizer, Arrow shards with a manifest, the
distributed resumable loader, dynamic masking and multilingual sampling.

Public API (imported lazily, so ``from data_pipeline.cli import register`` stays cheap)::

    PretrainLoader, DatasetInfo, dataset_info          # data_pipeline.loader
    MaskingConfig, MaskedBatch, mask_batch, IGNORE_INDEX  # data_pipeline.masking
    PrepareConfig, prepare, merge                      # data_pipeline.prepare
    load_manifest, verify_dataset, Manifest            # data_pipeline.shards
    SentencePieceTokenizer                             # data_pipeline.tokenizer
    InputError, DataPipelineError and its subclasses   # data_pipeline.errors

This package never imports ``engine`` or ``kernels``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PretrainLoader": "data_pipeline.loader",
    "DatasetInfo": "data_pipeline.loader",
    "dataset_info": "data_pipeline.loader",
    "MaskingConfig": "data_pipeline.masking",
    "MaskedBatch": "data_pipeline.masking",
    "mask_batch": "data_pipeline.masking",
    "IGNORE_INDEX": "data_pipeline.masking",
    "MASKING_STRATEGIES": "data_pipeline.masking",
    "PrepareConfig": "data_pipeline.prepare",
    "prepare": "data_pipeline.prepare",
    "merge": "data_pipeline.prepare",
    "Manifest": "data_pipeline.shards",
    "load_manifest": "data_pipeline.shards",
    "verify_dataset": "data_pipeline.shards",
    "SentencePieceTokenizer": "data_pipeline.tokenizer",
    "TokenizerTrainingConfig": "data_pipeline.tokenizer",
    "ReaderConfig": "data_pipeline.corpus",
    "InputError": "data_pipeline.errors",
    "DataPipelineError": "data_pipeline.errors",
    "ConfigError": "data_pipeline.errors",
    "CorpusError": "data_pipeline.errors",
    "TokenizerError": "data_pipeline.errors",
    "ShardError": "data_pipeline.errors",
    "ManifestError": "data_pipeline.errors",
    "OutputError": "data_pipeline.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy exports
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
