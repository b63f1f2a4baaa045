"""The OpenAPI helper accepts what the spec allows and rejects, clearly, what it does not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests import openapi_spec
from tests.openapi_spec import SpecValidationError, rewrite_nullable, validate

TESTS = Path(__file__).resolve().parent
SCHEMA_NAMED = re.compile(r"""(?:validate|is_valid|checked)\([^()]*?,\s*["']([A-Z]\w+)["']""")
# Spelled in pieces so that this file does not match itself.
_SHARED = "sha" + "red"
OUTSIDE_THE_CHECKOUT = [
    re.compile(r"\.\./" + _SHARED + r"\b"),  # a path that climbs out of the checkout
    re.compile(r"""["']""" + _SHARED + r"""["'/]"""),  # REPO.parent / "<that folder>"
]

GOOD_IMAGES = {"created": 1_700_000_000, "data": [{"b64_json": "aGk="}],
               "output_format": "png", "size": "1024x1024", "quality": "high",
               "background": "opaque",
               # Extensions: the spec leaves objects open.
               "model": "tiny", "steps": 4}
GOOD_ERROR = {"error": {"message": "bad", "type": "invalid_request_error", "param": "n",
                        "code": None}}
GOOD_MODELS = {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                           "owned_by": "diffusion-cluster"}]}


@pytest.mark.parametrize(("instance", "schema"), [
    (GOOD_IMAGES, "ImagesResponse"),
    ({"created": 0}, "ImagesResponse"),
    (GOOD_ERROR, "ErrorResponse"),
    ({"error": {"message": "m", "type": "t", "param": None, "code": "c"}}, "ErrorResponse"),
    (GOOD_MODELS, "ListModelsResponse"),
    ({"object": "list", "data": []}, "ListModelsResponse"),
    ({"prompt": "an otter"}, "CreateImageRequest"),
    # nullable: true fields take null; partial_images spells it as anyOf with null.
    ({"prompt": "x", "n": None, "model": None, "size": None, "quality": None,
      "output_compression": None, "stream": None, "partial_images": None}, "CreateImageRequest"),
    ({"prompt": "x", "n": 10, "size": "1536x864", "partial_images": 3}, "CreateImageRequest"),
])
def test_accepts_valid_instances(instance, schema):
    validate(instance, schema)
    assert openapi_spec.is_valid(instance, schema)


@pytest.mark.parametrize(("instance", "schema", "fragment"), [
    ({**GOOD_IMAGES, "output_format": "gif"}, "ImagesResponse", "['output_format']: 'gif'"),
    ({**GOOD_IMAGES, "size": "256x256"}, "ImagesResponse", "['size']: '256x256'"),
    ({**GOOD_IMAGES, "quality": "hd"}, "ImagesResponse", "['quality']"),
    ({"data": []}, "ImagesResponse", "'created' is a required property"),
    ({"created": 1, "data": [{"b64_json": 3}]}, "ImagesResponse", "['data'][0]['b64_json']"),
    ({"error": {"message": "m", "type": "t", "code": None}}, "ErrorResponse",
     "'param' is a required property"),
    ({"error": {"message": "m", "type": "t", "param": 3, "code": None}}, "ErrorResponse",
     "['error']['param']"),
    ({"message": "m"}, "ErrorResponse", "'error' is a required property"),
    ({"object": "list", "data": [{"id": "x", "object": "model", "created": 0}]},
     "ListModelsResponse", "'owned_by' is a required property"),
    ({"object": "dict", "data": []}, "ListModelsResponse", "['object']"),
    ({"prompt": "x", "n": 0}, "CreateImageRequest", "['n']: 0 is less than the minimum of 1"),
    ({"prompt": "x", "user": None}, "CreateImageRequest", "['user']"),  # not nullable
    ({"prompt": "x", "partial_images": 4}, "CreateImageRequest", "['partial_images']"),
    ({"n": 1}, "CreateImageRequest", "'prompt' is a required property"),
])
def test_rejects_invalid_instances_naming_the_field(instance, schema, fragment):
    with pytest.raises(SpecValidationError) as info:
        validate(instance, schema)
    message = str(info.value)
    assert f"does not match {schema}" in message
    assert fragment in message
    assert info.value.errors
    assert not openapi_spec.is_valid(instance, schema)


def test_rejection_is_an_assertion_error_listing_every_violation():
    bad = {"created": "now", "output_format": "gif", "size": "1x1"}
    with pytest.raises(AssertionError) as info:
        validate(bad, "ImagesResponse")
    assert "3 error(s)" in str(info.value)


def test_unknown_schema_name_is_a_key_error_listing_the_names():
    with pytest.raises(KeyError, match="ImagesResponse"):
        validate({}, "NoSuchSchema")


def test_refs_resolve_inside_the_spec_document():
    # ImagesResponse -> Image and ErrorResponse -> Error are $refs into the document.
    with pytest.raises(SpecValidationError, match=r"\['data'\]\[0\]\['url'\]"):
        validate({"created": 1, "data": [{"url": 5}]}, "ImagesResponse")


def test_rewrite_nullable_only_touches_the_boolean_keyword():
    schema = {"type": "object", "properties": {
        "a": {"type": "integer", "nullable": True, "minimum": 1},
        "b": {"type": "string", "nullable": False},
        "nullable": {"type": "string"},  # a property that happens to be called nullable
    }}
    out = rewrite_nullable(schema)
    assert out["properties"]["a"] == {"anyOf": [{"type": "integer", "minimum": 1},
                                                {"type": "null"}]}
    assert out["properties"]["b"] == {"type": "string"}
    assert out["properties"]["nullable"] == {"type": "string"}


def test_spec_path_follows_the_environment_override(tmp_path, monkeypatch):
    spec = {"openapi": "3.1.0", "components": {"schemas": {
        "Thing": {"type": "object", "properties": {"x": {"type": "integer", "nullable": True}},
                  "required": ["x"]}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("DCTEST_OPENAPI_SPEC", str(path))
    assert openapi_spec.spec_path() == path
    validate({"x": None}, "Thing")
    with pytest.raises(SpecValidationError):
        validate({"x": "1"}, "Thing")
    validate({"x": 2}, "Thing", path=path)
    monkeypatch.delenv("DCTEST_OPENAPI_SPEC")
    assert openapi_spec.spec_path() == openapi_spec.SPEC_FILE


def test_the_spec_is_the_repositorys_own_copy(monkeypatch):
    # A fresh clone passes alone: nothing beside the checkout is needed.
    monkeypatch.delenv("DCTEST_OPENAPI_SPEC", raising=False)
    path = openapi_spec.spec_path()
    assert path.is_file()
    assert path.resolve().is_relative_to(TESTS)
    assert "openai-openapi" in path.read_text(encoding="utf-8").split("\nopenapi:", 1)[0]
    document = openapi_spec.load_spec()
    assert {"/images/generations", "/models"} <= set(document["paths"])


def test_every_schema_the_tests_name_is_in_the_copy():
    named = set()
    for source in TESTS.rglob("*.py"):
        named |= set(SCHEMA_NAMED.findall(source.read_text(encoding="utf-8")))
    named -= {"NoSuchSchema", "Thing"}  # this file's own made-up names
    assert {"ImagesResponse", "ErrorResponse", "CreateImageRequest"} <= named
    missing = named - set(openapi_spec.load_spec()["components"]["schemas"])
    assert not missing, f"schemas the tests validate against but the copy lacks: {missing}"


def test_no_test_reads_files_beside_the_checkout():
    # The folder beside the checkout exists on the project's machines but not in a clone; a
    # test that reads it passes there and fails everywhere else.
    offenders = []
    for source in sorted(TESTS.rglob("*")):
        if not source.is_file() or source.suffix not in (".py", ".cfg", ".ini", ".toml", ".txt"):
            continue
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if any(pattern.search(line) for pattern in OUTSIDE_THE_CHECKOUT):
                offenders.append(f"{source.relative_to(TESTS.parent)}:{number}: {line.strip()}")
    assert not offenders, "tests reading outside the repository:\n" + "\n".join(offenders)
