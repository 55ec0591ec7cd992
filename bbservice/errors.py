"""Errors the user can act on: each names the file or argument and the problem in one line."""


class BBServiceError(ValueError):
    """Base class of every user-facing error of this project."""


class DataError(BBServiceError):
    """A data file or folder is missing, empty, corrupt or of the wrong form."""


class ConfigError(BBServiceError):
    """An argument or configuration value is out of range or inconsistent."""
