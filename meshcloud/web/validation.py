"""Request bodies validated against the OpenAPI file's schemas."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import yaml
from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from meshcloud.core.errors import InvalidInput

SPEC_URI = "urn:meshcloud:openapi"


@cache
def openapi() -> dict[str, Any]:
    """The OpenAPI document shipped with the package (docs/api/openapi.yaml links to it)."""
    text = resources.files("meshcloud.web").joinpath("openapi.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def _nullable_to_type(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` becomes a JSON-Schema type union."""
    if isinstance(node, dict):
        out = {k: _nullable_to_type(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_nullable_to_type(v) for v in node]
    return node


@cache
def validator(schema_name: str) -> Draft202012Validator:
    doc = _nullable_to_type(openapi())
    registry: Registry = Registry().with_resource(SPEC_URI, Resource.opaque(doc))
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=registry)


def validate_body(schema_name: str, body: Any) -> None:
    """Raise InvalidInput naming the first offending field."""
    errors = sorted(validator(schema_name).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.path) or "body"
        message = err.message if len(err.message) < 200 else err.message[:200] + "..."
        raise InvalidInput(f"{where}: {message}")


async def read_json(request: web.Request, schema_name: str) -> Any:
    """The request's JSON body, checked against ``schema_name``."""
    if request.content_type != "application/json":
        raise InvalidInput("send the body as JSON with Content-Type: application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    validate_body(schema_name, body)
    return body
