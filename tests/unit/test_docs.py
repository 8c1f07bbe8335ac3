"""Every setting is documented: a new key without a line in the docs fails here."""

from pathlib import Path

from pydantic import BaseModel

from meshcloud.config import DaemonConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += config_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = config_keys(DaemonConfig)
    assert len(keys) > 20
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"document these keys in docs/configuration.md: {missing}"


def cli_commands() -> list[str]:
    import click

    from meshcloud.cli import main

    found: list[str] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])
        else:
            found.append(" ".join(path))

    walk(main, ["meshcloud"])
    return found


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = cli_commands()
    assert len(commands) > 20
    missing = [c for c in commands if f"`{c}" not in text]
    assert not missing, f"document these commands in docs/cli.md: {missing}"
