"""Every flag of every real program from its variable: alone, and through launch.py, whose
processes inherit its environment. Each program's own parser is the list, so a flag added
later is checked here without a change."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import launch
from broker.__main__ import add_broker_arguments
from broker.__main__ import parse_args as broker_args
from gpu_worker.__main__ import add_worker_arguments
from http_frontend.__main__ import add_frontend_arguments
from http_frontend.__main__ import parse_args as frontend_args
from launcher import environment, flags


def worker_args(argv: list[str]) -> argparse.Namespace:
    """What `python -m gpu_worker` parses (its main() hands the result to run_worker)."""
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return environment.parse_args(parser, argv, "worker")


# Each program: its variables' name, the flags it declares, and its own parse step.
PROGRAMS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[list[str]], argparse.Namespace]]] = {
    "broker": ("broker", add_broker_arguments, broker_args),
    "gpu_worker": ("worker", add_worker_arguments, worker_args),
    "http_frontend": ("frontend", add_frontend_arguments, frontend_args)}
MODES = {"cluster": {"broker": launch.BROKER, "gpu_worker": launch.WORKER,
                     "http_frontend": launch.FRONTEND},
         "join": {"gpu_worker": launch.JOINING_WORKER}}
# Values a parser checks: a valid one that is not the default.
CHECKED_TEXT = {"image_ttl": "3h", "image_store_limit": "5G", "model_alias": "dalle=tiny",
                "warm_up_size": "256x256", "step_cache": "none"}


def own_flags(module: str) -> list[argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    PROGRAMS[module][1](parser)
    return environment.options(parser)


def another_value(action: argparse.Action) -> str:
    """A value for ``action``'s variable that is not its default."""
    if action.nargs == 0:
        return "yes"
    if action.choices:
        return str(next(c for c in action.choices if c != action.default))
    if action.dest in CHECKED_TEXT:
        return CHECKED_TEXT[action.dest]
    if action.type is int:
        return str((action.default or 2) + 1)
    if action.type is float:
        return str((action.default or 2.0) + 0.5)
    return f"x-{action.dest}"


def expected(action: argparse.Action, text: str) -> object:
    if action.nargs == 0:
        return True
    value = action.type(text) if callable(action.type) else text
    return [value] if isinstance(action, argparse._AppendAction) else value


def cases() -> Iterator[object]:
    for module in PROGRAMS:
        for action in own_flags(module):
            yield pytest.param(module, action, id=f"{module}-{action.dest}")


@pytest.mark.parametrize(("module", "action"), list(cases()))
def test_every_flag_of_every_program_has_its_variable(monkeypatch: pytest.MonkeyPatch,
                                                      module: str,
                                                      action: argparse.Action) -> None:
    name, _, parse = PROGRAMS[module]
    text = another_value(action)
    monkeypatch.setenv(environment.variable(name, action.dest), text)
    assert getattr(parse([]), action.dest) == expected(action, text)


def launch_cases() -> Iterator[object]:
    for mode, programs in MODES.items():
        for module, program in programs.items():
            for action in own_flags(module):
                yield pytest.param(mode, module, program, action,
                                   id=f"{mode}-{module}-{action.dest}")


def plan(monkeypatch: pytest.MonkeyPatch, mode: str,
         argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, list[str]]]:
    """launch.py's arguments, and the argv of the first process of each program it starts."""
    monkeypatch.setattr(launch, "visible_gpus", lambda limit=None: [])
    args = launch.parse_args([*(["worker"] if mode == "join" else []), *(argv or [])])
    specs = launch.cluster_specs(args) if mode == "cluster" else launch.join_specs(args)
    by_program: dict[str, list[str]] = {}
    for spec in specs:
        by_program.setdefault(spec.argv[2], spec.argv)  # [python, "-m", module, ...]
    return args, by_program


@pytest.mark.parametrize(("mode", "module", "program", "action"), list(launch_cases()))
def test_every_variable_reaches_the_process_or_is_refused(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: str,
        module: str, program: flags.Program, action: argparse.Action) -> None:
    name = environment.variable(program.name, action.dest)
    text = another_value(action)
    if mode == "join" and action.dest != "broker":
        monkeypatch.setenv("DC_WORKER_BROKER", "tcp://head:5556")
    monkeypatch.setenv(name, text)
    if action.dest == "model":  # launch.py's --model is its workers': it passes it on
        _, argv = plan(monkeypatch, mode)
        assert argv[module][argv[module].index("--model") + 1] == text
        return
    if action.dest in program.set_by_launch or action.dest in flags.SHARED:
        with pytest.raises(SystemExit) as stopped:
            plan(monkeypatch, mode)
        assert stopped.value.code == environment.EXIT_CONFIG
        assert f": error: {name}: launch.py sets " in capsys.readouterr().err
        return
    args, argv = plan(monkeypatch, mode)
    assert getattr(args, action.dest) == expected(action, text)
    # Left to the process, which reads the same variable from the environment it inherits;
    # or computed from it (where a joining worker connects).
    assert getattr(PROGRAMS[module][2](argv[module][3:]), action.dest) == \
        expected(action, text)


@pytest.mark.parametrize("dest", sorted(flags.SHARED))
def test_launchs_variable_of_a_shared_flag_sets_every_process(
        monkeypatch: pytest.MonkeyPatch, dest: str) -> None:
    action = next(a for a in own_flags("broker") if a.dest == dest)
    text = another_value(action)
    monkeypatch.setenv(environment.variable("launch", dest), text)
    for mode in MODES:
        if mode == "join":  # where it connects; launch.py sets that itself for a cluster
            monkeypatch.setenv("DC_WORKER_BROKER", "tcp://head:5556")
        args, by_program = plan(monkeypatch, mode)
        assert getattr(args, dest) == expected(action, text)
        for argv in by_program.values():
            assert argv[argv.index(action.option_strings[-1]) + 1] == text


def test_a_secret_from_the_environment_stays_off_the_command_lines(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "db-url").write_text("postgresql://dc:hunter2@db/dc\n")
    monkeypatch.setenv("DC_FRONTEND_DB_FILE", str(tmp_path / "db-url"))
    monkeypatch.setenv("DC_FRONTEND_API_KEY", "sk-one,sk-two")
    args, by_program = plan(monkeypatch, "cluster")
    assert args.db == "postgresql://dc:hunter2@db/dc"
    assert args.api_key == ["sk-one", "sk-two"]
    for argv in by_program.values():
        assert not any("hunter2" in word or "sk-" in word for word in argv), argv


def test_a_flag_on_launchs_command_line_still_reaches_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_WORKER_MAX_BATCH", "4")
    args, by_program = plan(monkeypatch, "cluster", ["--max-batch", "2"])
    argv = by_program["gpu_worker"]
    assert args.max_batch == 2 and argv[argv.index("--max-batch") + 1] == "2"


def test_the_workers_model_sets_the_frontends_default_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_WORKER_MODEL", "sd-turbo")
    _, by_program = plan(monkeypatch, "cluster")
    frontend = by_program["http_frontend"]
    assert frontend[frontend.index("--default-model") + 1] == "sd-turbo"


def test_launchs_own_flags_have_launch_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_LAUNCH_NUM_WORKERS", "2")
    monkeypatch.setenv("DC_LAUNCH_GRACE", "3")
    monkeypatch.setenv("DC_LAUNCH_READY_TIMEOUT", "9")
    args, _ = plan(monkeypatch, "cluster")
    assert (args.num_workers, args.grace, args.ready_timeout) == (2, 3.0, 9.0)
    monkeypatch.setattr(launch, "visible_gpus", lambda limit=None: [])
    assert len(launch.cluster_specs(args)) == 4  # broker, two workers, frontend


def test_status_takes_its_key_from_a_file(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    (tmp_path / "key").write_text("sk-status\n")
    monkeypatch.setenv("DC_LAUNCH_STATUS_API_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("DC_LAUNCH_STATUS_URL", "http://frontend:8000")
    args = launch.parse_args(["status"])
    assert (args.status_api_key, args.status_url) == ("sk-status", "http://frontend:8000")


@pytest.mark.parametrize(("name", "said"), [
    ("DC_LAUNCH_MODEL", "did you mean DC_WORKER_MODEL?"),
    ("DC_LAUNCH_FORCE", "DC_LAUNCH_FORCE is the variable of no flag"),  # keys takes none
    ("DC_FRONTEND_PROT", "did you mean DC_FRONTEND_PORT?"),
    ("DC_LAUNCH_NUM_WORKER", "did you mean DC_LAUNCH_NUM_WORKERS?")])
def test_launch_refuses_an_unknown_variable_under_every_prefix(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str,
        said: str) -> None:
    monkeypatch.setenv(name, "1")
    for argv in ([], ["status"], ["keys", "/k"]):
        with pytest.raises(SystemExit) as stopped:
            launch.parse_args(argv)
        assert stopped.value.code == environment.EXIT_CONFIG
        assert said in capsys.readouterr().err


def test_a_status_variable_is_no_mistake_when_the_cluster_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # One container: the cluster, and `launch.py status` as its health check.
    monkeypatch.setenv("DC_LAUNCH_STATUS_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("DC_WORKER_MAX_BATCH", "2")
    assert launch.parse_args([]).max_batch == 2
    assert launch.parse_args(["status"]).status_url == "http://127.0.0.1:8000"


def test_launch_names_the_variable_to_use_for_a_shared_flag(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DC_BROKER_LOG_LEVEL", "DEBUG")
    with pytest.raises(SystemExit):
        launch.parse_args([])
    assert capsys.readouterr().err.endswith(
        ": error: DC_BROKER_LOG_LEVEL: launch.py sets --log-level of every program at once: "
        "use DC_LAUNCH_LOG_LEVEL\n")


def test_a_joining_worker_takes_its_broker_and_keys_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_WORKER_BROKER", "tcp://head:5556")
    monkeypatch.setenv("DC_WORKER_BROKER_KEY", "/keys/broker.key")
    monkeypatch.setenv("DC_WORKER_KEY", "/keys/gpu-1.key_secret")
    args, by_program = plan(monkeypatch, "join")
    assert (args.broker, args.broker_key, args.key) == (
        "tcp://head:5556", "/keys/broker.key", "/keys/gpu-1.key_secret")
    child = worker_args(by_program["gpu_worker"][3:])
    assert (child.broker, child.broker_key, child.key) == (args.broker, args.broker_key,
                                                           args.key)
