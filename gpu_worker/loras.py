"""LoRA adapters on one worker's pipeline: which it can apply, which are in memory, and the
set each batch runs with.

The adapters are the ``.safetensors`` files under the worker's ``--lora-dir`` (subfolders
too), named by their path there without the suffix (``styles/ink.safetensors`` is
``styles/ink``), in the formats diffusers' ``load_lora_weights`` reads: diffusers/PEFT, kohya
and the community formats it converts. The folder is looked at again every few seconds, so
files added or removed are announced without a restart. A file is announced only when its
keys fit the loaded denoiser (a UNet's or a transformer's; for a UNet, the width of its
cross-attention), and checked again when loaded: diffusers loads a FLUX adapter into SD as a
silent no-op, so one that registers nothing is refused.

Adapters also come from Hugging Face repos the operator names, ``--lora-repo
REPO_ID[:WEIGHT_NAME]``: naming one is what allows the worker to download it, and a request
can only use what was named. Each is resolved once, at start, through ``hf_hub_download``
(which honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME``, so an offline worker
takes it from a pre-seeded cache), and announced as ``REPO_ID`` (``REPO_ID/WEIGHT_STEM`` when
a file was named) with source "hub". A repo that cannot be resolved, or whose adapter does not
fit the model, stops the worker at start: the operator asked for it by name. Its file is in
the cache's snapshot of one commit, which never changes, so it is not looked at again; a
folder file of the same name gives way to it.

Loading costs a few hundred milliseconds, switching sets a few: adapters stay loaded, least
recently used first out, within ``max_loaded`` adapters and ``max_bytes`` of weights. Each
batch switches to exactly its set at its scales, sorted by name (the order changes the last
bits); a batch without adapters disables them all, which gives the base model's exact bytes
(``disable_lora``: unlike fusing and unfusing, which is not bit-exact). Adapters need the
denoiser's attention projections unfused: a fused QKV layer has no LoRA, and diffusers loads
the adapter around it without a word. ``PipelineRunner`` therefore fuses nothing when a worker
has a LoRA folder.

Threads: ``announcement`` runs on the link's I/O thread (each heartbeat), ``apply`` on the
device thread; what both read is swapped or changed under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.protocol import MAX_LORA_NAME

log = logging.getLogger(__name__)
# PEFT says so at each adapter after the first, which is how adapters are meant to be used here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute",
                        category=UserWarning)

RESCAN_EVERY = 3.0  # seconds between looks at the LoRA folder
# Adapters announced at most, and their names' characters: every heartbeat carries the list,
# and a heartbeat over the broker's header limit (256 KiB) would be dropped, the worker with it.
MAX_ANNOUNCED = 1000
MAX_ANNOUNCED_CHARS = 64 * 1024
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
               "lora_magnitude_vector")


class LoraError(Exception):
    """An adapter a job asked for cannot be applied here: its job fails with this message."""


class LoraSetupError(ValueError):
    """An adapter the operator named cannot work on this worker: it refuses to start."""


@dataclass(frozen=True)
class AdapterFile:
    name: str
    path: Path
    size: int
    mtime: float
    source: str = "file"  # what announcements say: "file" (--lora-dir) or "hub" (--lora-repo)


class LoraLibrary:
    """The adapters of one pipeline, from one folder and the repos resolved at start
    (``resolve_lora_repo``); the worker owns it."""

    def __init__(self, pipe: Any, directory: Path | None, *,
                 repos: Sequence[AdapterFile] = (), max_loaded: int = 8,
                 max_bytes: int = 2 << 30, clock: Any = time.monotonic) -> None:
        self._pipe = pipe
        self._directory = directory
        self.max_loaded = max_loaded
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._repos = {repo.name: repo for repo in repos}  # fixed at start, checked below
        self._files: dict[str, AdapterFile] = dict(self._repos)  # and what the folder holds
        self._shadowed: set[str] = set()  # folder files a repo's adapter hides (logged once)
        self._verdicts: dict[tuple[Path, int, float], bool] = {}  # a file's fit, by version
        self._next_scan = 0.0
        self._capped = False  # the folder held more than a worker announces (logged once)
        # In memory, least recently used first: name -> (adapter id in the pipeline, bytes).
        self._loaded: OrderedDict[str, tuple[str, int, AdapterFile]] = OrderedDict()
        self._ids = 0
        self._active = False  # whether any adapter is enabled in the pipeline now
        if (directory is not None or repos) and _fused_attention(pipe):
            raise LoraSetupError("this pipeline's attention projections are fused, and LoRA "
                                 "adapters would silently miss them: leave them unfused to "
                                 "apply adapters")
        for repo in repos:
            _check_repo_fits(repo, pipe)

    # ---------------------------------------------------------------- the I/O thread

    def announcement(self) -> dict[str, dict[str, Any]]:
        """What the worker announces (READY, heartbeats): name -> loaded, bytes, source."""
        self._rescan_if_due()
        with self._lock:
            files = dict(self._files)
            loaded = {name: size for name, (_, size, _) in self._loaded.items()}
        return {name: {"loaded": name in loaded,
                       "bytes": loaded.get(name, file.size), "source": file.source}
                for name, file in files.items()}

    def _rescan_if_due(self) -> None:
        now = self._clock()
        if self._directory is None or now < self._next_scan:
            return
        self._next_scan = now + RESCAN_EVERY
        try:
            found = self._scan(self._directory)
        except OSError as exc:  # the folder went away, or cannot be read: announce none
            log.warning("cannot read the LoRA folder %s: %s", self._directory, exc)
            found = {}
        found = {**self._unshadowed(found), **self._repos}
        with self._lock:
            if found.keys() != self._files.keys():
                log.info("LoRA adapters here: %s", ", ".join(sorted(found)) or "none")
            self._files = found

    def _unshadowed(self, found: dict[str, AdapterFile]) -> dict[str, AdapterFile]:
        """The folder's adapters less those a repo's adapter of the same name replaces: the
        operator named the repo on its own, the folder only as a whole."""
        for name in (found.keys() & self._repos.keys()) - self._shadowed:
            self._shadowed.add(name)  # once: the folder is looked at every few seconds
            log.warning("LoRA file %s is hidden by --lora-repo's adapter of the same name",
                        found[name].path)
        return {name: file for name, file in found.items() if name not in self._repos}

    def _scan(self, directory: Path) -> dict[str, AdapterFile]:
        found: dict[str, AdapterFile] = {}
        chars = sum(map(len, self._repos))  # the repos' adapters are announced too
        for path in sorted(directory.rglob("*.safetensors")):
            if len(found) + len(self._repos) >= MAX_ANNOUNCED or chars >= MAX_ANNOUNCED_CHARS:
                if not self._capped:  # once: the folder is looked at every few seconds
                    self._capped = True
                    log.warning("the LoRA folder %s holds more adapters than a worker "
                                "announces; the first %d (by path) are", directory, len(found))
                break
            relative = path.relative_to(directory)
            if any(part.startswith(".") for part in relative.parts):
                continue
            name = relative.with_suffix("").as_posix()
            stat = path.stat()
            file = AdapterFile(name, path, stat.st_size, stat.st_mtime)
            if _usable_name(name) and self._fits(file):
                found[name] = file
                chars += len(name)
        return found

    def _fits(self, file: AdapterFile) -> bool:
        """Whether the file's keys fit this pipeline's denoiser (judged once per version)."""
        key = (file.path, file.size, file.mtime)
        if key not in self._verdicts:
            try:
                verdict = fits_denoiser(_read_shapes(file.path), self._pipe)
            except Exception as exc:  # not safetensors, truncated, unreadable
                log.warning("LoRA file %s cannot be read: %s", file.path, exc)
                verdict = False
            else:
                if not verdict:
                    log.info("LoRA file %s is not for this model; not announced", file.path)
            self._verdicts[key] = verdict
        return self._verdicts[key]

    # ---------------------------------------------------------------- the device thread

    def apply(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make exactly ``loras`` (name, scale) active for the next pipeline call; none:
        the base model, exactly. Raises LoraError for an adapter it cannot apply."""
        if not loras:
            if self._active:
                self._pipe.disable_lora()
                self._active = False
            return
        ordered = sorted(loras)
        ids = [self._load(name, keep={n for n, _ in ordered}) for name, _ in ordered]
        self._pipe.set_adapters(ids, adapter_weights=[scale for _, scale in ordered])
        if not self._active:
            self._pipe.enable_lora()
            self._active = True

    def _load(self, name: str, keep: set[str]) -> str:
        """The pipeline's id for adapter ``name``, loading it (and evicting others) first
        when it is not in memory, or its file changed since."""
        with self._lock:
            file = self._files.get(name)
            held = self._loaded.get(name)
        if file is None:
            raise LoraError(f"this worker has no LoRA adapter {name!r} (any more)")
        if held is not None and held[2] == file:
            with self._lock:
                self._loaded.move_to_end(name)
            return held[0]
        if held is not None:
            self._evict(name)  # its file changed: the new one replaces it
        adapter_id = f"lora{self._ids}"
        self._ids += 1
        started = time.perf_counter()
        try:
            self._pipe.load_lora_weights(str(file.path), adapter_name=adapter_id)
        except Exception as exc:
            self._forget_failed(adapter_id)
            raise LoraError(f"LoRA adapter {name!r} cannot be loaded: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if adapter_id not in _registered(self._pipe):
            # diffusers loads an adapter of another family as a silent no-op.
            self._forget_failed(adapter_id)
            raise LoraError(f"LoRA adapter {name!r} does not fit this model")
        size = adapter_sizes(self._pipe).get(adapter_id, 0)
        with self._lock:
            self._loaded[name] = (adapter_id, size, file)
        log.info("loaded LoRA adapter %s (%d KiB) in %.0f ms", name, size // 1024,
                 (time.perf_counter() - started) * 1000)
        self._make_room(keep)
        return adapter_id

    def _make_room(self, keep: set[str]) -> None:
        """Evict the least recently used adapters past the bounds, never one of ``keep``."""
        while True:
            with self._lock:
                total = sum(size for _, size, _ in self._loaded.values())
                over = len(self._loaded) > self.max_loaded or total > self.max_bytes
                victim = next((n for n in self._loaded if n not in keep), None)
            if not over or victim is None:
                return
            self._evict(victim)

    def _evict(self, name: str) -> None:
        with self._lock:
            adapter_id, _, _ = self._loaded.pop(name)
        self._pipe.delete_adapters([adapter_id])
        log.info("unloaded LoRA adapter %s", name)

    def _forget_failed(self, adapter_id: str) -> None:
        """Leave nothing of a load that failed half-way."""
        if adapter_id in _registered(self._pipe):
            self._pipe.delete_adapters([adapter_id])

    def loaded(self) -> list[str]:
        """The adapters in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)


def _fused_attention(pipe: Any) -> bool:
    """Whether any attention module of the denoiser has its projections fused."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    return denoiser is not None and any(getattr(module, "fused_projections", False)
                                        for module in denoiser.modules())


def _usable_name(name: str) -> bool:
    return 0 < len(name) <= MAX_LORA_NAME and name.isprintable()


# ---------------------------------------------------------------- adapters from the Hub

# The file diffusers' load_lora_weights looks for in a repo when it is given no weight_name.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Characters a name cannot hold: a <lora:NAME:SCALE> prompt tag could not name it
# (http_frontend/loras.py).
_TAG_CHARACTERS = frozenset(":<>")


def resolve_lora_repo(spec: str) -> AdapterFile:
    """``--lora-repo REPO_ID[:WEIGHT_NAME]``'s adapter file, downloaded into the Hugging Face
    cache when it is not there yet and downloads are allowed. Raises LoraSetupError, with a
    one-line reason naming the repo, when it cannot be had."""
    repo_id, weight_name = parse_lora_repo(spec)
    name = hub_adapter_name(repo_id, weight_name)
    try:
        path = Path(_download(repo_id, weight_name))
        stat = path.stat()
    except LoraSetupError:
        raise
    except Exception as exc:  # not found, gated, offline and not cached, unreachable, ...
        raise LoraSetupError(f"--lora-repo {spec}: cannot be resolved: "
                             f"{_why_unresolved(exc)}") from None
    log.info("LoRA adapter %s is %s", name, path)
    return AdapterFile(name, path, stat.st_size, stat.st_mtime, source="hub")


def parse_lora_repo(spec: str) -> tuple[str, str | None]:
    """(repo id, weight file name or None) of ``REPO_ID[:WEIGHT_NAME]``; hf_hub_download
    checks the repo id itself."""
    repo_id, colon, weight_name = spec.partition(":")  # a repo id holds no ':'
    if colon and not weight_name:
        raise LoraSetupError(f"--lora-repo {spec}: no file name after ':'")
    if colon and not weight_name.endswith(".safetensors"):
        # The fit check reads the tensors' shapes from a safetensors header.
        raise LoraSetupError(f"--lora-repo {spec}: only .safetensors files are served")
    return repo_id, weight_name or None


def hub_adapter_name(repo_id: str, weight_name: str | None) -> str:
    """``REPO_ID``, or ``REPO_ID/WEIGHT_STEM`` for a named file: names requests can use."""
    name = repo_id if weight_name is None else \
        f"{repo_id}/{weight_name.removesuffix('.safetensors')}"
    if not _usable_name(name) or _TAG_CHARACTERS & set(name):
        raise LoraSetupError(f"--lora-repo: the adapter name {name!r} is not usable: at most "
                             f"{MAX_LORA_NAME} printable characters, none of ':', '<', '>'")
    return name


def _download(repo_id: str, weight_name: str | None) -> str:
    """The file's path in the cache: the named one, else diffusers' default name, else the
    repo's one .safetensors file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if weight_name is not None:
        return hf_hub_download(repo_id, weight_name)
    try:
        return hf_hub_download(repo_id, DEFAULT_WEIGHT_NAME)
    except EntryNotFoundError:  # on the Hub, or in the cache when offline
        candidates = _safetensors_of(repo_id)
    if len(candidates) != 1:
        listed = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise LoraSetupError(f"--lora-repo {repo_id}: the repo has no {DEFAULT_WEIGHT_NAME} "
                             f"and {len(candidates)} other .safetensors files ({listed or '-'}):"
                             f" name one, as {repo_id}:FILE")
    return hf_hub_download(repo_id, candidates[0])


def _safetensors_of(repo_id: str) -> list[str]:
    """The repo's .safetensors files: the Hub's list, else (offline, unreachable) what the
    cache holds of its latest snapshot."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        return _cached_safetensors_of(repo_id)
    try:
        names = HfApi().list_repo_files(repo_id)
    except (RepositoryNotFoundError, GatedRepoError):
        raise
    except Exception as exc:  # the Hub unreachable, or down: the cache answers
        log.info("cannot list %s on the Hub (%s): looking in the cache", repo_id,
                 type(exc).__name__)
        return _cached_safetensors_of(repo_id)
    return sorted(name for name in names if name.endswith(".safetensors"))


def _cached_safetensors_of(repo_id: str) -> list[str]:
    """The .safetensors files the cache holds of the repo's snapshot that its ``main`` ref
    names (raises LocalEntryNotFoundError when it holds none)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, local_files_only=True))
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors"))


def _why_unresolved(exc: Exception) -> str:
    """One line on why a repo's file cannot be had; huggingface_hub's own messages for a
    cache miss speak of arguments the operator never gave."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        cache = constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            return (f"not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set: "
                    f"download it there first, or allow downloads")
        return f"not in the Hugging Face cache {cache}, and the Hub cannot be reached"
    return _one_line(f"{type(exc).__name__}: {exc}")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _check_repo_fits(repo: AdapterFile, pipe: Any) -> None:
    """Refuse, at start, a repo's adapter that is not for this model: the operator named it,
    so leaving it out quietly would hide a mistake."""
    try:
        fits = fits_denoiser(_read_shapes(repo.path), pipe)
    except Exception as exc:  # not safetensors, truncated
        raise LoraSetupError(f"--lora-repo adapter {repo.name} ({repo.path}) cannot be read: "
                             f"{_one_line(str(exc))}") from None
    if not fits:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        raise LoraSetupError(f"--lora-repo adapter {repo.name} is not for this model: its "
                             f"weights do not fit its {type(denoiser).__name__}")


def _registered(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def adapter_sizes(pipe: Any) -> dict[str, int]:
    """Bytes of each adapter's weights in the pipeline, by adapter id (PEFT keeps them in
    dicts keyed by it, under lora_A, lora_B, ...)."""
    import torch

    totals: dict[str, int] = {}
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, torch.nn.Module):
            continue
        for name, param in component.named_parameters():
            parts = name.split(".")
            for index, part in enumerate(parts[:-1]):
                if part in _LORA_PARTS:
                    adapter = parts[index + 1]
                    totals[adapter] = totals.get(adapter, 0) + param.numel() * param.element_size()
                    break
    return totals


def _read_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (a safe_open, not a dict)


def fits_denoiser(shapes: dict[str, list[int]], pipe: Any) -> bool:
    """Whether adapter keys (and shapes) fit ``pipe``'s denoiser: a UNet's keys for a UNet, of
    its cross-attention width; a transformer's for a transformer. Text-encoder keys alone
    fit nothing here: the worker adapts the denoiser."""
    unet = getattr(pipe, "unet", None)
    keys = list(shapes)
    for_unet = any(k.startswith(("unet.", "lora_unet_")) for k in keys)
    for_transformer = any(k.startswith(("transformer.", "lora_transformer_",
                                        "lora_unet_double_blocks", "lora_unet_single_blocks",
                                        "diffusion_model.")) for k in keys)
    if unet is None:
        return for_transformer
    if not for_unet or for_transformer:
        return False
    width = getattr(unet.config, "cross_attention_dim", None)
    widths = {shape[-1] for key, shape in shapes.items() if "attn2" in key and "to_k" in key
              and ("lora_A" in key or "lora_down" in key or "lora.down" in key)}
    return not widths or widths == {width}
