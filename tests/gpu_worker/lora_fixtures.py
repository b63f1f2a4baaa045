"""Tiny, seeded LoRA adapter files for the tiny test pipelines (built-in tiny SD, SDXL, FLUX).

Two builders, both deterministic (same pipeline architecture + seed + rank + targets -> the
same bytes on disk) and both leaving the pipeline passed in untouched (the adapter is made on
a fresh copy of the denoiser's architecture, built from its config; only shapes are used):

- ``make_lora``: a PEFT LoRA on the denoiser (``pipe.unet`` or ``pipe.transformer``) over the
  attention projections (to_q/to_k/to_v/to_out.0, plus FLUX's add_q/k/v_proj/to_add_out, by
  default), saved with the pipeline class's
  own ``save_lora_weights`` as one diffusers-format ``.safetensors`` file (keys such as
  ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``), with
  the LoRA config stored as adapter metadata.
- ``make_kohya_lora``: the same adapter (same seed -> the same A/B values) for a UNet
  pipeline, saved in kohya-ss naming (``lora_unet_<module_path_with_underscores>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``), which diffusers' ``load_lora_weights`` converts on load.
  With ``alpha == rank`` (the default) it has the same effect as the ``make_lora`` file.

Why B is randomised: PEFT initialises ``lora_B`` to zeros so that a fresh adapter is an exact
no-op (B @ A == 0). An untrained adapter like that would make every "the LoRA changed the
image" assertion fail, and would hide a LoRA that was loaded but never applied (e.g. onto
projections that fused QKV bypasses). Both A and B are drawn from a seeded generator, scaled so
the weight delta is of the order of the base weights' own spread: images change visibly but
stay finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Attention projections. The add_* ones are the text-stream projections of joint-attention
# transformers (FLUX double blocks: fused into to_added_qkv); UNets have none, and PEFT only
# needs one name to match somewhere.
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0",
                                    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LORA_FILE = "pytorch_lora_weights.safetensors"


def denoiser_of(pipe: Any) -> tuple[str, torch.nn.Module]:
    """Return ("unet" | "transformer", module) for a pipeline's denoiser."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def lora_state_dict(pipe: Any, *, seed: int, rank: int = 4,
                    targets: Sequence[str] = DEFAULT_TARGETS,
                    strength: float = 0.5,
                    ) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Build a seeded PEFT LoRA for the pipeline's denoiser, without touching the pipeline.

    Returns (denoiser component name, PEFT state dict with keys relative to the denoiser, e.g.
    ``down_blocks.1...to_q.lora_A.weight``, and the LoraConfig kwargs saved as metadata).
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    component, denoiser = denoiser_of(pipe)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                        target_modules=list(targets))
    # A fresh model of the same architecture: the caller's denoiser may already carry
    # adapters or fused projections. Fork the RNG so the random init leaves the caller's
    # torch seed alone (the init values are never used: only names and shapes are).
    with torch.random.fork_rng(devices=[]):
        model = type(denoiser).from_config(denoiser.config)  # type: ignore[attr-defined]
    model.add_adapter(config)
    state = get_peft_model_state_dict(model)
    if not state:
        raise ValueError(f"no module of {type(denoiser).__name__} matches {list(targets)}")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        shape = state[key].shape  # lora_A: (rank, in), lora_B: (out, rank)
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if ".lora_A." in key:
            values /= math.sqrt(shape[1])
        else:
            values *= strength / math.sqrt(shape[1])
        out[key] = values.contiguous()
    # Only what LoraConfig(**metadata) needs on load: no peft_version or defaults that tie the
    # file's bytes to the installed PEFT.
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(set(targets))}
    return component, out, metadata


def make_lora(pipe: Any, path: Path, *, seed: int, rank: int = 4,
              targets: Sequence[str] = DEFAULT_TARGETS, strength: float = 0.5,
              weight_name: str = LORA_FILE) -> Path:
    """Save a seeded diffusers-format LoRA for the pipeline's denoiser under path; return the file.

    ``path`` is a directory (created if need be); the file is ``path / weight_name``.
    ``pipe.load_lora_weights(path, adapter_name=...)`` or ``(file, ...)`` both load it.
    """
    component, state, metadata = lora_state_dict(pipe, seed=seed, rank=rank, targets=targets,
                                                 strength=strength)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(
        save_directory=path,
        weight_name=weight_name,
        safe_serialization=True,
        **{f"{component}_lora_layers": state,
           f"{component}_lora_adapter_metadata": metadata},
    )
    _canonical_header(path / weight_name)
    return path / weight_name


def _canonical_header(file: Path) -> None:
    """Rewrite a safetensors header with sorted keys: safetensors writes its metadata map in
    hash order, so two saves of the same tensors can differ in bytes. Data is untouched."""
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def make_kohya_lora(pipe: Any, path: Path, *, seed: int, rank: int = 4,
                    targets: Sequence[str] = DEFAULT_TARGETS, alpha: float | None = None,
                    strength: float = 0.5, weight_name: str = "kohya_lora.safetensors") -> Path:
    """Save the same LoRA as ``make_lora`` (same seed -> same A/B) in kohya-ss naming.

    Only for UNet pipelines (SD 1.x, which kohya trains on the diffusers UNet and so names with
    diffusers module paths; SDXL's diffusers-named keys load too). ``alpha`` defaults to
    ``rank`` (scale alpha/rank = 1, the same effect as the ``make_lora`` file); another alpha
    scales the adapter by alpha/rank on load. Returns the file written (``path / weight_name``).
    """
    from safetensors.torch import save_file

    component, state, _ = lora_state_dict(pipe, seed=seed, rank=rank, targets=targets,
                                          strength=strength)
    if component != "unet":
        raise ValueError("kohya naming is built here for UNet pipelines only")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, kind, _weight = key.rsplit(".", 2)  # "<module path>", "lora_A", "weight"
        prefix = "lora_unet_" + module.replace(".", "_")
        out[f"{prefix}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{prefix}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = path / weight_name
    save_file(dict(sorted(out.items())), str(target),
              metadata={"ss_network_dim": str(rank),
                        "ss_network_alpha": str(rank if alpha is None else alpha)})
    _canonical_header(target)
    return target


def lora_folder(pipe: Any, folder: Path, seeds: dict[str, int]) -> Path:
    """A worker's --lora-dir: one ``make_lora`` adapter per name (``styles/ink`` goes in a
    subfolder), each from its seed, named ``<name>.safetensors``."""
    import shutil
    import tempfile

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        for name, seed in seeds.items():
            target = folder / f"{name}.safetensors"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(make_lora(pipe, Path(scratch) / name, seed=seed), target)
    return folder


def seed_hub_cache(cache_root: Path, repo_id: str, file_path: Path, *,
                   weight_name: str = LORA_FILE) -> Path:
    """Put ``file_path`` into a Hugging Face hub cache as ``repo_id``'s ``weight_name``, in
    the layout huggingface_hub downloads into and reads back offline (HF_HUB_OFFLINE=1)::

        CACHE/models--OWNER--NAME/blobs/<sha256 of the file>
        CACHE/models--OWNER--NAME/snapshots/<commit>/WEIGHT_NAME -> ../../blobs/<sha256>
        CACHE/models--OWNER--NAME/refs/main                          (holds <commit>)

    The commit is made from the repo id, so files seeded into one repo share its snapshot (a
    repo of several files). ``cache_root`` is what HF_HUB_CACHE names. Returns the snapshot
    file (the link).
    """
    import hashlib
    import os

    repo = Path(cache_root) / f"models--{repo_id.replace('/', '--')}"
    data = Path(file_path).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, as a git commit
    link = repo / "snapshots" / commit / weight_name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub does
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return link
