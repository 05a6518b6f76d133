"""Errors of the data pipeline: each says what is wrong, where, and what to do about it.

``InputError`` is the root of every error a user can fix by changing what they gave dv3 (a file,
a directory, a setting); the ``dv3`` command prints ``str(error)`` on one line and exits with
status 2. The engine's own input errors derive from it too. Library users catch
``DataPipelineError`` (or one of its subclasses) for the data pipeline's, ``InputError`` for all.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input a user can fix; the dv3 command prints its message on one line and exits 2."""


class DataPipelineError(InputError):
    """A problem with the data, its files or the pipeline's settings."""


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


class OutputError(InputError):
    """An output cannot be written (not a directory, no permission, read-only, no space left); the
    message names the path, and files written before are left as they were."""
