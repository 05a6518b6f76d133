"""Errors every dv3 command shares."""


class CommandError(Exception):
    """A failure the user can fix; ``dv3`` prints its message on one line and exits 2."""
