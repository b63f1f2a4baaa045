"""Every flag from the environment too: ``DC_<PROGRAM>_<DEST>``, or that name and ``_FILE``.

Container platforms configure a program through its environment and mount its secrets as
files (docs/configuration.md). Each program's main() parses its arguments through
``parse_args`` here with the flags it declared; a flag's variable is its dest upper-cased under
the program's prefix (the broker's --max-queue: DC_BROKER_MAX_QUEUE), so a flag added later
has its variable with no change here. Flags win over variables, variables over defaults.

Nothing here imports more than the standard library: every program, torch-free ones too,
parses its arguments through it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

PREFIX = "DC_"
# DC_FRONTEND_DB_FILE=/run/secrets/db-url: DC_FRONTEND_DB's value is that file's content.
FILE_SUFFIX = "_FILE"
# sysexits' EX_CONFIG, as every program answers a configuration that cannot work
# (launcher.supervisor.EXIT_CONFIG): a restart would fail the same way.
EXIT_CONFIG = os.EX_CONFIG
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
# A list's items: commas for a one-line variable, newlines for a file of one item per line.
# No value an `append` flag takes holds either (keys, origins, NAME=MODEL, repo ids).
SEPARATORS = re.compile(r"[,\n]")
_TAKEN = "_environment"  # the namespace attribute ``taken_from`` reads: no flag's dest
_NOT_SET = (argparse._HelpAction, argparse._VersionAction)  # flags that hold no setting


class ConfigError(ValueError):
    """A variable that cannot be used; the message names it, and never a secret's value."""


def prefix(program: str) -> str:
    """The prefix of one program's variables: ``prefix("worker")`` is ``DC_WORKER_``."""
    return f"{PREFIX}{program.upper()}_"


def variable(program: str, dest: str) -> str:
    """The variable of the flag ``dest`` of ``program``: DC_WORKER_MAX_BATCH."""
    return prefix(program) + dest.upper()


@dataclass(frozen=True)
class Scheme:
    """Which variable sets which flag of one command line, and what to check besides."""

    names: Mapping[str, str]  # dest -> its variable, for each flag the environment may set
    prefixes: tuple[str, ...]  # a variable under these that names no flag is a mistake
    # Real variables under the prefixes that this command line does not take (launch.py: those
    # of the flags it sets for its processes itself); not mistakes.
    others: frozenset[str] = frozenset()
    # The subcommands whose flags ``names`` sets (launch.py's `keys`, typed by hand, has none);
    # None: every one.
    commands: frozenset[str] | None = None

    def variables(self) -> set[str]:
        return {*self.names.values(), *self.others}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of ``parser`` (not its subcommands') that a variable can set."""
    found = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, _NOT_SET):
            continue
        if _kind(action) is None:
            raise ValueError(f"{action.option_strings[0]}: no variable can set a flag of "
                             f"{type(action).__name__}")
        found.append(action)
    return found


def program_scheme(program: str, parser: argparse.ArgumentParser) -> Scheme:
    """One program's variables: a variable for every flag, and its prefix checked."""
    return Scheme({action.dest: variable(program, action.dest) for action in options(parser)},
                  (prefix(program),))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, program: str,
               environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with each flag not given taken from its variable."""
    return parse(parser, argv, program_scheme(program, parser), environ)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, scheme: Scheme,
          environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``parse_args`` with a scheme of one's own (launch.py's). A variable that cannot be used
    ends the process like a bad flag, but with EXIT_CONFIG: one line on stderr naming it."""
    environ = os.environ if environ is None else environ
    for each in _parsers(parser, scheme.commands):
        _offer(each, scheme, environ)
    args = parser.parse_args(argv)  # --help and bad flags end here, as they always did
    mistakes = list(_mistakes(scheme, environ))
    if mistakes:
        fail(parser, "; ".join(mistakes))
    try:
        setattr(args, _TAKEN, _resolve(args))
    except ConfigError as exc:
        fail(parser, str(exc))
    return args


def taken_from(args: argparse.Namespace) -> Mapping[str, str]:
    """dest -> variable, for each flag whose value ``parse`` took from the environment."""
    taken: Mapping[str, str] = getattr(args, _TAKEN, {})
    return taken


def is_set(name: str, environ: Mapping[str, str]) -> bool:
    """Whether ``name`` or ``name``_FILE is set (an empty variable counts as unset)."""
    return bool(environ.get(name) or environ.get(name + FILE_SUFFIX))


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """End the process as a configuration error: one line, no usage, no traceback."""
    parser.exit(EXIT_CONFIG, f"{parser.prog}: error: {message}\n")


def _parsers(parser: argparse.ArgumentParser,
             commands: frozenset[str] | None) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and the parsers of its ``commands``."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if commands is None or name in commands:
                    yield from _parsers(sub, commands)


def _kind(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if isinstance(action, argparse._StoreAction) and action.nargs is None:
        return "store"
    return None


def _offer(parser: argparse.ArgumentParser, scheme: Scheme, environ: Mapping[str, str]) -> None:
    """Say each flag's variable in --help, and make the set ones the flags' defaults: a flag
    given on the command line replaces its default, so flags win."""
    if scheme.names and not parser.epilog:
        parser.epilog = ("Each flag can also be set by the environment variable named in its "
                         "help; NAME_FILE reads NAME's value from a file. Flags win over "
                         "variables. See docs/configuration.md.")
    file_forms = _file_forms(scheme)
    for action in options(parser):
        name = scheme.names.get(action.dest)
        if name is None:
            continue
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [{name}]".lstrip()
        if not is_set(name, environ) or (not environ.get(name) and name not in file_forms):
            continue
        pending = _Pending(name, action, name in file_forms, environ)
        action.default = _PendingList(pending) if _kind(action) == "append" else pending
        action.required = False  # launch.py worker's --broker: the variable gives it


def _file_forms(scheme: Scheme) -> set[str]:
    """The variables that may be given as NAME_FILE: all but those where NAME_FILE is the
    variable of a flag of its own (--metrics-token-file's DC_FRONTEND_METRICS_TOKEN_FILE)."""
    names = scheme.variables()
    return {name for name in names if name + FILE_SUFFIX not in names}


class _Pending:
    """A flag's value still in its variable, read and converted only once parsing showed that
    no flag replaced it. ``str`` is what --help shows as the default: never the value."""

    def __init__(self, name: str, action: argparse.Action, file_form: bool,
                 environ: Mapping[str, str]) -> None:
        self.name = name
        self.action = action
        self.file_form = file_form
        self.environ = environ

    def __str__(self) -> str:
        return f"from {self.source}"

    @property
    def source(self) -> str:
        file_name = self.name + FILE_SUFFIX
        return file_name if self.file_form and self.environ.get(file_name) else self.name

    def value(self) -> Any:
        text, described = self._text()
        kind = _kind(self.action)
        if kind == "store_true":
            return _yes_or_no(text, described)
        if kind == "append":
            items = (item.strip() for item in SEPARATORS.split(text))
            return [self._convert(item, described) for item in items if item]
        return self._convert(text, described)

    def _text(self) -> tuple[str, Callable[[str], str]]:
        """The value, and how a message names it: a value read from a file is never shown
        (a file named by mistake may hold a secret)."""
        option = self.action.option_strings[-1]
        path = self.environ.get(self.name + FILE_SUFFIX) if self.file_form else None
        if not path:
            return self.environ[self.name], lambda text: f"{self.name} ({option}): {text!r}"
        if self.environ.get(self.name):
            raise ConfigError(f"{self.name} and {self.name}{FILE_SUFFIX} are both set; "
                              "keep one")
        where = f"{self.name}{FILE_SUFFIX} ({option}): {path}"
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{where}: cannot read it: {reason}") from None
        if not text:
            raise ConfigError(f"{where}: the file is empty")
        return text, lambda _: where

    def _convert(self, text: str, described: Callable[[str], str]) -> Any:
        """``text`` through the flag's own converter and choices, as argparse does a flag's."""
        convert = self.action.type if callable(self.action.type) else str
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{described(text)}: {exc}") from None
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", repr(convert))
            raise ConfigError(f"{described(text)}: not a valid {name} value") from None
        choices = self.action.choices
        if choices is not None and value not in choices:
            raise ConfigError(f"{described(text)}: not one of "
                              f"{', '.join(map(str, choices))}")
        return value


def _yes_or_no(text: str, described: Callable[[str], str]) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ConfigError(f"{described(text)}: not a yes or no (1, true, yes, on or 0, false, no, "
                      "off)")


class _PendingList(list[Any]):
    """An ``append`` flag's value still in its variable. argparse appends a flag's items to a
    copy of its default: this copy is empty, so the flags given replace the variable's list
    rather than add to it (flags win)."""

    def __init__(self, pending: _Pending) -> None:
        super().__init__()
        self.pending = pending

    def __copy__(self) -> list[Any]:
        return []

    def __repr__(self) -> str:
        return str(self.pending)


def _resolve(args: argparse.Namespace) -> dict[str, str]:
    """Replace each value still in its variable by the value; dest -> variable of those."""
    taken = {}
    for dest, value in vars(args).items():
        pending = value.pending if isinstance(value, _PendingList) else value
        if isinstance(pending, _Pending):
            setattr(args, dest, pending.value())
            taken[dest] = pending.name
    return taken


def _flag_part(name: str) -> str:
    """DC_WORKER_MAX_BATCH -> MAX_BATCH."""
    return name.split("_", 2)[-1]


def _mistakes(scheme: Scheme, environ: Mapping[str, str]) -> Iterable[str]:
    """A line for each variable under the scheme's prefixes that names no flag: a typo
    silently ignored would leave a setting (an API key file) silently unset."""
    known = scheme.variables()
    accepted = sorted(known | {name + FILE_SUFFIX for name in known})
    for name in sorted(environ):
        if name.startswith(scheme.prefixes) and name not in known and \
                name.removesuffix(FILE_SUFFIX) not in known:
            # The same flag under another program's prefix first (DC_LAUNCH_MODEL: launch.py's
            # --model is the workers' DC_WORKER_MODEL), else the nearest name.
            close = [other for other in accepted if _flag_part(other) == _flag_part(name)] or \
                difflib.get_close_matches(name, accepted, n=1)
            yield f"{name} is the variable of no flag" + \
                (f": did you mean {close[0]}?" if close else " (see docs/configuration.md)")
