"""`meshcloud kit new/show`, `image show` and `flash --check` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner

from meshcloud.cli import main


def test_kit_new_prints_the_secrets_once_and_show_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # argon2 at full cost takes seconds per hash on a busy machine; the kit tests check it.
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr("meshcloud.images.kit.PasswordHasher", lambda: cheap)
    runner = CliRunner()
    out = tmp_path / "kit"
    result = runner.invoke(
        main, ["kit", "new", "--cluster", "relief", "--racks", "rack-1,rack-2", "--sites", "north",
               "--out", str(out), "--codes-out", str(tmp_path / "codes.txt")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PRINT OR WRITE THIS DOWN NOW" in result.output
    password = result.output.split("password ")[1].split()[0]
    assert len(password) == 23
    assert password in (tmp_path / "codes.txt").read_text()
    shown = runner.invoke(main, ["kit", "show", str(out)])
    assert shown.exit_code == 0
    assert "rack-2" in shown.output and password not in shown.output
    again = runner.invoke(
        main, ["kit", "new", "--cluster", "relief", "--racks", "rack-1", "--out", str(out)]
    )
    assert again.exit_code == 1 and "never overwritten" in again.output


def test_kit_new_refuses_bad_names(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["kit", "new", "--cluster", "relief", "--racks", "rack-1,Rack<2>",
               "--out", str(tmp_path / "k")],
    )  # fmt: skip
    assert result.exit_code == 1 and "rack name" in result.output
    assert not (tmp_path / "k").exists()


def test_image_show(tmp_path: Path) -> None:
    manifest = {"image": "rack-os.img", "sha256": "ab" * 32, "bytes": 1, "mapped_bytes": 1,
                "packages": {"rsync": "1"}, "wheels": ["meshcloud-0.1.0-py3-none-any.whl"]}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["image", "show", str(tmp_path)])
    assert (
        result.exit_code == 0
        and "ab" * 32 in result.output
        and "1 Debian packages" in result.output
    )


def test_flash_needs_a_kit_and_a_bmap(tmp_path: Path) -> None:
    image = tmp_path / "rack-os.img"
    image.write_bytes(b"\0" * 4096)
    result = CliRunner().invoke(
        main, ["flash", str(image), "/dev/null", "--rack", "rack-1", "--kit", str(tmp_path)]
    )
    assert result.exit_code == 1 and "not a kit" in result.output
