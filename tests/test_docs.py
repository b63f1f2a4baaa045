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


def documented_messages() -> dict[str, set[str]]:
    """docs/architecture.md's message table: each type and the fields its rows name."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    table = doc.split("## Wire protocol", 1)[1].split("\n\n")
    rows = next(part for part in table if part.startswith("| direction | type |"))
    fields: dict[str, set[str]] = {}
    for row in rows.splitlines()[2:]:
        _, types, names, _ = (cell.strip() for cell in row.strip("|").split("|"))
        # A field is a backticked name outside parentheses (those describe a field).
        named = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", names)))
        for msg_type in re.findall(r"`(\w+)`", types):
            fields.setdefault(msg_type, set()).update(named)
    return fields


def test_the_architecture_doc_lists_every_message_and_field() -> None:
    from broker import protocol

    documented = documented_messages()
    assert set(documented) == {t.value for t in protocol.MsgType}
    for msg_type, (spec, _) in protocol._MESSAGES.items():
        # `incarnation` is documented once, below the table, for every type the broker makes.
        expected = set(spec) - {"incarnation"}
        assert documented[msg_type.value] == expected, msg_type.value


EDIT_ROWS = {  # the README's editing table: its first column's family names, by family
    "sd": "SD", "sdxl": "SDXL", "flux": "FLUX.1", "chroma": "Chroma", "qwen-image": "Qwen-Image",
    "z-image": "Z-Image", "sd3": "SD3", "flux2-klein": "FLUX.2 Klein", "sana-sprint": "Sana Sprint",
    "kolors": "Kolors", "pixart-sigma": "PixArt-Σ", "sana": "Sana", "hunyuan-dit": "HunyuanDiT",
    "lumina-next": "Lumina-Next", "lumina-2": "Lumina 2", "auraflow": "AuraFlow",
    "cogview4": "CogView4", "hidream": "HiDream", "stable-cascade": "Stable Cascade",
}


def test_the_readmes_editing_table_says_what_each_family_can_do() -> None:
    table = README.split("### Edit an image", 1)[1].split("\n\n")
    rows = next(part for part in table if part.startswith("| family |")).splitlines()[2:]
    said: dict[str, tuple[bool, bool]] = {}
    for row in rows:
        names, edit, inpaint = (cell.strip() for cell in row.strip("|").split("|"))
        for name in re.split(r", | \(", names):
            said[name.strip()] = (edit.startswith("yes"), inpaint.startswith("yes"))
    families = {spec.family: spec for spec in models.FAMILIES.values()}
    assert set(EDIT_ROWS) == set(families)
    for family, shown in EDIT_ROWS.items():
        spec = families[family]
        assert said[shown] == ("edit" in spec.modes, "inpaint" in spec.modes), family
