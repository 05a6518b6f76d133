"""Errors of the data pipeline: each says what is wrong, where, and what to do about it.

The CLI prints ``str(error)`` on one line and exits with status 2; library users catch
``DataPipelineError`` (or one of its subclasses) to handle any of them.
"""

from __future__ import annotations


class DataPipelineError(Exception):
    """Base class: a problem with the data, its files or the pipeline's settings."""


class ConfigError(DataPipelineError, ValueError):
    """A setting is out of range or inconsistent; the message names the field."""


class CorpusError(DataPipelineError):
    """The input corpus cannot be read, or holds no usable text."""


class TokenizerError(DataPipelineError):
    """The tokenizer cannot be trained or loaded, or is not the one the shards were made with."""


class ShardError(DataPipelineError):
    """A shard is missing, truncated, or differs from what the manifest recorded."""


class ManifestError(DataPipelineError):
    """The manifest is missing, unreadable, or inconsistent with the data directory."""
