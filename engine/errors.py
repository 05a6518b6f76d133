"""The errors every dv3 command shares, and its exit statuses.

One hierarchy for bad input: ``InputError`` is its root (defined in ``data_pipeline.errors``,
the lowest package that reads what a user gives, so the data pipeline's errors belong to it
too). The ``dv3`` command prints any ``InputError`` on one line and exits with ``EXIT_BAD_INPUT``;
anything else is a bug and keeps its traceback.
"""

from data_pipeline.errors import ConfigError, DataPipelineError, InputError, OutputError

__all__ = ["CheckpointError", "ConfigError", "DataPipelineError", "ExportError", "InputError", "OutputError",
           "EXIT_BAD_INPUT", "EXIT_NONFINITE", "EXIT_PREEMPTED"]


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from or converted: missing, incomplete, or from another run."""


class ExportError(InputError):
    """A checkpoint that cannot be exported, or an export destination that cannot be written."""


EXIT_BAD_INPUT = 2
# Stopped after too many non-finite losses in a row; the last good checkpoint is untouched.
EXIT_NONFINITE = 1
# Stopped by SIGUSR1/SIGTERM after writing a checkpoint: SLURM requeues it, and running the
# same command again resumes (EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75
