"""The Dockerfile, read as Docker would and checked against the repository and the programs.

No image is built here (no container daemon, no base images): what is checked is what can go
wrong without one — a stage, a file or a command that does not exist, a root user, a flag the
program refuses, the slim image missing a package the broker or the frontend imports — and the
wheel the first stage builds is built, from the build context .dockerignore leaves.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.commands import EXTRA_VARIABLES, PROGRAMS, REPO, console_scripts, parse

DOCKERFILE = REPO / "Dockerfile"
CONTROL_REQUIREMENTS = REPO / "deploy" / "docker" / "control-requirements.txt"
TARGETS = {"broker": "dc-broker", "frontend": "dc-frontend", "worker": "dc-worker"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def read_dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs and the stages, each with its instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+as\s+(\S+))?", args.strip(), re.I)
            assert match, line
            current = Stage(match[2] or "", match[1])
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, value = args.partition("=")
            global_args[name.strip()] = value.strip()
        else:
            current.instructions.append((keyword, args.strip()))
    return global_args, stages


GLOBAL_ARGS, STAGES = read_dockerfile()


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [STAGES[name]]
    while chain[-1].base in STAGES:
        chain.append(STAGES[chain[-1].base])
    return chain


def inherited(name: str, keyword: str) -> str | None:
    """The last ``keyword`` instruction in effect in a stage (USER, CMD, HEALTHCHECK)."""
    for stage in lineage(name):
        found = stage.all(keyword)
        if found:
            return found[-1]
    return None


def env_of(name: str) -> dict[str, str]:
    """The ENV a stage's processes start with (its own and its parents')."""
    env: dict[str, str] = {}
    for stage in reversed(lineage(name)):
        for args in stage.all("ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def json_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_the_stages_and_targets() -> None:
    assert set(STAGES) == {"wheel", "control", *TARGETS}
    assert STAGES["wheel"].base == STAGES["control"].base == "${PYTHON_IMAGE}"
    assert GLOBAL_ARGS["PYTHON_IMAGE"].startswith("python:3.") and "slim" in \
        GLOBAL_ARGS["PYTHON_IMAGE"]
    assert STAGES["worker"].base == "${CUDA_IMAGE}"
    assert GLOBAL_ARGS["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert STAGES["broker"].base == STAGES["frontend"].base == "control"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_image_runs_as_a_user_that_is_not_root(target: str) -> None:
    user = inherited(target, "USER")
    assert user is not None, f"{target} runs as root"
    assert user.split(":")[0] not in ("root", "0")
    # The user is made in the image, with that uid.
    uid = user.split(":")[0]
    made = " ".join(s for stage in lineage(target) for s in stage.all("RUN"))
    assert f"--uid {uid}" in made


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_image_runs_its_program_with_flags_it_takes(target: str) -> None:
    command = json_form(inherited(target, "CMD") or "null")
    assert command[0] == TARGETS[target]
    assert command[0] in console_scripts(), f"{command[0]} is not a console script"
    assert inherited(target, "ENTRYPOINT") is None  # CMD is the whole command line
    parse(command, env_of(target), where=f"Dockerfile {target}")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_variable_the_dockerfile_sets_is_read(target: str) -> None:
    env = env_of(target)
    program = PROGRAMS[TARGETS[target]]
    for name in env:
        if name.startswith("DC_"):
            assert name in program.variables() | EXTRA_VARIABLES, \
                f"Dockerfile {target}: {name} is not a variable {program.script} reads"
    assert env["PATH"].startswith("/opt/diffusion-cluster/bin:")


def test_the_frontend_is_checked_on_healthz_and_the_others_say_why_not() -> None:
    check = inherited("frontend", "HEALTHCHECK")
    assert check is not None and "/healthz" in check
    for target in ("broker", "worker"):
        assert inherited(target, "HEALTHCHECK") == "NONE"


def frontend_healthcheck() -> list[str]:
    check = inherited("frontend", "HEALTHCHECK") or ""
    return json_form(check.split("CMD", 1)[1].strip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_health_check_passes_on_a_real_frontend_and_fails_without_one(
        tmp_path: Path) -> None:
    command = frontend_healthcheck()
    assert command[0] == "python"
    check = [sys.executable, *command[1:]]
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "DC_FRONTEND_PORT": str(port)}
    failed = subprocess.run(check, env=env, capture_output=True, timeout=30)
    assert failed.returncode != 0  # nothing listens
    frontend = subprocess.Popen(
        [sys.executable, "-m", "http_frontend", "--port", str(port), "--no-image-store",
         "--data-dir", str(tmp_path), "--broker", "tcp://127.0.0.1:1"], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(check, env=env, capture_output=True, timeout=30)
            if result.returncode == 0:
                break
            assert frontend.poll() is None, "the frontend exited"
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.3)
    finally:
        frontend.terminate()
        frontend.wait(timeout=30)


def test_volumes_hold_the_data_dir_and_the_model_cache() -> None:
    frontend = env_of("frontend")
    assert STAGES["frontend"].all("VOLUME") == [json.dumps([frontend["DC_DATA_DIR"]])]
    worker = env_of("worker")
    (volume,) = json_form(STAGES["worker"].all("VOLUME")[0])
    assert worker["DC_CACHE_DIR"] == volume
    assert worker["HF_HOME"].startswith(volume + "/")


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any folder above it; ** spans folders."""
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
        .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))


def in_build_context(path: str) -> bool:
    included = True
    for negated, pattern in dockerignore_patterns():
        if _matches(pattern, path):
            included = negated
    return included


def repository_files() -> list[str]:
    """Files a checkout has: tracked, and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\n") if name and (REPO / name).is_file()]


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """The stage's COPY instructions from the build context: (sources, destination)."""
    found = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    files = repository_files()
    for stage in STAGES.values():
        for sources, _ in copies(stage):
            for source in sources:
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"COPY {source}: no such file"
                inside = [f for f in files if f == source or f.startswith(source + "/")]
                assert inside, f"COPY {source}: nothing tracked there"
                kept = [f for f in inside if in_build_context(f)]
                assert kept, f"COPY {source}: excluded by .dockerignore"
                if (REPO / source).is_file():
                    assert kept == [source]


def test_copy_from_names_an_earlier_stage() -> None:
    seen: list[str] = []
    for name, stage in STAGES.items():
        for args in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", args)
            if match:
                assert match[1] in seen, f"{name}: COPY --from={match[1]}"
        seen.append(name)


def test_the_context_leaves_out_what_images_must_not_carry() -> None:
    for path in (".venv/bin/python", "tests/conftest.py", ".git/HEAD", "test-artifacts/x",
                 "broker/__pycache__/broker.cpython-311.pyc"):
        assert not in_build_context(path), path


def test_the_wheel_stage_builds_a_complete_wheel_from_what_it_copies(tmp_path: Path) -> None:
    """What the first stage runs, on the files its COPY lines take from the context."""
    source = tmp_path / "src"
    files = [f for f in repository_files() if in_build_context(f)]
    for sources, destination in copies(STAGES["wheel"]):
        for item in sources:
            item = item.rstrip("/")
            for name in files:
                if name == item or name.startswith(item + "/"):
                    target = source / destination.rstrip("/") / Path(name).relative_to(
                        Path(item).parent if destination in ("./", ".") else Path(item))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / name, target)
    assert (source / "setup.cfg").is_file() and (source / "broker" / "__main__.py").is_file()
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   cwd=source, check=True, capture_output=True, timeout=180)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for module in ("broker/__main__.py", "gpu_worker/__main__.py", "http_frontend/__main__.py",
                   "launcher/environment.py", "launch.py", "http_frontend/static/index.html"):
        assert module in names, module
    for script in (*TARGETS.values(), "diffusion-cluster"):
        assert re.search(rf"^{re.escape(script)} = ", scripts, re.M), script


def install_requires() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = [line.split("#")[0].strip()
             for line in config["options"]["install_requires"].splitlines()]
    return {requirement_name(line): line for line in lines if line}


def requirement_name(line: str) -> str:
    return re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower().replace("_", "-")


def control_requirements() -> list[str]:
    return [line.strip() for line in CONTROL_REQUIREMENTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_slim_images_requirements_are_setup_cfgs_own() -> None:
    declared = install_requires()
    for line in control_requirements():
        assert declared.get(requirement_name(line)) == line, \
            f"{line}: not as setup.cfg's install_requires says ({declared.get(line)})"
    names = {requirement_name(line) for line in control_requirements()}
    assert not names & {"torch", "diffusers", "transformers", "accelerate"}


IMPORT_AS_THE_SLIM_IMAGE = """
import importlib.abc, importlib.metadata as md, json, re, sys
allowed = set(json.loads(sys.argv[1]))
owners = md.packages_distributions()

def norm(name):
    return name.lower().replace("_", "-")

class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        dists = owners.get(name.split(".")[0])
        if dists and not any(norm(d) in allowed for d in dists):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInTheImage())
import broker.__main__, http_frontend.__main__, http_frontend.app, launch
import http_frontend.image_store, boto3, botocore.config, botocore.exceptions
boto3.session.Session().client("s3", region_name="us-east-1")
"""


def test_the_broker_frontend_and_launcher_import_nothing_the_slim_image_lacks() -> None:
    """Import them (the S3 store and `diffusion-cluster keys` included) with every package
    the slim image does not install hidden, as if it were absent: optional imports (botocore's
    certifi) fall back as they would there; a needed one fails."""
    allowed = closure({requirement_name(line) for line in control_requirements()})
    allowed |= {"diffusion-cluster", "setuptools"}  # the project; setuptools' .pth hook
    result = subprocess.run([sys.executable, "-c", IMPORT_AS_THE_SLIM_IMAGE,
                             json.dumps(sorted(allowed))], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, \
        f"{CONTROL_REQUIREMENTS.relative_to(REPO)} lacks a package:\n{result.stderr[-2000:]}"


def closure(names: set[str]) -> set[str]:
    """The distributions ``names`` install, their dependencies included."""
    import importlib.metadata as md

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement and not re.search(r"extra == .binary.", requirement):
                continue
            todo.append(requirement_name(requirement))
    return seen


def test_pip_name_matching_is_sane() -> None:
    assert requirement_name("psycopg[binary]>=3.2") == "psycopg"
    assert requirement_name("prometheus_client>=0.20") == "prometheus-client"
