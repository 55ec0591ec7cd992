"""Errors the user can act on: each names the file or argument and the problem in one line."""


class BBServiceError(ValueError):
    """Base class of every user-facing error of this project."""


class DataError(BBServiceError):
    """A data file or folder is missing, empty, corrupt or of the wrong form."""


class ConfigError(BBServiceError):
    """An argument or configuration value is out of range or inconsistent."""


class TooLargeError(DataError):
    """An input over a size limit (the service answers 413)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
