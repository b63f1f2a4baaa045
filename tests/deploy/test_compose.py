"""The compose files: they parse, use only keys the Compose Specification names, name only
services, volumes, secrets, build targets and variables that exist, and every command line and
DC_ variable is one the program takes (with the image's own ENV).

Not checked here: `docker compose config` (no compose plugin on these machines) and running
the services (no container daemon, no GPU).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.commands import (
    DEPLOY,
    LAUNCH,
    REPO,
    defaults_of,
    endpoint_port,
    make_keys,
    parse,
    programs_in,
    script_of,
)
from tests.deploy.test_dockerfile import STAGES, TARGETS, env_of

COMPOSE = DEPLOY / "compose"
FILES = sorted(COMPOSE.glob("compose*.yaml"))
EXAMPLE_ENV = COMPOSE / "example.env"
CURVE_DIR = "/etc/diffusion-cluster/curve"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def example_env() -> dict[str, str]:
    values = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, with .env = example.env; a required variable left empty
    there (HEAD) gets a stand-in, as an operator's .env would give it."""
    def value(match: re.Match[str]) -> str:
        name, kind, rest = match[1], match[2], match[3]
        given = env.get(name, "")
        if kind in (":?", "?"):
            return given or f"{name.lower()}.example"
        if kind == ":-" and not given:
            return rest
        if kind == "-" and name not in env:
            return rest
        return given
    return INTERPOLATION.sub(value, text)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(interpolate(path.read_text(), example_env()))


@pytest.fixture(scope="module", params=[f.name for f in FILES])
def compose(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, load(COMPOSE / request.param)


def services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in doc["services"].items()}


def environment_of(service: dict[str, Any]) -> dict[str, str | None]:
    """What the service's processes start with: its image's ENV, then its own."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    image = service["image"].split(":")[0].removeprefix("diffusion-cluster-")
    return {**env_of(image), **{k: None if v is None else str(v) for k, v in env.items()}}


def commands(doc: dict[str, Any]) -> list[tuple[str, list[str], dict[str, str | None]]]:
    """(service, program argv, environment) for every program a service runs."""
    found = []
    for name, service in services(doc).items():
        command = service.get("command")
        assert isinstance(command, list), f"{name}: write the command as a list"
        for argv in programs_in([str(word) for word in command]):
            found.append((name, argv, environment_of(service)))
    return found


def test_there_is_a_file_for_one_host_and_one_for_joining_workers() -> None:
    assert {f.name for f in FILES} == {"compose.yaml", "compose.worker.yaml"}


def test_every_variable_used_is_in_example_env_and_every_one_there_is_used() -> None:
    used = set()
    for path in FILES:
        used |= {m[1] for m in INTERPOLATION.finditer(path.read_text())}
        assert "$" not in INTERPOLATION.sub("", path.read_text()).replace("$$", ""), \
            f"{path.name}: a $VARIABLE not in the ${{VARIABLE}} form"
    assert used == set(example_env())


def test_every_command_line_and_variable_is_one_the_program_takes(
        compose: tuple[str, dict[str, Any]]) -> None:
    file, doc = compose
    found = commands(doc)
    assert found
    for service, argv, env in found:
        parse(argv, env, where=f"{file} {service}")


def test_services_volumes_secrets_and_targets_exist(compose: tuple[str, dict[str, Any]]) -> None:
    file, doc = compose
    named = services(doc)
    volumes = set(doc.get("volumes") or {})
    secrets = set(doc.get("secrets") or {})
    for name, service in named.items():
        for needed in service.get("depends_on") or {}:
            assert needed in named, f"{file} {name}: depends on {needed}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            assert source in volumes, f"{file} {name}: volume {source} is not declared"
        for secret in service.get("secrets") or []:
            assert secret in secrets, f"{file} {name}: secret {secret} is not declared"
        build = service.get("build")
        if build:
            assert build["target"] in STAGES
            assert (COMPOSE / build["context"]).resolve() == REPO
            assert service["image"].startswith(f"diffusion-cluster-{build['target']}:")
        programs = [script_of(argv) for argv in programs_in(service["command"])
                    if script_of(argv) != LAUNCH]
        image_target = service["image"].split(":")[0].removeprefix("diffusion-cluster-")
        for script in programs:
            assert TARGETS[image_target] == script, f"{file} {name}: {script} in {image_target}"
    assert volumes == {v.split(":")[0] for s in named.values() for v in s.get("volumes") or []}


def test_frontends_and_workers_reach_the_brokers_endpoints() -> None:
    doc = load(COMPOSE / "compose.yaml")
    by_service = {service: parse(argv, env) for service, argv, env in commands(doc)
                  if script_of(argv) != LAUNCH}
    broker = by_service["broker"]
    for service, args in by_service.items():
        if service.startswith("worker"):
            assert endpoint_port(args.broker) == ("broker", endpoint_port(broker.workers)[1])
        if service == "frontend":
            assert endpoint_port(args.broker) == ("broker", endpoint_port(broker.clients)[1])
    published = doc["services"]["broker"]["ports"]
    assert [p.rsplit(":", 1)[1] for p in published] == [str(endpoint_port(broker.workers)[1])]
    (http,) = doc["services"]["frontend"]["ports"]
    assert http.rsplit(":", 1)[1] == str(by_service["frontend"].port)


def test_each_worker_reserves_its_own_gpus_and_sees_the_first_as_cuda0(
        compose: tuple[str, dict[str, Any]]) -> None:
    file, doc = compose
    taken: list[str] = []
    for name, argv, env in commands(doc):
        if script_of(argv) != "dc-worker":
            continue
        args = parse(argv, env)
        assert args.device == "cuda:0"
        (device,) = doc["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # One GPU, or a group of --gpus-per-worker: cuda:0 and the next ones.
        assert len(device["device_ids"]) == getattr(args, "gpus_per_worker", 1)
        taken += device["device_ids"]
    assert taken and len(taken) == len(set(taken)), f"{file}: GPUs {taken}"


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_stop_grace_periods_cover_the_drains(compose: tuple[str, dict[str, Any]]) -> None:
    """A frontend drains for --drain-timeout; a worker finishes its job, which cannot outlive
    the frontend's request deadline (--timeout)."""
    file, doc = compose
    deadline = defaults_of("dc-frontend")["timeout"]
    for name, argv, env in commands(doc):
        service = doc["services"][name]
        if script_of(argv) == "dc-frontend":
            args = parse(argv, env)
            deadline = args.timeout
            assert seconds(service["stop_grace_period"]) >= args.drain_timeout + 5
    for name, argv, _ in commands(doc):
        if script_of(argv) == "dc-worker":
            assert seconds(doc["services"][name]["stop_grace_period"]) >= deadline, file
        if script_of(argv) != LAUNCH:
            assert doc["services"][name].get("init") is True  # a PID 1 that reaps and relays


def test_the_key_files_named_are_the_ones_the_keys_service_writes(tmp_path: Path) -> None:
    doc = load(COMPOSE / "compose.yaml")
    (keys_command,) = programs_in(doc["services"]["keys"]["command"])
    assert keys_command[:3] == [LAUNCH, "keys", CURVE_DIR]
    written = make_keys(tmp_path, keys_command)
    script = doc["services"]["keys"]["command"][2]
    assert f"test -e {CURVE_DIR}/broker.key_secret ||" in script  # once: the keys stay
    assert "broker.key_secret" in written
    for name, argv, env in commands(doc):
        if script_of(argv) == LAUNCH:
            continue
        args = vars(parse(argv, env))
        for dest in ("broker_key", "key", "curve"):
            path = args.get(dest)
            if path:
                relative = Path(path).relative_to(CURVE_DIR).as_posix()
                assert relative == "." or relative in written, f"{name}: {path}"
                mounts = [v for v in doc["services"][name]["volumes"]
                          if v.split(":")[1] == CURVE_DIR]
                assert mounts and (mounts[0].endswith(":ro") or name == "keys"), name
    # The secret keys are each its own owner's only: the loader refuses wider modes.
    from broker.auth import load_secret

    for name in written:
        if name.endswith("_secret"):
            load_secret(tmp_path / name)


def test_a_joining_worker_reads_its_keys_from_secrets() -> None:
    doc = load(COMPOSE / "compose.worker.yaml")
    for name, argv, env in commands(doc):
        args = parse(argv, env)
        for path in (args.broker_key, args.key):
            secret = Path(path).relative_to("/run/secrets").as_posix()
            assert secret in doc["services"][name]["secrets"]
        assert endpoint_port(args.broker)[1] == 5556
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./keys/")


# The Compose Specification's names (compose-spec.io): a misspelt key is not an error Compose
# always reports, and no compose plugin is here to ask.
TOP_LEVEL = {"version", "name", "include", "services", "networks", "volumes", "secrets",
             "configs", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cpu_count", "cpu_percent", "cpu_shares",
    "cpu_period", "cpu_quota", "cpu_rt_runtime", "cpu_rt_period", "cpus", "cpuset", "cap_add",
    "cap_drop", "cgroup", "cgroup_parent", "command", "configs", "container_name",
    "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules", "devices",
    "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file", "environment",
    "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck",
    "hostname", "image", "init", "ipc", "isolation", "labels", "links", "logging",
    "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit",
    "platform", "ports", "post_start", "pre_stop", "privileged", "profiles", "pull_policy",
    "read_only", "restart", "runtime", "scale", "secrets", "security_opt", "shm_size",
    "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty",
    "ulimits", "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir"}
DEVICE_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}


def test_every_key_is_one_compose_knows(compose: tuple[str, dict[str, Any]]) -> None:
    file, doc = compose
    assert {k for k in doc if not k.startswith("x-")} <= TOP_LEVEL, file
    for name, service in services(doc).items():
        assert set(service) <= SERVICE_KEYS, f"{file} {name}: {set(service) - SERVICE_KEYS}"
        assert service["restart"] in RESTART
        assert set(service.get("build") or {}) <= {"context", "dockerfile", "target", "args"}
        for condition in (service.get("depends_on") or {}).values():
            assert condition["condition"] in ("service_started", "service_healthy",
                                              "service_completed_successfully")
        for device in (service.get("deploy") or {}).get("resources", {}).get(
                "reservations", {}).get("devices", []):
            assert set(device) <= DEVICE_KEYS, f"{file} {name}: {device}"
