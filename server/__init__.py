"""loraplex server: config, CLI, OpenAI-compatible HTTP API and the batching engine."""

__version__ = "0.1.0"
