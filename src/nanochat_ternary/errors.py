"""Errors meant for the user: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input (data, config, checkpoint, paths). The message is one line that names the problem."""


class DataError(UserError):
    """Missing, empty, truncated or inconsistent data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, incomplete or does not match the model."""
