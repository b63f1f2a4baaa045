"""Which model a name means, whether it exists, and the limits its requests are held to.

The one place the frontend answers these, for every route. Two sources, in this order:

1. What the workers announced (READY's ``models`` and ``model_info``, relayed in the broker's
   STATUS_REPLY): a worker knows the pipeline it loaded, wherever its files are.
2. The registry (``gpu_worker.models``, plain data without torch): aliases, families, and
   limits no announcement may widen (``limits`` checks and narrows what workers say).

A model neither knows gets generic defaults. Nothing here reads the frontend's own disk: a
directory a worker loads need not exist on this host (``models.resolve``, which reads its
``model_index.json``, is the worker's).
"""

from __future__ import annotations

from gpu_worker import models
from gpu_worker.models import ModelSpec
from http_frontend import limits
from http_frontend.broker_client import ClusterStatus

# OpenAI's own image models. Clients written for OpenAI (Open WebUI, LangChain, the SDKs'
# examples) send these names; they mean "the cluster's default model" unless the operator
# aliased them (--model-alias).
OPENAI_NAMES = ("dall-e-2", "dall-e-3")
OPENAI_PREFIXES = ("gpt-image-", "chatgpt-image-")
DALL_E_NAMES = ("dall-e-2", "dall-e-3")  # answer url when no response_format is sent


def is_openai_name(name: str) -> bool:
    """Whether ``name`` is one of OpenAI's image models (``dall-e-3``, ``gpt-image-1``, ...)."""
    return name in OPENAI_NAMES or name.startswith(OPENAI_PREFIXES)


def parse_alias(text: str) -> tuple[str, str]:
    """``NAME=MODEL`` (--model-alias) as a pair; ValueError says what is wrong."""
    name, sep, model = text.partition("=")
    if not sep or not name.strip() or not model.strip():
        raise ValueError(f"--model-alias takes NAME=MODEL, not {text!r}")
    return name.strip(), model.strip()


def canonical_name(name: str) -> str:
    """The name a model is routed under: its registry alias when it has one."""
    return models.canonical_name(name)


def spec_for(status: ClusterStatus | None, name: str) -> ModelSpec:
    """The defaults and limits to hold requests for ``name`` to."""
    spec = limits.apply_announcements(models.lookup(name), status, name)
    return spec if spec is not None else models.generic(name)


def announced_models(status: ClusterStatus | None) -> list[str]:
    """Every model some worker announced, ready or not, sorted."""
    names: set[str] = set()
    for worker in status.workers if status is not None else ():
        announced = worker.get("models") if isinstance(worker, dict) else None
        if isinstance(announced, list):
            names.update(m for m in announced if isinstance(m, str))
    return sorted(names)


def is_known(status: ClusterStatus | None, name: str) -> bool:
    """Whether ``name`` exists: announced by a worker or in the registry. A known model no
    worker serves is a 503; an unknown one a 404."""
    return name in announced_models(status) or models.lookup(name) is not None
