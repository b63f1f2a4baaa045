"""Validate JSON instances against OpenAI's own spec for the Images API.

``validate(instance, "ImagesResponse")`` checks ``instance`` against
``#/components/schemas/ImagesResponse`` of ``tests/data/openai-images-openapi.yaml`` (the subset
of OpenAI's openai-openapi spec that the tests use, kept in the repository so a clone alone
passes; ``DCTEST_OPENAPI_SPEC`` names another file) with a Draft 2020-12 validator, and raises
``SpecValidationError`` listing every violation.

The spec is OpenAPI 3.1, which is JSON Schema 2020-12 except for OpenAPI 3.0's ``nullable: true``
that this extract still uses: each schema carrying it is rewritten to
``{"anyOf": [<the schema without nullable>, {"type": "null"}]}`` before validation, so null is
accepted where the spec allows it and nowhere else.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_FILE = Path(__file__).resolve().parent / "data" / "openai-images-openapi.yaml"
SPEC_URI = "urn:diffusion-cluster:openai-images-openapi"
_MAX_LISTED = 20


class SpecValidationError(AssertionError):
    """An instance that does not match its schema in the OpenAPI spec."""

    def __init__(self, schema_name: str, errors: list[jsonschema.ValidationError]) -> None:
        self.schema_name = schema_name
        self.errors = errors
        lines = [_describe(e) for e in errors[:_MAX_LISTED]]
        if len(errors) > _MAX_LISTED:
            lines.append(f"... and {len(errors) - _MAX_LISTED} more")
        super().__init__(f"instance does not match {schema_name} in the OpenAPI spec "
                         f"({len(errors)} error(s)):\n  " + "\n  ".join(lines))


def spec_path() -> Path:
    """The spec file: $DCTEST_OPENAPI_SPEC, else the repository's own copy under tests/data/."""
    override = os.environ.get("DCTEST_OPENAPI_SPEC")
    if override:
        return Path(override)
    return SPEC_FILE


def rewrite_nullable(node: Any) -> Any:
    """Turn every OpenAPI 3.0 ``nullable: true`` schema into an anyOf with null."""
    if isinstance(node, list):
        return [rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    # A property *named* nullable maps to a schema (a dict), never to the boolean True.
    nullable = node.get("nullable") is True
    rewritten = {key: rewrite_nullable(value) for key, value in node.items()
                 if not (key == "nullable" and isinstance(value, bool))}
    if nullable:
        return {"anyOf": [rewritten, {"type": "null"}]}
    return rewritten


def load_spec(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The spec document with nullable rewritten; every component schema checked."""
    return _load(str(path or spec_path()))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        document = rewrite_nullable(yaml.safe_load(f))
    for name, schema in document["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"components.schemas.{name} is not a valid schema: "
                             f"{exc.message}") from None
    return document


@functools.lru_cache(maxsize=64)
def _validator(schema_name: str, path: str) -> jsonschema.Draft202012Validator:
    document = _load(path)
    schemas = document["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in the spec; it has: "
                       f"{', '.join(sorted(schemas))}")
    registry = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(document))
    # A $ref into the registered document, so the spec's own '#/components/schemas/X'
    # references resolve against the whole document, not the subschema.
    root = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def validate(instance: Any, schema_name: str, *, path: str | os.PathLike | None = None) -> None:
    """Raise SpecValidationError unless ``instance`` matches the named component schema."""
    validator = _validator(schema_name, str(path or spec_path()))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        raise SpecValidationError(schema_name, errors)


def is_valid(instance: Any, schema_name: str) -> bool:
    try:
        validate(instance, schema_name)
    except SpecValidationError:
        return False
    return True


def _describe(error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(root)"
    if not error.context:
        return f"{where}: {error.message}"
    # An anyOf/oneOf failed: the useful message is in the best-matching branch, and never in
    # the {"type": "null"} branch that rewrite_nullable added.
    branches = [e for e in error.context if e.validator_value != "null"] or error.context
    return f"{where}: {jsonschema.exceptions.best_match(branches).message}"


__all__ = ["SpecValidationError", "is_valid", "load_spec", "rewrite_nullable", "spec_path",
           "validate"]
