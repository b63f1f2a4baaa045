"""docs/configuration.md keeps up with the flags, and every DC_ variable named anywhere in the
repository (code, docs, deployment files, tests) is the variable of a real flag."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import launch
from launcher import environment, flags
from tests import configuration_doc

REPO = Path(__file__).resolve().parents[1]
# Named before the rule, and kept (docs/configuration.md, "Older names").
OLDER = {"DC_DATA_DIR", "DC_CACHE_DIR", "DC_API_KEY"}
# Mistakes the documentation and the tests of the mistakes make on purpose.
MISTAKES = {"DC_FRONTEND_API_KEYS_FIEL", "DC_LAUNCH_MODEL"}
ON_PURPOSE = {"tests/launcher/test_environment.py", "tests/launcher/test_environment_launch.py",
              "tests/launcher/test_environment_processes.py"}
NAME = re.compile(r"\bDC_[A-Z0-9_]*[A-Z0-9]\b")  # not a prefix such as DC_WORKER_


def every_variable() -> set[str]:
    """Each variable some program takes: the programs' own, and launch.py's."""
    _, commands = launch.make_parser()
    names = {*launch.environment_scheme(commands).variables(),
             *flags.every_variable([launch.BROKER, launch.WORKER, launch.FRONTEND])}
    return names | {name + environment.FILE_SUFFIX for name in names}


def test_the_list_of_every_variable_is_made_from_the_flags() -> None:
    assert configuration_doc.documented() == configuration_doc.render(), (
        "docs/configuration.md's list of variables is out of date: write it again with "
        "`.venv/bin/python -m tests.configuration_doc`")


def test_every_variable_documented_is_a_flags_and_every_flags_is_documented() -> None:
    documented = set(NAME.findall((REPO / "docs" / "configuration.md").read_text()))
    assert documented - every_variable() - OLDER - MISTAKES == set()
    _, commands = launch.make_parser()
    flags_variables = {*launch.environment_scheme(commands).variables(),
                       *flags.every_variable([launch.BROKER, launch.WORKER, launch.FRONTEND])}
    assert flags_variables - documented == set()


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.splitlines()
            if name not in ON_PURPOSE and (REPO / name).is_file()]


def test_every_dc_variable_in_the_repository_is_a_real_flags() -> None:
    known = every_variable() | OLDER | MISTAKES
    unknown: dict[str, set[str]] = {}
    for path in repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # images, and the like
        for name in set(NAME.findall(text)) - known:
            unknown.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert unknown == {}, "DC_ variables that no flag has (test-only ones are DCTEST_)"


def test_the_older_names_are_still_read() -> None:
    from gpu_worker import tiny
    from http_frontend import __main__ as frontend

    assert "DC_CACHE_DIR" in Path(tiny.__file__).read_text()
    assert "DC_DATA_DIR" in Path(frontend.__file__).read_text()
    assert "DC_API_KEY" in (REPO / "launch.py").read_text()
