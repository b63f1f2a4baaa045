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


@dataclass(frozen=True)
class AdapterFile:
    name: str
    path: Path
    size: int
    mtime: float


class LoraLibrary:
    """The adapters of one pipeline, from one folder; the worker owns it."""

    def __init__(self, pipe: Any, directory: Path | None, *, max_loaded: int = 8,
                 max_bytes: int = 2 << 30, clock: Any = time.monotonic) -> None:
        self._pipe = pipe
        self._directory = directory
        self.max_loaded = max_loaded
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, AdapterFile] = {}  # what the folder holds that fits
        self._verdicts: dict[tuple[Path, int, float], bool] = {}  # a file's fit, by version
        self._next_scan = 0.0
        self._capped = False  # the folder held more than a worker announces (logged once)
        # In memory, least recently used first: name -> (adapter id in the pipeline, bytes).
        self._loaded: OrderedDict[str, tuple[str, int, AdapterFile]] = OrderedDict()
        self._ids = 0
        self._active = False  # whether any adapter is enabled in the pipeline now
        if directory is not None and _fused_attention(pipe):
            raise ValueError("this pipeline's attention projections are fused, and LoRA "
                             "adapters would silently miss them: leave them unfused to "
                             "apply adapters")

    # ---------------------------------------------------------------- the I/O thread

    def announcement(self) -> dict[str, dict[str, Any]]:
        """What the worker announces (READY, heartbeats): name -> loaded, bytes, source."""
        self._rescan_if_due()
        with self._lock:
            files = dict(self._files)
            loaded = {name: size for name, (_, size, _) in self._loaded.items()}
        return {name: {"loaded": name in loaded,
                       "bytes": loaded.get(name, file.size), "source": "file"}
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
        with self._lock:
            if found.keys() != self._files.keys():
                log.info("LoRA adapters here: %s", ", ".join(sorted(found)) or "none")
            self._files = found

    def _scan(self, directory: Path) -> dict[str, AdapterFile]:
        found: dict[str, AdapterFile] = {}
        chars = 0
        for path in sorted(directory.rglob("*.safetensors")):
            if len(found) >= MAX_ANNOUNCED or chars >= MAX_ANNOUNCED_CHARS:
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
