"""docs/api.md is generated from the OpenAPI document and must stay up to date."""

from __future__ import annotations

from meshcloud.web.apidoc import DOC_PATH, load_spec, render_api_doc, type_text


def test_docs_api_md_is_up_to_date() -> None:
    expected = render_api_doc(load_spec())
    assert DOC_PATH.read_text() == expected, (
        "docs/api.md is out of date with meshcloud/web/openapi.yaml:"
        " run `.venv/bin/python -m meshcloud.web.apidoc` and commit docs/api.md"
    )


def test_every_path_and_schema_is_in_the_doc() -> None:
    spec = load_spec()
    text = render_api_doc(spec)
    for path, item in spec["paths"].items():
        for method in ("get", "put", "post", "delete"):
            if method in item:
                assert f"### `{method.upper()} {path}`" in text
    for name in spec["components"]["schemas"]:
        assert f"\n### {name}\n" in text


def test_type_text_names_references_arrays_and_alternatives() -> None:
    assert type_text({"$ref": "#/components/schemas/Disk"}) == "[Disk](#disk)"
    assert type_text({"type": "array", "items": {"type": "string"}}) == "array of string"
    assert type_text({"oneOf": [{"type": "string"}, {"type": "integer"}]}) == (
        "one of string, integer"
    )
    assert type_text({"type": "object", "additionalProperties": {"type": "number"}}) == (
        "map of number"
    )
