from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcloud.cli import main
from meshcloud.cli_api import load_specs, table
from meshcloud.core.errors import InvalidInput


def test_table_aligns_columns() -> None:
    out = table(["A", "LONGER"], [["x", 1], ["yyyy", None]])
    assert out.splitlines() == ["A     LONGER", "----  ------", "x     1", "yyyy  -"]


def test_load_specs_reads_lists_and_multiple_documents(tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(
        "- {name: a, image: demo}\n- {name: b, image: demo}\n---\nname: c\nimage: demo\n"
    )
    assert [s.name for s in load_specs(path)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no appliance spec"),
        ("name: 'a<b'\nimage: demo\n", "appliance name"),
        ("[unclosed", "cannot read"),
    ],
)
def test_load_specs_refuses_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=expected):
        load_specs(path)


def test_cli_without_api_says_how_to_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHCLOUD_API", raising=False)
    monkeypatch.delenv("MESHCLOUD_TOKEN", raising=False)
    monkeypatch.setattr("meshcloud.client.DEFAULT_RACK_CONFIG", Path("/nonexistent/daemon.yaml"))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1
    assert "MESHCLOUD_API" in result.output


def test_cli_unreachable_api_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["status", "--api", "http://127.0.0.1:9", "--token", "t"])
    assert result.exit_code == 1
    assert "cannot reach the API" in result.output
