"""launch.py's plan: which processes, with which flags and environment."""

from __future__ import annotations

import pytest

import launch
from launcher import cluster


def plan(monkeypatch: pytest.MonkeyPatch, gpus: list[str], *argv: str) -> list:
    monkeypatch.setattr(launch, "visible_gpus",
                        lambda limit=None: gpus[:limit] if limit is not None else gpus)
    return launch.cluster_specs(launch.parse_args(list(argv)))


def test_one_worker_per_gpu_each_seeing_only_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, ["0", "1", "2"])
    workers = [s for s in specs if s.name.startswith("worker")]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1", "2"]
    for worker in workers:
        assert worker.argv[worker.argv.index("--device") + 1] == "cuda:0"
        assert worker.argv[worker.argv.index("--model") + 1] == "flux-schnell"
    assert specs[0].name == "broker" and specs[-1].name == "frontend"


def test_num_gpus_takes_the_first_n(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, ["3", "5", "7"], "--num-gpus", "2", "--model", "sdxl-turbo")
    workers = [s for s in specs if s.name.startswith("worker")]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["3", "5"]
    assert all("sdxl-turbo" in w.argv for w in workers)
    frontend = specs[-1].argv
    assert frontend[frontend.index("--default-model") + 1] == "sdxl-turbo"


def test_cpu_workers_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    specs = plan(monkeypatch, [], "--num-workers", "4")
    workers = [s for s in specs if s.name.startswith("worker")]
    assert len(workers) == 4
    for worker in workers:
        assert worker.argv[worker.argv.index("--device") + 1] == "cpu"
        assert worker.argv[worker.argv.index("--model") + 1] == "tiny"
        assert worker.argv[worker.argv.index("--threads") + 1] == "2"


def test_endpoints_and_http_flags_reach_each_process(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, [], "--clients", "tcp://127.0.0.1:7000", "--workers",
                 "tcp://0.0.0.0:7001", "--host", "0.0.0.0", "--port", "9000")
    broker, worker, frontend = specs
    assert broker.argv[broker.argv.index("--workers") + 1] == "tcp://0.0.0.0:7001"
    # Local workers connect to the loopback address of a wildcard bind.
    assert worker.argv[worker.argv.index("--broker") + 1] == "tcp://127.0.0.1:7001"
    assert frontend.argv[frontend.argv.index("--broker") + 1] == "tcp://127.0.0.1:7000"
    assert frontend.argv[frontend.argv.index("--port") + 1] == "9000"


@pytest.mark.parametrize("value", ["", "-1"])
def test_cuda_visible_devices_empty_means_no_gpu(monkeypatch: pytest.MonkeyPatch,
                                                 value: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert cluster.visible_gpus() == []


def test_cpu_threads_never_below_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 2)
    assert cluster.cpu_worker_threads(1) == 2
    assert cluster.cpu_worker_threads(2) == 1
    assert cluster.cpu_worker_threads(5) == 1


def test_models_places_each_worker_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, [str(i) for i in range(8)], "--models",
                 "flux-schnell:4,sdxl:2,tiny:1")
    workers = [s for s in specs if s.name.startswith("worker")]
    placed = [(w.argv[w.argv.index("--model") + 1], w.env["CUDA_VISIBLE_DEVICES"])
              for w in workers]
    assert placed == [("flux-schnell", "0"), ("flux-schnell", "1"), ("flux-schnell", "2"),
                      ("flux-schnell", "3"), ("sdxl", "4"), ("sdxl", "5"), ("tiny", "6")]
    frontend = specs[-1].argv
    assert frontend[frontend.index("--default-model") + 1] == "flux-schnell"


def test_models_on_cpu_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 6)
    specs = plan(monkeypatch, [], "--models", "tiny:2,/models/my-sdxl:1")
    workers = [s for s in specs if s.name.startswith("worker")]
    assert [w.argv[w.argv.index("--model") + 1] for w in workers] == [
        "tiny", "tiny", "/models/my-sdxl"]
    assert {w.argv[w.argv.index("--threads") + 1] for w in workers} == {"2"}


@pytest.mark.parametrize("text, expected", [
    ("flux-schnell:4,sdxl:2,tiny:1", [("flux-schnell", 4), ("sdxl", 2), ("tiny", 1)]),
    ("tiny", [("tiny", 1)]),
    (" sdxl-turbo:3 , ", [("sdxl-turbo", 3)]),
    ("org/repo:2", [("org/repo", 2)]),
])
def test_parse_model_counts(text: str, expected: list) -> None:
    assert cluster.parse_model_counts(text) == expected


@pytest.mark.parametrize("text", ["", ",", "tiny:0", ":3"])
def test_parse_model_counts_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        cluster.parse_model_counts(text)


def test_more_workers_than_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match="only 2 GPU"):
        cluster.place_workers([("flux-schnell", 2), ("sdxl", 1)], ["0", "1"])


@pytest.mark.parametrize(("gpus", "argv", "expected"), [
    ([], (), "tiny"),  # no --model: the frontend still knows what the workers serve
    (["0", "1"], (), "flux-schnell"),
    ([], ("--model", "sdxl-turbo"), "sdxl-turbo"),
    (["0", "1"], ("--models", "sdxl:1,tiny:1"), "sdxl"),
])
def test_the_frontend_always_gets_the_default_model(monkeypatch: pytest.MonkeyPatch,
                                                     gpus: list[str], argv: tuple[str, ...],
                                                     expected: str) -> None:
    specs = plan(monkeypatch, gpus, *argv)
    frontend = specs[-1].argv
    assert frontend.count("--default-model") == 1
    assert frontend[frontend.index("--default-model") + 1] == expected
    first_worker = next(s for s in specs if s.name.startswith("worker"))
    assert first_worker.argv[first_worker.argv.index("--model") + 1] == expected


def test_broker_and_frontend_name_the_addresses_they_listen_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, [], "--clients", "tcp://127.0.0.1:7000", "--workers",
                 "tcp://0.0.0.0:7001", "--host", "::", "--port", "9000", "--insecure")
    by_name = {s.name: s for s in specs}
    assert by_name["broker"].listens == ("tcp://127.0.0.1:7000", "tcp://0.0.0.0:7001")
    assert by_name["frontend"].listens == ("[::]:9000",)
    assert by_name["worker-cpu0"].listens == ()


def test_gpus_per_worker_groups_the_gpus_each_group_one_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, ["0", "1", "2", "3", "4"], "--gpus-per-worker", "2")
    workers = [s for s in specs if s.name.startswith("worker")]
    # Five GPUs make two groups of two; the fifth alone could not hold a group.
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0,1", "2,3"]
    assert [w.name for w in workers] == ["worker-gpu0-1", "worker-gpu2-3"]
    for worker in workers:
        assert worker.argv[worker.argv.index("--device") + 1] == "cuda:0"
        assert worker.argv[worker.argv.index("--gpus-per-worker") + 1] == "2"


def test_a_group_larger_than_the_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--gpus-per-worker 4, but only 2 GPU"):
        plan(monkeypatch, ["0", "1"], "--gpus-per-worker", "4")


def test_cpu_groups_share_the_cores_between_all_their_processes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    specs = plan(monkeypatch, [], "--gpus-per-worker", "2", "--num-workers", "2")
    workers = [s for s in specs if s.name.startswith("worker")]
    assert [w.argv[w.argv.index("--threads") + 1] for w in workers] == ["2", "2"]


def test_cpu_workers_wait_passively_between_parallel_regions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    specs = plan(monkeypatch, [], "--num-workers", "2")
    workers = [s for s in specs if s.name.startswith("worker")]
    assert len(workers) == 2
    assert all(w.env["OMP_WAIT_POLICY"] == "PASSIVE" for w in workers)
    assert all(w.env["CUDA_VISIBLE_DEVICES"] == "" for w in workers)
