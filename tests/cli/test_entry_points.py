"""The ways in: the ``substantial`` console script and ``python -m substantial``."""

from __future__ import annotations

import tomllib

import substantial.cli as cli

from .conftest import ROOT


def test_the_console_script_is_the_cli_main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["substantial"] == "substantial.cli:main"
    assert callable(cli.main)
    cli_extra = project["optional-dependencies"]["cli"]
    assert any(dep.startswith("typer") for dep in cli_extra)
    assert any(dep.startswith("rich") for dep in cli_extra)


def test_run_returns_the_exit_code_instead_of_exiting() -> None:
    assert cli.run(["--help"]) == 0
    assert cli.run(["no-such-command"]) == 2
