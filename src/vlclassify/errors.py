"""User-facing errors: the CLI prints these as one line, without a traceback."""


class VLClassifyError(Exception):
    """Base class for errors caused by the user's input (files, rows, options)."""


class DataError(VLClassifyError):
    """A data file, row, label or image is wrong; the message names it."""


class ConfigError(VLClassifyError):
    """An option, saved model or cache entry does not fit what was asked."""
