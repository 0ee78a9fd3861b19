"""Errors a user can act on: each message names the file, column, row or flag at fault."""


class EzmiaError(Exception):
    """Base class of every error ezmia reports to a user as one line, without a traceback."""


class InputError(EzmiaError):
    """Bad data, configuration or paths given by the user."""


class ModelError(EzmiaError):
    """A checkpoint that cannot be loaded safely or does not match its counterpart."""


class OutputError(EzmiaError):
    """An output location that would be overwritten or cannot be written."""
