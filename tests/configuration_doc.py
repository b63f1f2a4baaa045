"""docs/configuration.md's list of every variable, made from the programs' own parsers.

tests/test_configuration_doc.py checks the document against it; after adding a flag, write
the list again with

    .venv/bin/python -m tests.configuration_doc
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import launch
from broker.__main__ import add_broker_arguments
from gpu_worker.__main__ import add_worker_arguments
from http_frontend.__main__ import add_frontend_arguments
from launcher import environment, flags

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
BEGIN = "<!-- every variable: made by `python -m tests.configuration_doc`, do not edit -->"
END = "<!-- end of every variable -->"
# Each program as `python -m` runs it: (its variables' program name, module, its flags).
PROGRAMS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = [
    ("broker", "broker", add_broker_arguments),
    ("worker", "gpu_worker", add_worker_arguments),
    ("frontend", "http_frontend", add_frontend_arguments)]


def program_parser(add_arguments: Callable[[argparse.ArgumentParser], None]
                   ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def value(action: argparse.Action) -> str:
    """What the variable holds, in a word."""
    if isinstance(action, argparse._StoreTrueAction):
        return "yes / no"
    if action.choices is not None:
        return " / ".join(f"`{choice}`" for choice in action.choices)
    word = action.metavar or {int: "integer", float: "number"}.get(action.type, "text")
    return f"list of {word}" if isinstance(action, argparse._AppendAction) else str(word)


def rows(parser: argparse.ArgumentParser, scheme: environment.Scheme,
         command: str = "") -> Iterator[str]:
    for action in environment.options(parser):
        if action.dest in scheme.names:
            flag = f"{command} {action.option_strings[-1]}".strip()
            yield f"| `{scheme.names[action.dest]}` | `{flag}` | {value(action)} |"


def table(lines: Iterator[str]) -> str:
    return "\n".join(["| variable | flag | value |", "|---|---|---|", *lines])


def render() -> str:
    """The generated part of docs/configuration.md, between its markers."""
    parts = []
    for name, module, add_arguments in PROGRAMS:
        parser = program_parser(add_arguments)
        parts.append(f"### `python -m {module}`\n\n"
                     f"{table(rows(parser, environment.program_scheme(name, parser)))}")
    _, commands = launch.make_parser()
    scheme = launch.environment_scheme(commands)
    own = {dest: name for dest, name in scheme.names.items()
           if name.startswith(environment.prefix("launch")) or dest == "model"}
    mine = environment.Scheme(own, scheme.prefixes)
    lines = [line for command, parser in commands.items()
             for line in rows(parser, mine, command or "")]
    missing = sorted(set(rows(commands[None], mine)) -
                     set(rows(commands["worker"], mine)))
    parts.append("### `launch.py`\n\nIts own flags, and those that set every program; "
                 "`launch.py worker` takes the same but "
                 + ", ".join(line.split(" | ")[0].strip("| ") for line in missing) + ":\n\n"
                 + table(line for line in lines if "` | `worker " not in line))
    for command, started in launch.STARTED.items():
        taken = launch.taken_by(commands[command], scheme)
        refused = sorted(name for name in flags.every_variable(started)
                         if name not in taken)
        parts.append(f"`launch.py{' ' + command if command else ''}` takes every variable of "
                     f"the programs it starts but these, which it refuses: "
                     + ", ".join(f"`{name}`" for name in refused) + ".")
    return "\n\n".join(parts)


def documented() -> str:
    text = DOC.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n\n{render()}\n\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    write()
