"""The systemd units: `systemd-analyze verify` passes (where it is installed), every command
line and variable is one the program takes, and the restart policy is launch.py's: the
supervisor's back-off, and no restart after exit status 78 (a configuration error).

Not checked here: running them under systemd (these machines run none as PID 1).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.supervisor import EXIT_CONFIG, Supervisor
from tests.deploy.commands import (
    DEPLOY,
    LAUNCH,
    PROGRAMS,
    REPO,
    defaults_of,
    env_file_assignments,
    make_keys,
    parse,
    script_of,
)

SYSTEMD = DEPLOY / "systemd"
UNITS = {"dc-broker.service": "dc-broker", "dc-frontend.service": "dc-frontend",
         "dc-worker@.service": "dc-worker"}
INSTALLED = "/opt/diffusion-cluster/bin/"
CONFIG = "/etc/diffusion-cluster/"
INSTANCE, HOST = "1", "gpu-host-7"  # what %i and %H stand for below


def read_unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)], repeated keys kept in order, specifiers expanded."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        value = value.replace("%i", INSTANCE).replace("%H", HOST).replace("%%", "%")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: str, section: str, key: str) -> list[str]:
    return [v for k, v in read_unit(unit)[section] if k == key]


def value(unit: str, section: str, key: str) -> str:
    (found,) = values(unit, section, key)
    return found


def environment(unit: str) -> dict[str, str]:
    """Environment= of the unit, then its EnvironmentFile= examples as shipped (all commented
    out: the unit's defaults are what runs)."""
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        for word in shlex.split(assignment):
            name, _, text = word.partition("=")
            env[name] = text
    return env


def exec_start(unit: str) -> list[str]:
    return shlex.split(value(unit, "Service", "ExecStart"))


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", text)
    assert match, text
    return float(match[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[match[2]]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_each_unit_runs_its_program_with_flags_and_variables_it_takes(unit: str) -> None:
    command = exec_start(unit)
    assert command[0] == INSTALLED + UNITS[unit]
    parse(command, environment(unit), where=unit)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_every_variable_in_the_example_env_files_is_one_the_program_takes(unit: str) -> None:
    files = [f.lstrip("-") for f in values(unit, "Service", "EnvironmentFile")]
    assert files and all(f.startswith(CONFIG) for f in files)
    shipped = [SYSTEMD / Path(f).name for f in files if (SYSTEMD / Path(f).name).exists()]
    assert shipped, f"{unit}: no example of {files} in deploy/systemd"
    program = PROGRAMS[UNITS[unit]]
    for example in shipped:
        names = [n for n in env_file_assignments(example) if n.startswith("DC_")]
        assert names
        for name in names:
            assert name in program.variables(), f"{example.name}: {name} names no flag of " \
                f"{program.script}"
        # And the values shown work (the unit's defaults, then the file uncommented).
        shown = {k: v for k, v in env_file_assignments(example).items() if v}
        parse(exec_start(unit), {**environment(unit), **shown}, where=example.name)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_restarts_follow_launch_pys_back_off_and_stop_at_exit_status_78(unit: str) -> None:
    assert value(unit, "Service", "Restart") == "always"
    assert value(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)
    assert value(unit, "Unit", "StartLimitIntervalSec") == "0"  # retried for ever, as there
    first = seconds(value(unit, "Service", "RestartSec"))
    longest = seconds(value(unit, "Service", "RestartMaxDelaySec"))
    steps = int(value(unit, "Service", "RestartSteps"))
    # launcher/supervisor.py: 0.5 s doubling up to MAX_BACKOFF.
    assert first == 0.5
    assert longest == Supervisor.MAX_BACKOFF
    assert steps == math.ceil(math.log2(Supervisor.MAX_BACKOFF / first))
    assert value(unit, "Service", "KillMode") == "mixed"  # SIGTERM to the program alone


def test_stop_timeouts_cover_the_drains() -> None:
    frontend = parse(exec_start("dc-frontend.service"), environment("dc-frontend.service"))
    assert seconds(value("dc-frontend.service", "Service", "TimeoutStopSec")) >= \
        frontend.drain_timeout + 5
    # A worker finishes its running job, which cannot outlive the request deadline.
    assert seconds(value("dc-worker@.service", "Service", "TimeoutStopSec")) >= \
        defaults_of("dc-frontend")["timeout"]


def test_the_broker_stops_last() -> None:
    """systemd stops units in the reverse of their start order: after the broker means
    stopped before it, so frontends and workers drain while it still relays."""
    for unit in ("dc-frontend.service", "dc-worker@.service"):
        assert "dc-broker.service" in value(unit, "Unit", "After").split()


def test_each_worker_sees_its_own_gpu_as_cuda0_under_an_id_of_its_own() -> None:
    env = environment("dc-worker@.service")
    assert env["CUDA_VISIBLE_DEVICES"] == INSTANCE
    args = parse(exec_start("dc-worker@.service"), env)
    assert args.device == "cuda:0"
    assert getattr(args, "gpus_per_worker", 1) == 1  # a group sets its GPUs in worker-N.env
    assert args.worker_id == f"{HOST}-gpu{INSTANCE}"
    assert env["HF_HOME"].startswith(env["DC_CACHE_DIR"] + "/")
    assert env["HOME"] == env["DC_CACHE_DIR"]  # ProtectSystem=strict: the only writable place
    assert value("dc-worker@.service", "Service", "CacheDirectory") == "diffusion-cluster"
    assert env["DC_CACHE_DIR"] == "/var/cache/diffusion-cluster"


def test_the_key_files_named_are_those_launch_py_keys_writes(tmp_path: Path) -> None:
    """docs/deployment.md: `diffusion-cluster keys /etc/diffusion-cluster/curve` on the head."""
    written = make_keys(tmp_path, [LAUNCH, "keys", CONFIG + "curve"])
    broker = parse(exec_start("dc-broker.service"), environment("dc-broker.service"))
    assert broker.curve == CONFIG + "curve"
    for unit in ("dc-frontend.service", "dc-worker@.service"):
        args = parse(exec_start(unit), environment(unit))
        for path in (args.broker_key, args.key):
            assert Path(path).relative_to(broker.curve).as_posix() in written, f"{unit}: {path}"


def test_the_frontend_keeps_its_data_in_the_state_directory() -> None:
    env = environment("dc-frontend.service")
    assert value("dc-frontend.service", "Service", "StateDirectory") == "diffusion-cluster"
    assert env["DC_DATA_DIR"] == "/var/lib/diffusion-cluster"
    assert script_of(exec_start("dc-frontend.service")) == "dc-frontend"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Keys of a newer systemd than the one verifying: older ones ignore them with this warning,
# and restart at RestartSec each time.
NEWER_KEYS = {"RestartSteps": 254, "RestartMaxDelaySec": 254}


def systemd_version() -> int:
    assert SYSTEMD_ANALYZE
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True,
                         check=True).stdout
    return int(re.match(r"systemd (\d+)", out)[1])  # type: ignore[index]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """The units as installed, but with the programs of this checkout's venv (verify wants
    ExecStart's file to exist)."""
    venv_bin = REPO / ".venv" / "bin"
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text().replace(INSTALLED, f"{venv_bin}/")
        (tmp_path / unit).write_text(text)
    (tmp_path / "dc-worker@1.service").symlink_to("dc-worker@.service")
    names = ["dc-broker.service", "dc-frontend.service", "dc-worker@1.service"]
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(tmp_path / n) for n in names)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    version = systemd_version()
    unexpected = [line for line in (result.stdout + result.stderr).splitlines() if line and
                  not any(f"Unknown key '{key}'" in line or f"Unknown key name '{key}'" in line
                          for key, since in NEWER_KEYS.items() if version < since)]
    assert result.returncode == 0 and not unexpected, "\n".join(unexpected)
