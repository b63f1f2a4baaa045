"""LoRA adapters as a client asks for them, checked against what the workers announce.

A request names adapters in ``loras`` (``[{"name": "ink", "scale": 0.8}]``) or, as
Automatic1111 and SwarmUI users type them, in its prompt (``<lora:ink:0.8>``, scale 1 when
left out): the tags are taken out of the prompt and checked exactly as the field is. Both are
decided here, before anything is queued: an unknown adapter, one that no worker of the model
has, a scale out of range, too many, or a set no single worker holds (the job would wait for
ever) is a 400 naming the field. Workers announce only the adapters that fit their model
(gpu_worker/loras.py), so an adapter of another family is unknown to that model.

The job carries them sorted by name: the order a request gives does not change the image
(workers apply them in name order), so it must not split batches either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from broker.protocol import MAX_LORA_NAME, MAX_LORA_SCALE, MAX_LORAS
from http_frontend.broker_client import ClusterStatus
from http_frontend.errors import invalid

# <lora:NAME> or <lora:NAME:SCALE>; a name holds no '>' or ':' (file paths use '/').
_TAG = re.compile(rf"<lora:([^<>:]{{1,{MAX_LORA_NAME}}})(?::([^<>:]{{1,32}}))?>")

LoraUse = tuple[str, float]


def from_request(body: dict[str, Any], prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """(the prompt without its <lora:...> tags, the adapters asked for, by name)."""
    uses = list(_field(body.get("loras")))
    named = {name for name, _ in uses}
    for match in _TAG.finditer(prompt):
        name = match.group(1).strip()
        scale = _tag_scale(match.group(2), name)
        if name in named:
            raise invalid("prompt", f"the LoRA adapter {name!r} is named twice (in 'loras' "
                                    f"and as <lora:{name}> in the prompt, or twice there)")
        named.add(name)
        uses.append((name, scale))
    if len(uses) > MAX_LORAS:
        raise invalid("loras", f"at most {MAX_LORAS} LoRA adapters at once; got {len(uses)}")
    cleaned = " ".join(_TAG.sub(" ", prompt).split()) if uses else prompt
    return cleaned, tuple(sorted(uses))


def _field(value: Any) -> Iterator[LoraUse]:
    if value is None:
        return
    if not isinstance(value, list):
        raise invalid("loras", "'loras' is a list of {\"name\": ..., \"scale\": ...}")
    seen: set[str] = set()
    for index, item in enumerate(value):
        param = f"loras[{index}]"
        if not isinstance(item, dict):
            raise invalid(param, f"'{param}' is an object: {{\"name\": ..., \"scale\": ...}}")
        name = item.get("name")
        if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_LORA_NAME \
                or not name.isprintable():
            raise invalid(f"{param}.name", f"'{param}.name' is the adapter's name, 1 to "
                                           f"{MAX_LORA_NAME} printable characters")
        name = name.strip()
        if name in seen:
            raise invalid(f"{param}.name", f"the LoRA adapter {name!r} is named twice")
        seen.add(name)
        yield name, _scale(item.get("scale", 1.0), f"{param}.scale")


def _scale(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or abs(value) > MAX_LORA_SCALE:
        raise invalid(param, f"'{param}' is a number from {-MAX_LORA_SCALE:g} to "
                             f"{MAX_LORA_SCALE:g}")
    return float(value)


def _tag_scale(text: str | None, name: str) -> float:
    if text is None:
        return 1.0
    try:
        return _scale(float(text), "prompt")
    except ValueError:
        raise invalid("prompt", f"<lora:{name}:{text}> has a scale that is not a "
                                f"number") from None


def check_available(status: ClusterStatus | None, model: str,
                    uses: tuple[LoraUse, ...]) -> None:
    """Refuse adapters no ready worker of ``model`` has, or a set none has whole."""
    if not uses or status is None:
        return  # without a status the broker decides (it refuses what no worker can run)
    workers = status.served_models().get(model, [])
    sets = [set(_announced(worker)) for worker in workers]
    known = set().union(*sets) if sets else set()
    missing = [name for name, _ in uses if name not in known]
    if missing:
        raise invalid("loras", f"no worker of {model} has the LoRA adapter"
                               f"{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(repr, missing))}; GET /v1/loras lists those "
                               f"it has", "lora_not_found")
    wanted = {name for name, _ in uses}
    if not any(wanted <= held for held in sets):
        raise invalid("loras", f"no single worker of {model} has all of "
                               f"{', '.join(sorted(wanted))}: use fewer at once, or give "
                               f"them all to one worker (--lora-dir, --lora-repo)")


def _announced(worker: dict[str, Any]) -> dict[str, Any]:
    loras = worker.get("loras")
    return loras if isinstance(loras, dict) else {}


def listing(status: ClusterStatus) -> dict[str, Any]:
    """GET /v1/loras: every adapter some ready worker can apply, with its models."""
    found: dict[str, dict[str, Any]] = {}
    for model, workers in sorted(status.served_models().items()):
        for worker in workers:
            for name, info in _announced(worker).items():
                entry = found.setdefault(name, {"id": name, "object": "lora", "models": [],
                                                "workers": 0, "loaded_on": 0})
                if model not in entry["models"]:
                    entry["models"].append(model)
                entry["workers"] += 1
                if isinstance(info, dict):
                    entry["loaded_on"] += bool(info.get("loaded"))
                    if isinstance(info.get("bytes"), int):
                        entry["bytes"] = info["bytes"]
    return {"object": "list", "data": [found[name] for name in sorted(found)]}


def of_model(status: ClusterStatus, model: str) -> list[str]:
    """The adapters some ready worker of ``model`` can apply (for /v1/models)."""
    return sorted({name for worker in status.served_models().get(model, [])
                   for name in _announced(worker)})
