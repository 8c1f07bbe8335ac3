"""Every setting and every CLI command is documented: a new one without a line in the docs fails here.

A setting counts as documented only by a row of the table in
docs/configuration.md (``| `key` | default | meaning |``), a command only by a
row of docs/cli.md naming it whole (``| `meshcloud rack drain NAME` | ... |``):
a mention in prose, or a longer command that starts with the same words
(``meshcloud lab add-rack`` for ``meshcloud lab add``), does not count. The
tests at the end feed a missing key and a missing command to the checks to
show that they fail.
"""

import re
import types
import typing
from pathlib import Path

import click
from pydantic import BaseModel

from meshcloud.config import DaemonConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``Sub``, ``Sub | None``, ``Optional[Sub]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        models = _models_in(field.annotation)
        if models:
            for sub in models:
                keys += config_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def documented_settings(text: str) -> set[str]:
    """The keys that have a row of their own in a settings table."""
    return set(re.findall(r"^\|\s*`([^`]+)`\s*\|", text, re.MULTILINE))


def undocumented_settings(keys: list[str], text: str) -> list[str]:
    rows = documented_settings(text)
    return [k for k in keys if k not in rows]


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = config_keys(DaemonConfig)
    assert len(keys) > 20
    missing = undocumented_settings(keys, text)
    assert not missing, f"document these keys in docs/configuration.md: {missing}"


def cli_commands(root: click.Command | None = None) -> list[str]:
    from meshcloud.cli import main

    found: list[str] = []
    ctx = click.Context(main)

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):  # the public API: lazy groups load here
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name])
        else:
            found.append(" ".join(path))

    walk(root or main, ["meshcloud"])
    return found


def undocumented_commands(commands: list[str], text: str) -> list[str]:
    """Commands without a table row that names them whole (then arguments, or nothing)."""
    rows = re.findall(r"^\|\s*`(meshcloud[^`]*)`", text, re.MULTILINE)
    return [c for c in commands if not any(r == c or r.startswith(c + " ") for r in rows)]


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = cli_commands()
    assert len(commands) > 20
    missing = undocumented_commands(commands, text)
    assert not missing, f"document these commands in docs/cli.md: {missing}"


# -- the checks fail when something is missing --------------------------------------


class _Inner(BaseModel):
    depth_s: float = 1.0


class _Fake(BaseModel):
    name: str = "x"
    inner: _Inner = _Inner()
    maybe: _Inner | None = None


def test_a_missing_setting_is_reported() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = [*config_keys(DaemonConfig), "rack.frobnicate_s"]
    assert undocumented_settings(keys, text) == ["rack.frobnicate_s"]


def test_a_setting_named_only_in_prose_is_not_documented() -> None:
    text = "Set `rack.frobnicate_s` to 3.\n\n| `rack.name` | (required) | the name |\n"
    assert undocumented_settings(["rack.name", "rack.frobnicate_s"], text) == ["rack.frobnicate_s"]


def test_keys_of_nested_and_optional_sections_are_listed() -> None:
    assert config_keys(_Fake) == ["name", "inner.depth_s", "maybe.depth_s"]


def test_a_missing_command_is_reported() -> None:
    text = (DOCS / "cli.md").read_text()
    group = click.Group("meshcloud", commands={"frobnicate": click.Command("frobnicate")})
    assert undocumented_commands(cli_commands(group), text) == ["meshcloud frobnicate"]


def test_a_command_is_not_documented_by_a_longer_one_or_by_prose() -> None:
    text = "Run `meshcloud lab add` first.\n\n| `meshcloud lab add-rack` | adds a rack |\n"
    assert undocumented_commands(["meshcloud lab add", "meshcloud lab add-rack"], text) == [
        "meshcloud lab add"
    ]
    text += "| `meshcloud lab add NAME` | adds |\n"
    assert undocumented_commands(["meshcloud lab add"], text) == []
