"""Errors raised while resolving or loading a base model."""


class ModelSourceError(RuntimeError):
    """The base model cannot be found, read or quantized; the message says what to do."""
