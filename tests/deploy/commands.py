"""The deployment files' command lines and environments, checked by the programs' own parsers.

Every command in deploy/, the Dockerfile and the systemd units is parsed the way the program
itself parses it at start (its add_*_arguments, then launcher/environment.py's variables), so a
flag renamed or removed, a DC_ variable that names no flag, or a value its flag would refuse
fails a test here instead of a deployment.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import launch
from broker.__main__ import add_broker_arguments
from broker.auth import is_loopback
from gpu_worker.__main__ import add_worker_arguments
from http_frontend.__main__ import add_frontend_arguments, check_frontend_arguments
from launcher import environment

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
LAUNCH = "diffusion-cluster"  # launch.py's console script


@dataclass(frozen=True)
class Program:
    script: str  # its console script in setup.cfg
    module: str  # python -m MODULE
    name: str  # its variables' prefix: DC_<NAME>_
    add_arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None] | None = None

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.script)
        self.add_arguments(parser)
        return parser

    def variables(self) -> set[str]:
        """Every variable the program reads for its flags (NAME and, where allowed, NAME_FILE)."""
        scheme = environment.program_scheme(self.name, self.parser())
        names = scheme.variables()
        return names | {name + environment.FILE_SUFFIX for name in names}


PROGRAMS = {p.script: p for p in (
    Program("dc-broker", "broker", "broker", add_broker_arguments),
    Program("dc-worker", "gpu_worker", "worker", add_worker_arguments),
    Program("dc-frontend", "http_frontend", "frontend", add_frontend_arguments,
            check_frontend_arguments),
)}
# Commands the files run besides the programs: in both base images (Debian and Ubuntu).
TOOLS = frozenset({"sh", "install", "test", "sleep"})


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> module:function."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip()
            for name, target in (line.split("=", 1) for line in lines)}


def program_variables_read_by_code() -> set[str]:
    """DC_ variables the code reads by name, outside the per-flag scheme (DC_DATA_DIR, ...)."""
    names: set[str] = set()
    sources = [REPO / "launch.py", *(p for d in ("broker", "gpu_worker", "http_frontend",
                                                 "launcher") for p in (REPO / d).rglob("*.py"))]
    for path in sources:
        names.update(re.findall(r"[\"'](DC_[A-Z0-9_]*[A-Z0-9])[\"']", path.read_text()))
    # Test aids, never for production (docs/reliability.md), and the schemes' own prefixes.
    return {n for n in names if not n.startswith("DC_FAULT_")} - {
        environment.prefix(p).rstrip("_") for p in ("broker", "worker", "frontend", "launch")}


EXTRA_VARIABLES = program_variables_read_by_code()


class Refused(AssertionError):
    """The program would not start with this command line and environment."""


def parse(command: list[str], environ: Mapping[str, str | None] | None = None,
          where: str = "") -> argparse.Namespace:
    """Parse ``command`` (argv, its first word the console script) with ``environ`` as the
    program would; Refused says why it would not start. ``*_FILE`` variables are read from
    stand-in files (the real ones are the deployment's secrets)."""
    script = Path(command[0]).name
    env = {k: v for k, v in (environ or {}).items() if v}
    label = f"{where}: {shlex.join(command)}"
    with _stand_in_files(env) as env:
        if script == LAUNCH:
            return _parse_launch(command[1:], env, label)
        program = PROGRAMS.get(script)
        if program is None:
            raise Refused(f"{label}: {script} is not one of {sorted(PROGRAMS)}")
        stray = sorted(name for name in env if name.startswith(environment.PREFIX) and
                       not name.startswith(environment.prefix(program.name)) and
                       name not in EXTRA_VARIABLES)
        if stray:
            raise Refused(f"{label}: {stray} are not {program.script}'s variables")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = environment.parse_args(program.parser(), command[1:], program.name, env)
            if program.check is not None:
                program.check(args)
        except SystemExit:
            raise Refused(f"{label}: {err.getvalue().strip()}") from None
        except ValueError as exc:
            raise Refused(f"{label}: {exc}") from None
        if script == "dc-broker":
            _check_exposure(args, label)
        return args


def _parse_launch(argv: list[str], env: Mapping[str, str], label: str) -> argparse.Namespace:
    err = io.StringIO()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(environment.PREFIX)}
    try:
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True), \
                contextlib.redirect_stderr(err):
            return launch.parse_args(argv)
    except SystemExit:
        raise Refused(f"{label}: {err.getvalue().strip()}") from None


def _check_exposure(args: argparse.Namespace, label: str) -> None:
    """What the broker checks when it binds (broker.Broker.bind): an endpoint other hosts
    reach needs CURVE keys, or --insecure."""
    for endpoint in (args.clients, args.workers):
        if not is_loopback(endpoint) and not args.curve and not args.insecure:
            raise Refused(f"{label}: {endpoint} is reachable from other hosts without --curve")


@contextlib.contextmanager
def _stand_in_files(env: dict[str, str]) -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory() as folder:
        out = dict(env)
        for name, value in env.items():
            if name.startswith(environment.PREFIX) and name.endswith(environment.FILE_SUFFIX) \
                    and value.startswith("/") and not Path(value).exists():
                stand_in = Path(folder) / name
                stand_in.write_text("stand-in for " + value + "\n")
                out[name] = str(stand_in)
        yield out


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `sh -c` script (joined by &&, || or ;), without `exec`."""
    commands = []
    for part in re.split(r"&&|\|\||;", script):
        words = shlex.split(part)
        if words and words[0] == "exec":
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def programs_in(command: list[str]) -> list[list[str]]:
    """The program invocations in a container's or unit's command: itself, or those inside
    `sh -c SCRIPT`. Anything else must be a tool of the base images."""
    if command[:2] == ["sh", "-c"]:
        found = []
        for words in shell_commands(command[2]):
            if Path(words[0]).name in PROGRAMS or Path(words[0]).name == LAUNCH:
                found.append(words)
            else:
                assert words[0] in TOOLS, f"{words[0]} is not in the images: {command}"
        return found
    assert Path(command[0]).name in PROGRAMS or Path(command[0]).name == LAUNCH or \
        command[0] in TOOLS, f"unknown command {command[0]}"
    return [command] if command[0] not in TOOLS else []


def script_of(command: list[str]) -> str:
    """The console script a command runs: dc-broker, ..., or diffusion-cluster."""
    return Path(command[0]).name


def program_of(command: list[str]) -> Program:
    return PROGRAMS[script_of(command)]


def endpoint_port(endpoint: str) -> tuple[str, int]:
    """tcp://HOST:PORT -> (HOST, PORT)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def env_file_assignments(path: Path, *, commented: bool = True) -> dict[str, str]:
    """NAME=VALUE lines of an env file; with ``commented``, also those commented out (#NAME=)."""
    found = {}
    for line in path.read_text().splitlines():
        text = line.strip()
        if commented and re.match(r"#[A-Z_][A-Z0-9_]*=", text):
            text = text[1:]
        match = re.match(r"([A-Z_][A-Z0-9_]*)=(.*)$", text)
        if match:
            found[match[1]] = match[2]
    return found


def make_keys(folder: Path, command: list[str]) -> set[str]:
    """Run a `diffusion-cluster keys DIR ...` command for real into ``folder`` (DIR replaced);
    the files it wrote, relative to DIR."""
    args = parse(command)
    assert args.command == "keys", command
    real_dir = args.dir
    args.dir = str(folder)
    with contextlib.redirect_stdout(io.StringIO()):
        assert launch.make_keys(args) == 0
    args.dir = real_dir
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def defaults_of(script: str) -> dict[str, Any]:
    """A program's flag defaults, by dest."""
    return vars(PROGRAMS[script].parser().parse_args([]))
