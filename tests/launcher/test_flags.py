"""Every flag of the broker, the worker and the frontend is a launch.py flag that reaches the
process, or one launch.py sets itself; each program's own parser is the list, so a flag added
to a program later is checked here without a change."""

from __future__ import annotations

import argparse
import inspect
import itertools
from collections.abc import Callable, Iterator

import pytest

import launch
from broker import defaults
from broker.__main__ import add_broker_arguments
from gpu_worker.__main__ import add_worker_arguments
from http_frontend.__main__ import add_frontend_arguments
from launcher import flags

PROGRAMS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "broker": add_broker_arguments, "gpu_worker": add_worker_arguments,
    "http_frontend": add_frontend_arguments}
# How launch.py starts each program: a whole cluster, or `launch.py worker` joining one.
MODES = {"cluster": {"broker": launch.BROKER, "gpu_worker": launch.WORKER,
                     "http_frontend": launch.FRONTEND},
         "join": {"gpu_worker": launch.JOINING_WORKER}}
# Flags launch.py sets itself, shown in every plan made from these.
BASE = {"cluster": ["--curve", "/keys"], "join": ["worker", "--broker", "tcp://head:5556"]}


def own_flags(module: str) -> list[argparse.Action]:
    """The program's flags, read from its own parser."""
    parser = argparse.ArgumentParser(add_help=False)
    PROGRAMS[module](parser)
    return list(parser._actions)


def cases() -> Iterator[object]:
    for mode, programs in MODES.items():
        for module in programs:
            for action in own_flags(module):
                yield pytest.param(mode, module, action, id=f"{mode}-{module}-{action.dest}")


def plan(monkeypatch: pytest.MonkeyPatch, mode: str, argv: list[str]) -> dict[str, list[str]]:
    """The argv of the first process of each program that launch.py would start."""
    monkeypatch.setattr(launch, "visible_gpus", lambda limit=None: [])
    args = launch.parse_args([*BASE[mode], *argv])
    specs = launch.cluster_specs(args) if mode == "cluster" else launch.join_specs(args)
    by_program: dict[str, list[str]] = {}
    for spec in specs:
        by_program.setdefault(spec.argv[2], spec.argv)  # [python, "-m", module, ...]
    return by_program


# Flags whose text is checked when parsed: a valid value that is not the default.
CHECKED_TEXT = {"image_ttl": "3h", "image_store_limit": "5G", "model_alias": "dalle=tiny"}


def another_value(action: argparse.Action) -> str:
    """A value for ``action`` that is not its default."""
    if action.choices:
        return str(next(c for c in action.choices if c != action.default))
    if action.dest in CHECKED_TEXT:
        return CHECKED_TEXT[action.dest]
    if action.type is int:
        return str((action.default or 2) + 1)
    if action.type is float:
        return str((action.default or 2.0) + 0.5)
    return f"x-{action.dest}"


def follows(argv: list[str], option: str, value: str) -> bool:
    return any(a == option and b == value for a, b in itertools.pairwise(argv))


@pytest.mark.parametrize(("mode", "module", "action"), list(cases()))
def test_every_flag_reaches_the_process(monkeypatch: pytest.MonkeyPatch, mode: str,
                                        module: str, action: argparse.Action) -> None:
    option = next(o for o in action.option_strings if o.startswith("--"))
    if action.dest in MODES[mode][module].set_by_launch:
        assert option in plan(monkeypatch, mode, [])[module], f"launch.py sets no {option}"
        return
    if action.nargs == 0:  # store_true
        assert option in plan(monkeypatch, mode, [option])[module]
        return
    value = another_value(action)
    argv = plan(monkeypatch, mode, [option, value])[module]
    assert follows(argv, option, value), f"{option} {value} did not reach {module}: {argv}"


@pytest.mark.parametrize("module", list(PROGRAMS))
def test_every_program_defaults_to_the_one_heartbeat(module: str) -> None:
    parser = argparse.ArgumentParser()
    PROGRAMS[module](parser)
    args = parser.parse_args([])
    assert args.heartbeat == defaults.HEARTBEAT_INTERVAL
    assert args.log_level == defaults.LOG_LEVEL
    assert args.log_format == "text"


def test_the_records_the_flags_fill_default_alike() -> None:
    from broker.broker import BrokerConfig
    from gpu_worker.link import BrokerLink
    from gpu_worker.worker import WorkerConfig
    from http_frontend.broker_client import BrokerClient

    broker = BrokerConfig()
    assert (broker.clients, broker.workers, broker.max_queue) == (
        defaults.CLIENTS_ENDPOINT, defaults.WORKERS_ENDPOINT, defaults.MAX_QUEUE)
    assert (broker.heartbeat_interval, broker.heartbeat_liveness) == (
        defaults.HEARTBEAT_INTERVAL, defaults.HEARTBEAT_LIVENESS)
    worker = WorkerConfig()
    assert (worker.broker, worker.heartbeat) == (defaults.WORKERS_ENDPOINT,
                                                 defaults.HEARTBEAT_INTERVAL)
    for peer in (BrokerLink, BrokerClient):
        parameters = inspect.signature(peer).parameters
        assert parameters["heartbeat"].default == defaults.HEARTBEAT_INTERVAL, peer
        assert parameters["liveness"].default == defaults.HEARTBEAT_LIVENESS, peer


def test_one_heartbeat_flag_sets_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    by_program = plan(monkeypatch, "cluster", ["--heartbeat", "0.25"])
    for argv in by_program.values():
        assert follows(argv, "--heartbeat", "0.25"), argv


def test_defaults_are_not_repeated_on_the_command_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = plan(monkeypatch, "cluster", [])["broker"]
    assert broker[3:] == ["--curve", "/keys"]


# Every flag launch.py took before its flags became the programs' own: they keep working.
OLD_CLUSTER_FLAGS = [
    "--host", "0.0.0.0", "--port", "9000", "--clients", "tcp://127.0.0.1:7000",
    "--workers", "tcp://0.0.0.0:7001", "--timeout", "30", "--max-queue", "9",
    "--ready-timeout", "5", "--curve", "/keys", "--insecure", "--api-key", "k1",
    "--api-keys-file", "/f", "--cors-origin", "http://a", "--model", "tiny",
    "--num-gpus", "0", "--num-workers", "2", "--max-batch", "2", "--heartbeat", "0.5",
    "--cache-dir", "/c", "--offload", "--compile", "--grace", "4", "--log-level", "DEBUG"]
OLD_WORKER_FLAGS = [
    "worker", "--broker", "tcp://head:5556", "--device", "cpu", "--models", "tiny:1",
    "--num-gpus", "0", "--num-workers", "1", "--max-batch", "2", "--heartbeat", "0.5",
    "--cache-dir", "/c", "--offload", "--compile", "--grace", "4", "--log-level", "DEBUG",
    "--broker-key", "b.key", "--key", "w.key_secret"]


@pytest.mark.parametrize("argv", [OLD_CLUSTER_FLAGS, OLD_WORKER_FLAGS], ids=["cluster", "join"])
def test_the_flags_of_earlier_releases_still_parse(argv: list[str]) -> None:
    args = launch.parse_args(argv)
    assert args.heartbeat == 0.5 and args.grace == 4.0 and args.log_level == "DEBUG"


def test_keys_worker_is_not_read_as_a_prefix_of_a_program_flag() -> None:
    # --worker is a prefix of the broker's --workers and the worker's --worker-id.
    args = launch.parse_args(["keys", "/k", "--worker", "gpu-7", "--worker", "gpu-8"])
    assert (args.command, args.dir, args.worker) == ("keys", "/k", ["gpu-7", "gpu-8"])


def test_a_frontend_limit_that_cannot_work_stops_launch_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--reserved-threads"):
        plan(monkeypatch, "cluster", ["--threads", "4", "--reserved-threads", "4"])


def test_one_worker_id_for_several_workers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--worker-id"):
        plan(monkeypatch, "cluster", ["--num-workers", "2", "--worker-id", "w"])


def test_a_flag_two_programs_would_offer_is_refused() -> None:
    def add_timeout(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--timeout", type=float, default=1.0)

    clash = flags.Program("clash", "clash", add_timeout)
    with pytest.raises(ValueError, match="--timeout is a flag of both frontend and clash"):
        flags.add_program_arguments(argparse.ArgumentParser(), [launch.FRONTEND, clash])


def test_a_shared_flag_with_another_default_is_refused() -> None:
    def add_heartbeat(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--heartbeat", type=float, default=2.0)

    other = flags.Program("other", "other", add_heartbeat)
    with pytest.raises(ValueError, match="differ in its default"):
        flags.add_program_arguments(argparse.ArgumentParser(), [launch.BROKER, other])
