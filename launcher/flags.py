"""launch.py's flags are the programs' own: declare them again, and turn them back into argv.

Each program (broker, worker, frontend) declares its flags once, in an ``add_*_arguments``
function. launch.py offers every one of them under the same name, except those it computes
for each process itself (``set_by_launch``: where a worker connects, its device), and passes
what the user gave through to the process, so a flag added to a program later is reachable
from launch.py without a change here. The same goes for their environment variables
(launcher/environment.py): launch.py reads each program's own (DC_WORKER_MAX_BATCH means the
same to it as to a worker), and its processes, which inherit its environment, read them again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from launcher import environment

# Flags that mean the same to every program that has them, so one launch.py flag sets them all.
SHARED = frozenset({"heartbeat", "log_level", "log_format"})
_KINDS = ("store", "store_true", "append")  # the argparse actions argv() can write back


@dataclass(frozen=True)
class Flag:
    """One flag as its program declared it."""

    option: str  # "--max-queue"
    dest: str  # "max_queue"
    kind: str  # one of _KINDS
    default: Any
    type: Any  # the converter from the string on the command line, or None
    declaration: tuple[tuple[str, ...], dict[str, Any]]  # add_argument's arguments


class _Recorder(argparse.ArgumentParser):
    """A parser that remembers each add_argument call, to make it again elsewhere."""

    def __init__(self) -> None:
        super().__init__(add_help=False)
        self.flags: list[Flag] = []

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*names, **kwargs)
        kind = kwargs.get("action", "store")
        if kind not in _KINDS:
            raise ValueError(f"{names[0]}: launch.py cannot pass action={kind!r} on")
        option = next(o for o in action.option_strings if o.startswith("--"))
        self.flags.append(Flag(option, action.dest, kind, action.default, action.type,
                               (names, kwargs)))
        return action


@dataclass(frozen=True)
class Program:
    """A program launch.py starts, with the flags it computes for each process itself."""

    name: str  # names its group in --help
    module: str  # run as `python -m MODULE`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    set_by_launch: frozenset[str] = frozenset()  # dests launch.py computes, not offered
    # add_argument keywords launch.py changes for a flag it offers, by dest (help, required).
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Checks the flags as the program would, in place; ValueError names one that cannot work.
    check: Callable[[argparse.Namespace], None] | None = None

    @cached_property
    def flags(self) -> list[Flag]:
        recorder = _Recorder()
        self.add_arguments(recorder)
        return recorder.flags

    def offered(self) -> list[Flag]:
        return [flag for flag in self.flags if flag.dest not in self.set_by_launch]


def add_program_arguments(parser: argparse.ArgumentParser, programs: list[Program]) -> None:
    """Offer each program's flags on ``parser``, one argument group per program."""
    shared: dict[str, tuple[str, Flag]] = {}
    for program in programs:
        group = parser.add_argument_group(f"{program.name} (python -m {program.module})")
        for flag in program.offered():
            if flag.dest in shared:
                _check_shared(shared[flag.dest], program.name, flag)
                continue
            names, kwargs = flag.declaration
            target = parser if flag.dest in SHARED else group
            target.add_argument(*names, **{**kwargs, **program.overrides.get(flag.dest, {})})
            shared[flag.dest] = (program.name, flag)


def _check_shared(first: tuple[str, Flag], name: str, flag: Flag) -> None:
    """A flag two programs offer must be one that means the same to both, with one default."""
    owner, earlier = first
    if flag.dest not in SHARED:
        raise ValueError(f"{flag.option} is a flag of both {owner} and {name}: add it to "
                         "SHARED if it means the same to both, else to one's set_by_launch")
    if (earlier.default, earlier.type) != (flag.default, flag.type):
        raise ValueError(f"{flag.option}: {owner} and {name} differ in its default or type "
                         f"({earlier.default!r}, {flag.default!r}); take it from one place")


def variables(programs: list[Program]) -> dict[str, str]:
    """dest -> variable, for the flags ``add_program_arguments`` offers for ``programs``: each
    program's own variable, but launch.py's for a SHARED flag, which sets every program."""
    return {flag.dest: environment.variable("launch" if flag.dest in SHARED else program.name,
                                            flag.dest)
            for program in programs for flag in program.offered()}


def every_variable(programs: list[Program]) -> frozenset[str]:
    """The variables of every flag of ``programs``, those launch.py sets itself too."""
    return frozenset(environment.variable(program.name, flag.dest)
                     for program in programs for flag in program.flags)


def refused(programs: list[Program], taken: set[str], environ: Mapping[str, str]) -> list[str]:
    """A line for each variable set for a flag of ``programs`` that launch.py, which takes the
    variables ``taken``, does not: one of a flag it sets for each process itself, or for all
    of them at once. Its processes inherit its environment and would read it behind its back,
    and launch.py refuses the same flag on its command line."""
    lines = []
    for program in programs:
        for flag in program.flags:
            name = environment.variable(program.name, flag.dest)
            if name in taken or not environment.is_set(name, environ):
                continue
            if flag.dest in SHARED:
                why = (f"launch.py sets {flag.option} of every program at once: use "
                       f"{environment.variable('launch', flag.dest)}")
            else:
                why = f"launch.py sets the {program.name}'s {flag.option} itself"
            lines.append(f"{name}: {why}")
    return lines


def argv(program: Program, args: argparse.Namespace, **computed: Any) -> list[str]:
    """The command line of one ``program`` process: its flags the user gave on launch.py
    (those not at their default) and those launch.py ``computed`` for it (None: left out).
    A value launch.py read from the program's own variable is left out too: the process
    reads that variable itself, so a secret never reaches a command line (``ps`` shows it)."""
    unknown = computed.keys() - {flag.dest for flag in program.flags}
    if unknown:
        raise TypeError(f"{program.name} has no flag for {sorted(unknown)}")
    values = {flag.dest: computed[flag.dest] if flag.dest in computed else
              None if flag.dest in program.set_by_launch else getattr(args, flag.dest)
              for flag in program.flags}
    if program.check is not None:
        namespace = argparse.Namespace(**{flag.dest: flag.default if values[flag.dest] is None
                                          else values[flag.dest] for flag in program.flags})
        program.check(namespace)
    own = environment.prefix(program.name)
    inherited = {dest for dest, name in environment.taken_from(args).items()
                 if name.startswith(own) and dest not in computed}
    line = [sys.executable, "-m", program.module]
    for flag in program.flags:
        value = values[flag.dest]
        if value is None or (value == flag.default and flag.dest not in computed) or \
                flag.dest in inherited:
            continue
        if flag.kind == "store_true":
            line += [flag.option] if value else []
        elif flag.kind == "append":
            for item in value:
                line += [flag.option, str(item)]
        else:
            line += [flag.option, str(value)]
    return line
