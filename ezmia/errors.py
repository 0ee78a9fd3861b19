"""Errors a user can act on: each message names the file, column, row or flag at fault."""


class EzmiaError(Exception):
    """Base class of every error ezmia reports to a user as one line, without a traceback."""


class InputError(EzmiaError):
    """Bad data, configuration or paths given by the user."""


class ModelError(EzmiaError):
    """A checkpoint that cannot be loaded safely or does not match its counterpart."""


class OutputError(EzmiaError):
    """An output location that would be overwritten or cannot be written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by ezmia's signal handlers and sent to audit threads. A
    subclass, not ``KeyboardInterrupt`` itself: CPython ends ``python -m`` with SIGINT, not
    the exit code it was given, once a plain ``KeyboardInterrupt`` escaped an ``exec`` or
    ``eval`` of a string (dataclasses and named tuples are built that way), even when the
    interrupt was handled."""


def one_line(text: object, limit: int | None = None) -> str:
    """``str(text)`` on one line (each run of whitespace, newlines included, one space), cut
    to ``limit`` characters."""
    return " ".join(str(text).split())[:limit]


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An error's first line (its type's name when it has no message), cut to ``limit``."""
    return (str(err).splitlines() or [type(err).__name__])[0][:limit]
