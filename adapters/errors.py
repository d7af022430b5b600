"""Errors about adapters, each naming the problem so the API can return it as a 400."""


class AdapterError(ValueError):
    """An adapter cannot be served; `code` is a stable machine-readable reason."""

    def __init__(self, message: str, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.code = code
