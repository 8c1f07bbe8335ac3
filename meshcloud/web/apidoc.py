"""docs/api.md from the OpenAPI document: ``python -m meshcloud.web.apidoc [--check]``.

:func:`render_api_doc` is pure (a parsed OpenAPI 3.0 document in, Markdown
out); ``main`` reads ``meshcloud/web/openapi.yaml`` and writes (or, with
``--check``, compares) ``docs/api.md``. ``tests/unit/web/test_apidoc.py``
fails when docs/api.md is out of date.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

METHODS = ("get", "put", "post", "delete", "patch")
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "api.md"
HEADER = (
    "<!-- Generated from docs/api/openapi.yaml by `python -m meshcloud.web.apidoc`:"
    " do not edit by hand; tests/unit/web/test_apidoc.py fails when it is out of date. -->\n"
)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no bare pipes)."""
    return " ".join(text.split()).replace("|", "\\|")


def type_text(schema: dict[str, Any]) -> str:
    """A short type: ``string``, ``array of [Disk](#disk)``, ``one of A, B``."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{name.lower()})"
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return "one of " + ", ".join(type_text(s) for s in schema[key])
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"array of {type_text(schema.get('items', {}))}"
    if kind == "object" and "properties" not in schema:
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return f"map of {type_text(extra)}"
    return kind


def constraint_text(schema: dict[str, Any]) -> str:
    """Limits and notes of one field: enum, bounds, pattern, nullable, description."""
    notes = []
    if "enum" in schema:
        notes.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤")):
        if key in schema:
            notes.append(f"{label} {schema[key]}")
    if "minLength" in schema or "maxLength" in schema:
        notes.append(f"length {schema.get('minLength', 0)}-{schema.get('maxLength', '…')}")
    if "maxItems" in schema:
        notes.append(f"at most {schema['maxItems']} items")
    if "pattern" in schema:
        notes.append(f"pattern `{schema['pattern']}`")
    if schema.get("nullable"):
        notes.append("may be null")
    if "default" in schema:
        notes.append(f"default `{schema['default']}`")
    if "description" in schema:
        notes.append(str(schema["description"]))
    return _cell("; ".join(notes))


def _properties_table(schema: dict[str, Any], prefix: str = "") -> list[str]:
    rows = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        rows.append(
            f"| `{prefix}{name}` | {type_text(prop)} | {'yes' if name in required else ''}"
            f" | {constraint_text(prop)} |"
        )
        if prop.get("type") == "object" and "properties" in prop:
            rows += _properties_table(prop, f"{prefix}{name}.")
        items = prop.get("items", {})
        if prop.get("type") == "array" and items.get("type") == "object" and "properties" in items:
            rows += _properties_table(items, f"{prefix}{name}[].")
    return rows


def schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if "description" in schema:
        lines += [" ".join(str(schema["description"]).split()), ""]
    variants = schema.get("oneOf") or schema.get("anyOf")
    if variants:
        lines += ["One of:", ""]
        for i, variant in enumerate(variants, 1):
            lines.append(f"{i}. {type_text(variant)}" if "$ref" in variant else f"{i}. an object:")
            if "properties" in variant:
                lines += ["", "   | field | type | required | notes |", "   |---|---|---|---|"]
                lines += [f"   {row}" for row in _properties_table(variant)]
                lines.append("")
        return [*lines, ""]
    if "properties" in schema:
        lines += ["| field | type | required | notes |", "|---|---|---|---|"]
        lines += _properties_table(schema)
        if schema.get("additionalProperties") is False:
            lines += ["", "No other fields are accepted."]
    else:
        notes = constraint_text(schema)
        lines.append(f"{type_text(schema)}" + (f": {notes}" if notes else ""))
    return [*lines, ""]


def _resolve(node: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _body_schema(node: dict[str, Any]) -> dict[str, Any] | None:
    content = node.get("content", {})
    for media in ("application/json", "text/event-stream", "text/plain"):
        if media in content:
            schema: dict[str, Any] = content[media].get("schema", {"type": media})
            return schema
    return None


def operation_section(path: str, method: str, op: dict[str, Any], spec: dict[str, Any],
                      path_params: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    lines = [f"### `{method.upper()} {path}`", "", str(op.get("summary", "")).strip(), ""]
    if "description" in op:
        lines += [" ".join(str(op["description"]).split()), ""]
    if op.get("security") == []:
        lines += ["No authentication.", ""]
    params = [_resolve(p, spec) for p in [*path_params, *op.get("parameters", [])]]
    if params:
        lines += ["| parameter | in | type | notes |", "|---|---|---|---|"]
        for p in params:
            notes = _cell(str(p.get("description", "")))
            lines.append(
                f"| `{p['name']}` | {p['in']} | {type_text(p.get('schema', {}))} | {notes} |"
            )
        lines.append("")
    if "requestBody" in op:
        body = _resolve(op["requestBody"], spec)
        schema = _body_schema(body)
        need = "required" if body.get("required") else "optional"
        if schema is not None:
            lines += [f"Request body ({need}): {type_text(schema)}", ""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in op.get("responses", {}).items():
        resolved = _resolve(response, spec)
        answer = _body_schema(resolved)
        shape = type_text(answer) if answer is not None else ""
        if answer is not None and answer.get("type") == "object" and "properties" in answer:
            shape = "object: " + ", ".join(f"`{k}`" for k in answer["properties"])
        lines.append(f"| {status} | {_cell(str(resolved.get('description', '')))} | {shape} |")
    return [*lines, ""]


def render_api_doc(spec: dict[str, Any]) -> str:
    """The Markdown reference for an OpenAPI 3.0 document (pure)."""
    info = spec.get("info", {})
    lines = [HEADER, f"# {info.get('title', 'API')} (version {info.get('version', '?')})", ""]
    lines += [str(info.get("description", "")).strip(), ""]
    schemes = spec.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += ["## Authentication", ""]
        for name, scheme in schemes.items():
            where = (
                f"HTTP `{scheme.get('scheme')}`"
                if scheme.get("type") == "http"
                else f"{scheme.get('type')} `{scheme.get('name')}` in the {scheme.get('in')}"
            )
            lines.append(f"- `{name}`: {where}")
        lines.append("")
    lines += ["## Endpoints", "", "| method | path | what |", "|---|---|---|"]
    operations = []
    for path, item in spec.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                operations.append((path, method, item[method], item.get("parameters", [])))
                anchor = f"{method} {path}".lower()
                anchor = "".join(c for c in anchor if c.isalnum() or c in " -_").replace(" ", "-")
                lines.append(
                    f"| {method.upper()} | [`{path}`](#{anchor}) |"
                    f" {_cell(str(item[method].get('summary', '')))} |"
                )
    lines.append("")
    for path, method, op, path_params in operations:
        lines += operation_section(path, method, op, spec, path_params)
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["## Schemas", ""]
        for name, schema in schemas.items():
            lines += schema_section(name, schema)
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def load_spec() -> dict[str, Any]:
    """The OpenAPI document shipped with the package."""
    data: dict[str, Any] = yaml.safe_load(
        resources.files("meshcloud.web").joinpath("openapi.yaml").read_text()
    )
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.web.apidoc")
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is out of date")
    parser.add_argument("--out", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = render_api_doc(load_spec())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m meshcloud.web.apidoc", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
