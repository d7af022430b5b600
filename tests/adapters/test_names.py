"""Adapter name rules and the allowed-folder check for adapter paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from adapters.names import resolve_inside, validate_name

BASE_ID = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["sql", "my-adapter_v1.2", "A" * 64, "a..b", "_x.", "-"])
def test_valid_names_pass(name: str):
    assert validate_name(name, BASE_ID) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "a/b",
        "../x",
        "a\\b",
        "a b",
        "A" * 65,
        "héllo",
        "x\x00",
        BASE_ID,
        None,
    ],
)
def test_invalid_names_are_refused(name: str):
    with pytest.raises(AdapterError) as error:
        validate_name(name, BASE_ID)
    assert error.value.code == "invalid_adapter_name"
    assert "invalid adapter name" in str(error.value)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A root with one adapter folder, and an outside folder next to it."""
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "adapters2").mkdir()
    return {"root": root, "outside": outside, "tmp": tmp_path}


def test_path_inside_root_resolves(layout: dict[str, Path]):
    root = layout["root"]
    assert resolve_inside(root / "good", [layout["outside"], root]) == (root / "good").resolve()
    assert resolve_inside(str(root / "x" / ".." / "good"), [root]) == (root / "good").resolve()


def test_symlink_staying_inside_root_is_allowed(layout: dict[str, Path]):
    root = layout["root"]
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    assert resolve_inside(root / "alias", [root]) == (root / "good").resolve()


def _assert_forbidden(path: str | Path, roots: list[Path]) -> None:
    with pytest.raises(AdapterError) as error:
        resolve_inside(path, roots)
    assert error.value.code == "adapter_path_forbidden"
    assert "outside the allowed adapter folders" in str(error.value)


def test_dotdot_traversal_is_forbidden(layout: dict[str, Path]):
    _assert_forbidden(str(layout["root"] / ".." / "outside"), [layout["root"]])
    _assert_forbidden(str(layout["root"] / "good" / ".." / ".." / "outside"), [layout["root"]])


def test_relative_traversal_is_forbidden(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(layout["root"])
    _assert_forbidden("../outside", [layout["root"]])
    assert resolve_inside("good", [layout["root"]]) == (layout["root"] / "good").resolve()


def test_absolute_path_outside_roots_is_forbidden(layout: dict[str, Path]):
    _assert_forbidden(layout["outside"], [layout["root"]])
    _assert_forbidden("/etc", [layout["root"]])


def test_sibling_with_shared_prefix_is_forbidden(layout: dict[str, Path]):
    _assert_forbidden(layout["tmp"] / "adapters2", [layout["root"]])


def test_symlink_escaping_root_is_forbidden(layout: dict[str, Path]):
    root = layout["root"]
    (root / "escape").symlink_to(layout["outside"], target_is_directory=True)
    _assert_forbidden(root / "escape", [root])
    os.symlink(layout["outside"], root / "good" / "nested")
    _assert_forbidden(root / "good" / "nested", [root])


def test_no_roots_forbids_everything(layout: dict[str, Path]):
    _assert_forbidden(layout["root"] / "good", [])
