"""Errors that describe a problem with the user's input, printed without a traceback."""


class PolydetError(Exception):
    """Base of every user-facing error: the message names the file (and line) at fault."""


class DataError(PolydetError, ValueError):
    """A dataset record, file or path that cannot be used."""


class ModelError(PolydetError):
    """A model file, weights file or registry URI that cannot be loaded."""


class TrackingError(PolydetError):
    """The MLflow tracking server or registry cannot be reached or used."""
