"""One image on several devices: a worker group (``--gpus-per-worker N``).

The worker process is rank 0, the group's leader: it alone talks to the broker. It starts
N-1 follower processes, one per further device, and each loads the same pipeline. diffusers'
context parallelism then splits every attention of the denoiser across the N devices by
sequence (Ulysses: an all-to-all swaps the sequence split for a head split around each
attention; ring: key/value chunks pass around the ring). Every rank runs the same pipeline
call with the same seeds; the denoiser's output is gathered on each, so each holds the whole
image and the leader returns it. That cuts one image's latency, where batching cuts none.

Leader and followers speak over one pipe each, never through collectives: a follower waits
for its next call for as long as the worker is idle, which would time a collective out.
Each call's jobs go down the pipes before the leader runs it; after every step the leader
sends whether to go on (a cancelled job stops on every rank at the same step). Anything else
that goes wrong mid-call leaves the ranks at different collectives, which no rank can undo:
the group then ends, all of it (a follower whose leader is gone exits; a leader whose
follower is gone exits), and the supervisor starts it again, as after any worker crash.

diffusers 0.42 supports context parallelism for the denoisers that declare a plan for it
(FLUX.1, FLUX.2, Qwen-Image, and video families); CFG-parallel is listed there as to do.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from broker.protocol import JobSpec

log = logging.getLogger(__name__)

MODES = ("ulysses", "ring")
EXIT_GROUP_BROKEN = 70  # EX_SOFTWARE: a restart brings the group back
SETUP_GRACE = 30.0  # seconds a leader may go on loading after a follower failed to


class ParallelError(ValueError):
    """A group that cannot work for this model or device (refused at start)."""


def group_devices(first: str, size: int) -> tuple[str, ...]:
    """The devices of a group of ``size`` starting at ``first``: cuda:2 -> cuda:2, cuda:3...;
    CPU ranks (tests, no GPU) all use the CPU."""
    if size < 1:
        raise ParallelError("--gpus-per-worker must be at least 1")
    if not first.startswith("cuda"):
        return (first,) * size
    _, _, index = first.partition(":")
    start = int(index or 0)
    return tuple(f"cuda:{start + rank}" for rank in range(size))


@dataclass(frozen=True)
class GroupPlan:
    """What every rank needs to join: picklable, sent to each follower as it starts."""

    devices: tuple[str, ...]
    mode: str
    store_port: int = 0
    log_level: str = "INFO"  # the leader's --log-level and --log-format, for every rank
    log_format: str = "text"

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


class Group:
    """This process's place in a worker group, and its pipes to the others."""

    def __init__(self, plan: GroupPlan, rank: int, pipes: Sequence[Connection]) -> None:
        self.plan = plan
        self.rank = rank
        self._pipes = list(pipes)  # the leader's: one per follower; a follower's: its leader
        self._closing = False
        self._ready = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        return self.plan.devices[self.rank]

    # ---------------------------------------------------------------- the leader's side

    @classmethod
    def lead(cls, plan: GroupPlan, spec: Any, options: Any) -> Group:
        """Start the followers, then join the process group with them as rank 0."""
        import torch.distributed as dist

        check_mode(plan)
        store = dist.TCPStore("127.0.0.1", 0, world_size=plan.size,  # type: ignore[attr-defined]
                              is_master=True, timeout=timedelta(minutes=30),
                              wait_for_workers=False)  # they start just below
        plan = dataclasses.replace(plan, store_port=store.port)
        context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA
        pipes, followers = [], []
        for rank in range(1, plan.size):
            mine, theirs = context.Pipe()
            follower = context.Process(target=follow, args=(plan, rank, spec, options, theirs),
                                       name=f"group-rank{rank}", daemon=True)
            follower.start()
            theirs.close()
            pipes.append(mine)
            followers.append(follower)
        group = cls(plan, 0, pipes)
        group._watch(followers)
        group._join(store)
        log.info("worker group of %d on %s (%s attention)", plan.size,
                 ", ".join(plan.devices), plan.mode)
        return group

    def _watch(self, followers: list[Any]) -> None:
        def watch() -> None:
            multiprocessing.connection.wait([f.sentinel for f in followers])
            if not self._ready:
                # A follower that failed while loading: the leader, loading the same, most
                # likely fails alike and says why (exit 78). Give it that time.
                deadline = time.monotonic() + SETUP_GRACE
                while not self._closing and time.monotonic() < deadline:
                    time.sleep(0.1)
            if not self._closing:
                gone = [f.name for f in followers if f.exitcode is not None]
                log.error("%s of this worker's group exited: the group ends with it, to be "
                          "started again", ", ".join(gone))
                os._exit(EXIT_GROUP_BROKEN)
        threading.Thread(target=watch, name="group-watch", daemon=True).start()

    def started(self) -> None:
        """Every rank has loaded its pipeline (the leader, once its own is ready)."""
        self._ready = True

    def announce(self, jobs: list[JobSpec], inputs: Mapping[str, Any]) -> None:
        """Tell the followers the call about to run (the leader, before each one)."""
        self._send(("call", jobs, dict(inputs)))

    def agree(self, keep_going: bool) -> bool:
        """After a step: the leader's answer, on every rank."""
        if self.leader:
            self._send(("step", keep_going))
            return keep_going
        message = self._receive()
        return bool(message[1])

    def _receive(self) -> tuple[Any, ...]:
        """A follower's next message from its leader; exits the process when the leader is
        gone (its end of the pipe closed: it exited, or was killed)."""
        try:
            message: tuple[Any, ...] = self._pipes[0].recv()
        except (EOFError, OSError):
            os._exit(EXIT_GROUP_BROKEN)
        return message

    def close(self) -> None:
        if self.leader and not self._closing:
            self._closing = True
            self._send(("stop",))

    def _send(self, message: tuple[Any, ...]) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # a follower gone: the watcher ends the group

    # ---------------------------------------------------------------- both sides

    def _join(self, store: Any) -> None:
        import torch
        import torch.distributed as dist

        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        dist.init_process_group(self.plan.backend, store=store, rank=self.rank,
                                world_size=self.plan.size, timeout=timedelta(minutes=10))

    def parallelise(self, pipe: Any) -> None:
        """Split ``pipe``'s denoiser across the group (every rank, after placing it)."""
        denoiser = getattr(pipe, "transformer", None)
        name = type(denoiser if denoiser is not None else pipe.unet).__name__
        if denoiser is None or not getattr(denoiser, "_cp_plan", None):
            raise ParallelError(f"--gpus-per-worker: {name} has no context-parallel plan in "
                                f"diffusers (FLUX.1, FLUX.2 and Qwen-Image have); run one "
                                f"worker per GPU instead")
        from diffusers import ContextParallelConfig

        degree = self.plan.size
        heads = getattr(denoiser.config, "num_attention_heads", degree)
        if self.plan.mode == "ulysses" and heads % degree:
            raise ParallelError(f"--gpus-per-worker {degree}: Ulysses attention splits the "
                                f"{heads} heads of {name} evenly, so the group size must "
                                f"divide {heads}")
        if self.plan.mode == "ring":
            # Ring attention merges partial results by their log-sum-exp, which diffusers'
            # cuDNN attention returns and its plain SDPA does not.
            denoiser.set_attention_backend("_native_cudnn")
        config = ContextParallelConfig(**{f"{self.plan.mode}_degree": degree})
        # diffusers picks each rank's device as rank % accelerator count, which is zero on a
        # CPU and wrong for a group that does not start at cuda:0: resolve it with ours.
        denoiser._resolve_parallel_config = types.MethodType(_resolver(self), denoiser)
        denoiser.enable_parallelism(config=config)


def check_mode(plan: GroupPlan) -> None:
    if plan.mode not in MODES:
        raise ParallelError(f"--context-parallel {plan.mode!r}: one of {', '.join(MODES)}")
    if plan.mode == "ring" and plan.backend != "nccl":
        raise ParallelError("--context-parallel ring needs CUDA: its attention kernel "
                            "(cuDNN) returns the log-sum-exp ring attention merges by; on a "
                            "CPU use ulysses")


def _exit_with_parent() -> None:
    """End this follower when its leader dies, even inside a collective that would otherwise
    wait for it until the process group's timeout, holding the GPU's memory."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(EXIT_GROUP_BROKEN)
    threading.Thread(target=watch, name="leader-watch", daemon=True).start()


def _resolver(group: Group) -> Any:
    """diffusers' ModelMixin._resolve_parallel_config, with this rank's own device."""
    def resolve(model: Any, config: Any) -> Any:
        import torch
        from diffusers.models._modeling_parallel import ParallelConfig

        config = ParallelConfig(context_parallel_config=config)
        device = torch.device(group.device)
        parallel = config.context_parallel_config
        mesh = torch.distributed.device_mesh.init_device_mesh(
            device_type=device.type, mesh_shape=parallel.mesh_shape,
            mesh_dim_names=parallel.mesh_dim_names)
        config.setup(group.rank, group.plan.size, device, mesh=mesh)
        model._parallel_config = config
        return config
    return resolve


# -------------------------------------------------------------------- a follower's life


def follow(plan: GroupPlan, rank: int, spec: Any, options: Any, leader: Connection) -> None:
    """A follower process: load the pipeline, join the group, run each call the leader
    announces, until it says stop or is gone."""
    import torch.distributed as dist

    from broker import logs
    from gpu_worker.pipeline import Interrupted, PipelineRunner, route_library_logs

    logs.configure("worker", plan.log_level, plan.log_format, group_rank=rank)
    if plan.log_format == "json":
        route_library_logs()
    logging.getLogger("torchao").setLevel(logging.ERROR)  # the leader says what matters
    _exit_with_parent()
    group = Group(plan, rank, [leader])
    group._join(dist.TCPStore("127.0.0.1", plan.store_port,  # type: ignore[attr-defined]
                              world_size=plan.size,
                              is_master=False, timeout=timedelta(minutes=30)))
    try:
        runner = PipelineRunner(spec, dataclasses.replace(options, device=group.device),
                                group=group)
        runner.loras.announcement()  # read the adapters' folder, as the leader does
    except Exception as exc:  # the leader loads the same and says why it cannot start
        log.info("group rank %d cannot start: %s", rank, exc)
        os._exit(EXIT_GROUP_BROKEN)
    try:
        while True:
            message = group._receive()
            if message[0] == "stop":
                break
            _, jobs, inputs = message
            try:
                runner.run_call(jobs, inputs)
            except Interrupted:
                pass  # the leader's job was cancelled: every rank stopped at the same step
    except BaseException:
        log.exception("this rank failed: the group ends")
        os._exit(EXIT_GROUP_BROKEN)
    finally:
        leader.close()
    dist.destroy_process_group()
