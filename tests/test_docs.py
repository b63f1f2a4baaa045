"""The README keeps up with what a user can do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpu_worker import models

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("alias", sorted(models.REGISTRY))
def test_every_alias_is_in_the_readme(alias: str) -> None:
    assert f"`{alias}`" in README


def test_the_first_screen_gives_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:20])
    assert re.search(r"^make run\b", first_screen, re.M)
    assert re.search(r"^make test\b", first_screen, re.M)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci


def test_test_modules_have_unique_names() -> None:
    # pytest's default import mode needs unique basenames; a clash stops the whole run.
    names = [p.name for p in (Path(__file__).parent).rglob("test_*.py")]
    assert sorted(names) == sorted(set(names)), "two test files share a name"
