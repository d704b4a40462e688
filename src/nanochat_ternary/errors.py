"""Errors meant for the user: the CLI prints their message on one line and exits non-zero.

Each class carries the exit status the CLI returns for it, so a wrapper script or a scheduler can
tell "fix your input" (1) from "the run diverged" (3) from "stopped on a signal, resume me" (75)
without parsing text. The statuses are listed in the README. Any other exception reaching the CLI is
a bug: ``cli.main`` prints one ``internal error: ...; details in FILE`` line (the traceback in FILE)
and exits 70 (``cli.EXIT_INTERNAL``).
"""


class UserError(Exception):
    """Bad input (data, config, checkpoint, paths). The message is one line that names the problem."""

    exit_status: int = 1
    prefix: str = "error"


class ConfigError(UserError):
    """A bad configuration value or source; its message is one line meant for the user."""


class DataError(UserError):
    """Missing, empty, truncated or inconsistent data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, incomplete or does not match the model."""
