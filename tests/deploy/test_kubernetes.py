"""The Kubernetes manifests: valid against Kubernetes' own schemas (kubernetes-validate, offline),
and consistent with the programs and with each other — every command line and DC_ variable one
the program takes, every Secret, ConfigMap, volume and port that is named exists, the key files
a program reads are mounted where it looks, the drain fits the grace period.

Not checked here: applying them to a cluster (none is reachable). `kubectl kustomize` runs
where kubectl is installed.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.commands import (
    DEPLOY,
    LAUNCH,
    defaults_of,
    endpoint_port,
    make_keys,
    parse,
    programs_in,
    script_of,
    shell_commands,
)
from tests.deploy.test_dockerfile import TARGETS, env_of

KUBE = DEPLOY / "kubernetes"
KUSTOMIZATION = KUBE / "kustomization.yaml"
SECRETS_EXAMPLE = KUBE / "secrets.example.yaml"
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p != KUSTOMIZATION)
# The oldest Kubernetes release still commonly run, and the newest the validator knows.
VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


def documents(paths: list[Path] = MANIFESTS) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, doc) for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


DOCS = documents()
APPLIED = [doc for file, doc in DOCS if file != SECRETS_EXAMPLE.name]


def of_kind(kind: str, docs: list[dict[str, Any]] = APPLIED) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


DEPLOYMENTS = of_kind("Deployment")
SECRETS = of_kind("Secret", [doc for _, doc in DOCS])
CONFIGMAPS = of_kind("ConfigMap")


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", DOCS, ids=[doc_id(d) for d in DOCS])
def test_every_manifest_is_valid_against_kubernetes_schemas(
        item: tuple[str, dict[str, Any]], version: str) -> None:
    kubernetes_validate.validate(item[1], version, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    broken = yaml.safe_load((KUBE / "broker.yaml").read_text().split("---")[0])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 10  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest_but_the_secrets_example() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in MANIFESTS if p != SECRETS_EXAMPLE)
    images = {image["name"] for image in kustomization["images"]}
    used = {c["image"] for _, c in containers()}
    assert used == images == {f"diffusion-cluster-{target}" for target in TARGETS}
    assert all(d["metadata"].get("namespace") is None for d in APPLIED)  # kustomize sets it


def containers(*, init: bool = True) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name, deployment in DEPLOYMENTS.items():
        spec = deployment["spec"]["template"]["spec"]
        for container in [*(spec.get("initContainers", []) if init else []),
                          *spec["containers"]]:
            found.append((name, container))
    return found


def pod_spec(deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = DEPLOYMENTS[deployment]["spec"]["template"]["spec"]
    return spec


def secret_keys(name: str) -> set[str]:
    secret = SECRETS[name]
    return {*secret.get("stringData", {}), *secret.get("data", {})}


def environment_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its image's ENV, then its own (a Secret's value read as
    a stand-in; its key must exist)."""
    env: dict[str, str] = env_of(container["image"].removeprefix("diffusion-cluster-"))
    for source in container.get("envFrom", []):
        config_map = source["configMapRef"]["name"]
        env.update(CONFIGMAPS[config_map]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"].get("secretKeyRef") or item["valueFrom"]["configMapKeyRef"]
        if "secretKeyRef" in item["valueFrom"]:
            assert ref["key"] in secret_keys(ref["name"]), f"{ref} is not in {SECRETS_EXAMPLE}"
        else:
            assert ref["key"] in CONFIGMAPS[ref["name"]]["data"], ref
        env[item["name"]] = f"stand-in-from-{ref['name']}"
    return env


def program_commands() -> list[tuple[str, dict[str, Any], list[str]]]:
    return [(name, container, argv) for name, container in containers()
            for argv in programs_in(container["command"])]


def parsed(deployment: str) -> Any:
    (args,) = [parse(argv, environment_of(c)) for name, c, argv in program_commands()
               if name == deployment and script_of(argv) != LAUNCH]
    return args


def test_every_command_line_and_variable_is_one_the_program_takes() -> None:
    found = program_commands()
    assert {script_of(argv) for _, _, argv in found} == set(TARGETS.values())
    for name, container, argv in found:
        parse(argv, environment_of(container), where=f"{name}/{container['name']}")
        target = container["image"].removeprefix("diffusion-cluster-")
        assert TARGETS[target] == script_of(argv)


def test_every_secret_configmap_and_claim_named_exists() -> None:
    claims = of_kind("PersistentVolumeClaim")
    for name, deployment in DEPLOYMENTS.items():
        for volume in pod_spec(name)["volumes"]:
            if "secret" in volume:
                secret = volume["secret"]
                assert secret["secretName"] in SECRETS, secret
                for item in secret.get("items", []):
                    assert item["key"] in secret_keys(secret["secretName"])
            elif "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            else:
                assert set(volume) == {"name", "emptyDir"}, volume
        for container in pod_spec(name)["containers"] + pod_spec(name).get("initContainers", []):
            environment_of(container)
            names = {v["name"] for v in pod_spec(name)["volumes"]}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in names, f"{deployment['metadata']['name']}: {mount}"


def file_source(deployment: str, container: dict[str, Any], path: str) -> str:
    """Where a file a program reads comes from: the mount it lies under, checked to hold it."""
    mounts = sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"]))
    mount = next((m for m in mounts if path == m["mountPath"] or
                  path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert mount, f"{deployment}: {path} is on no volume"
    relative = path[len(mount["mountPath"]):].strip("/")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    if "secret" in volume:
        items = volume["secret"].get("items")
        names = {i["path"] for i in items} if items else secret_keys(volume["secret"]
                                                                    ["secretName"])
        assert relative == "" or relative in names, f"{deployment}: {path} not in {names}"
        return f"secret {volume['secret']['secretName']}"
    if "emptyDir" in volume and relative:
        # Filled by an init container of the pod (`install SOURCE DIR/`), from a Secret.
        written = []
        for writer in pod_spec(deployment).get("initContainers", []):
            (where,) = [m["mountPath"] for m in writer["volumeMounts"]
                        if m["name"] == volume["name"]] or [None]
            if where is None:
                continue
            for words in shell_commands(writer["command"][2]):
                if words[0] != "install" or "-d" in words:
                    continue
                source, target = words[-2], words[-1]
                if target.endswith("/"):
                    target += Path(source).name
                file_source(deployment, writer, source)
                written.append(target[len(where):].strip("/"))
        assert relative in written, f"{deployment}: nothing writes {path}"
    return f"{'emptyDir' if 'emptyDir' in volume else 'claim'} {volume['name']}"


FILE_FLAGS = ("broker_key", "key", "curve", "api_keys_file", "cache_dir", "lora_dir",
              "metrics_token_file")


def test_the_files_programs_read_are_mounted_where_they_look() -> None:
    for name, container, argv in program_commands():
        if script_of(argv) == LAUNCH:
            continue
        env = environment_of(container)
        args = vars(parse(argv, env))
        for dest in FILE_FLAGS:
            if args.get(dest):
                file_source(name, container, args[dest])
        for variable, value in env.items():
            if variable.startswith("DC_") and variable.endswith("_FILE"):
                assert file_source(name, container, value).startswith("secret "), variable


def test_the_init_containers_copy_secret_keys_at_mode_0600() -> None:
    for name, container in containers():
        if container in pod_spec(name).get("initContainers", []):
            for words in shell_commands(container["command"][2]):
                assert words[0] == "install"
                if words[-2].endswith("_secret"):
                    assert words[1:3] == ["-m", "0600"], words


def test_services_select_pods_and_name_their_ports() -> None:
    for name, service in of_kind("Service").items():
        selected = [d for d in DEPLOYMENTS.values() if service["spec"]["selector"].items() <=
                    d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, name
        ports = {p["name"]: p["containerPort"] for c in
                 selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name}: {port}"


def service_target(host: str, port: int) -> int:
    """The container port a Service's port leads to."""
    service = of_kind("Service")[host]
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    (deployment,) = [d for d in DEPLOYMENTS.values() if service["spec"]["selector"].items() <=
                     d["spec"]["template"]["metadata"]["labels"].items()]
    return next(p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
                for p in c["ports"] if p["name"] == entry["targetPort"])


def test_frontends_and_workers_reach_the_broker_through_its_service() -> None:
    broker = parsed("dc-broker")
    host, port = endpoint_port(parsed("dc-frontend").broker)
    assert service_target(host, port) == endpoint_port(broker.clients)[1]
    host, port = endpoint_port(parsed("dc-worker").broker)
    assert service_target(host, port) == endpoint_port(broker.workers)[1]
    assert broker.curve  # both endpoints take only CURVE keys


def test_one_broker_replaced_by_recreate() -> None:
    spec = DEPLOYMENTS["dc-broker"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_frontends_are_several_probed_on_readyz_and_healthz_and_drain_in_their_grace() -> None:
    spec = DEPLOYMENTS["dc-frontend"]["spec"]
    assert spec["replicas"] >= 2
    (container,) = spec["template"]["spec"]["containers"]
    args = parsed("dc-frontend")
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                        ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports[get["port"]] == args.port
    # preStop, then SIGTERM: --drain-timeout for waiting requests, then the last answers.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + args.drain_timeout + 2
    # Every frontend shares one history and one image store: no per-pod storage.
    env = environment_of(container)
    assert "DC_FRONTEND_DB_FILE" in env and env["DC_FRONTEND_IMAGE_STORE"].startswith("s3://")


def test_workers_take_one_gpu_and_finish_their_job_when_stopped() -> None:
    spec = DEPLOYMENTS["dc-worker"]["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    worker = parsed("dc-worker")
    gpus = getattr(worker, "gpus_per_worker", 1)  # a group splits each image over N GPUs
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert worker.device == "cuda:0"
    deadline = parsed("dc-frontend").timeout
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= deadline
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert deadline == defaults_of("dc-frontend")["timeout"]


def test_disruption_budgets_cover_frontends_and_workers_but_not_the_single_broker() -> None:
    covered = set()
    for budget in of_kind("PodDisruptionBudget").values():
        for name, deployment in DEPLOYMENTS.items():
            if budget["spec"]["selector"]["matchLabels"].items() <= \
                    deployment["spec"]["template"]["metadata"]["labels"].items():
                covered.add(name)
        assert budget["spec"].get("maxUnavailable") == 1
    assert covered == {"dc-frontend", "dc-worker"}


def test_every_container_asks_for_resources_and_runs_unprivileged() -> None:
    for name, container in containers():
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), f"{name}/{container['name']}"
        assert "memory" in container["resources"]["limits"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
    for name in DEPLOYMENTS:
        pod = pod_spec(name)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        # What the namespace's `restricted` Pod Security level demands besides.
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    namespace = of_kind("Namespace")["diffusion-cluster"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_network_policies_select_pods_that_exist() -> None:
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in DEPLOYMENTS.values()]
    for name, policy in of_kind("NetworkPolicy").items():
        for selector in [policy["spec"]["podSelector"]] + [
                peer["podSelector"] for rule in policy["spec"].get("ingress", [])
                for peer in rule.get("from", [])]:
            assert any(selector["matchLabels"].items() <= pod.items() for pod in labels), name


def test_the_secrets_example_holds_every_secret_the_manifests_name() -> None:
    named = set()
    for name in DEPLOYMENTS:
        named |= {v["secret"]["secretName"] for v in pod_spec(name)["volumes"] if "secret" in v}
        for container in pod_spec(name)["containers"]:
            named |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                      if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert named == set(SECRETS)
    assert not of_kind("Secret")  # real secrets are never in the applied manifests


def test_the_docs_commands_make_every_secret_with_its_keys(tmp_path: Path) -> None:
    """docs/deployment.md's `kubectl create secret` lines, from the files its `keys` line
    writes, give every Secret the manifests read (the optional HF token aside) its keys."""
    doc = (DEPLOY.parent / "docs" / "deployment.md").read_text()
    block = doc.split("### Kubernetes", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    (keys_line,) = [line for line in lines if line.startswith(f"{LAUNCH} keys ")]
    keys_command = shlex.split(keys_line)
    written = make_keys(tmp_path / "keys", keys_command)
    made: dict[str, set[str]] = {}
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:1] != ["kubectl"] or "secret" not in words:
            continue
        name = words[words.index("generic") + 1]
        keys = made.setdefault(name, set())
        for word in words:
            option, _, source = word.partition("=")
            if option == "--from-literal":
                keys.add(source.split("=", 1)[0])
            elif option == "--from-file":
                key, _, path = source.rpartition("=")
                keys.add(key or Path(path).name)
                if path.startswith(keys_command[2]):
                    relative = Path(path).relative_to(keys_command[2]).as_posix()
                    assert relative in written, f"{name}: {path} is not written by {keys_line}"
    optional = {"dc-hf-token"}
    assert set(made) == set(SECRETS) - optional
    for name, keys in made.items():
        assert keys == secret_keys(name), name


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not "
                                            "installed")
def test_kustomize_builds_valid_manifests_in_the_namespace_with_the_registrys_images() -> None:
    """`kubectl kustomize` runs offline: what `kubectl apply -k` would send."""
    assert KUBECTL
    result = subprocess.run([KUBECTL, "kustomize", str(KUBE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in APPLIED)
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    images = {f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    for doc in built:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"]
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"] + spec.get("initContainers", []):
                assert container["image"] in images
