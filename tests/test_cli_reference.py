"""docs/CLI.md is the command-line reference Typer generates from the commands' own help: a
page that a change to a command's options or help leaves stale fails here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TITLE = "Command-line reference (generated: typer hfedmoe.cli utils docs)"


def test_the_cli_reference_is_current(tmp_path):
    out = tmp_path / "CLI.md"
    typer = Path(sys.executable).with_name("typer")
    command = [str(typer), "hfedmoe.cli", "utils", "docs", "--name", "hfedmoe"]
    subprocess.run([*command, "--title", TITLE, "--output", str(out)], check=True, timeout=120)
    assert out.read_text() == (REPO / "docs" / "CLI.md").read_text(), (
        "docs/CLI.md is stale: regenerate it with "
        f"`.venv/bin/typer hfedmoe.cli utils docs --name hfedmoe --title '{TITLE}' "
        "--output docs/CLI.md`"
    )


def test_no_help_text_loses_a_bracketed_word_to_rich_markup():
    # rich reads "[report]" as a style tag and prints nothing: help must write "\[report]"
    import click
    import typer

    from hfedmoe.cli import app

    unescaped = re.compile(r"(?<!\\)\[[a-z][a-z_.]*\]")
    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    found = []
    for name, command in root.commands.items():
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        found += [f"{name}: {m}" for text in texts for m in unescaped.findall(text)]
    assert not found, found
