"""Errors every dv3 command shares."""


class CommandError(Exception):
    """A failure the user can fix; ``dv3`` prints its message on one line and exits 2."""

# A run stopped by SIGUSR1/SIGTERM after writing a checkpoint: SLURM requeues it, and running the
# same command again resumes (EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75
