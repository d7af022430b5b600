"""Shared fixtures: the real demo model, converted once and loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.demo import prepare_demo
from loader.model import BaseModel, load_base
from server.config import Config


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The converted demo checkpoint folder."""
    return prepare_demo()


@pytest.fixture(scope="session")
def nf4_base(demo_path: Path) -> BaseModel:
    """The demo model in NF4 with double quantization and bf16 compute (the serving default)."""
    return load_base(Config(model=str(demo_path)))
