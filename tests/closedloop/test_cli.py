import subprocess
import sys

import pytest

from closedloop.cli import cli


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "closedloop", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_help_lists_every_subcommand():
    result = _run("--help")
    assert result.returncode == 0
    for name in cli.commands:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_subcommand_has_help(name):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    assert _run("init", str(tmp_path)).returncode == 0
    result = _run("init", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "already exists" in result.stderr

    result = _run("init", str(tmp_path / "x"), "--preset", "huge")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "'huge' is not one of 'paper', 'demo'" in result.stderr

    result = _run("no-such-command")
    assert result.returncode == 2 and "No such command 'no-such-command'" in result.stderr


def test_config_error_is_reported_with_its_key(tmp_path):
    (tmp_path / "experiment.toml").write_text("[attack]\nsteps = -1\n")
    result = _run("check-model", "--experiment", str(tmp_path))
    assert result.returncode == 2
    assert "'attack.steps' = -1" in result.stderr and result.stderr.strip().count("\n") == 0
