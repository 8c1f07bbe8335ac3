from pathlib import Path

import pytest
from click.testing import CliRunner

from meshcloud.cli import main


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("MESHCLOUD_LAB_ROOT", str(tmp_path))
    return CliRunner()


def test_lab_commands_are_registered(runner: CliRunner) -> None:
    result = runner.invoke(main, ["lab", "--help"])
    assert result.exit_code == 0
    for command in ["up", "down", "status", "kill", "restart", "freeze", "thaw", "partition",
                    "heal", "degrade", "exec"]:  # fmt: skip
        assert f"  {command} " in result.output


def test_status_of_a_lab_that_is_not_up(runner: CliRunner) -> None:
    result = runner.invoke(main, ["lab", "--name", "nolab", "status"])
    assert result.exit_code == 0
    assert "lab nolab: not up" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad;Name", "status"], "lab name"),
        (["--name", "nolab", "kill", "r1"], "not up"),
        (["--name", "nolab", "degrade", "r1", "delay=5"], "unit"),
    ],
)
def test_errors_are_one_clear_line(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(main, ["lab", *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
