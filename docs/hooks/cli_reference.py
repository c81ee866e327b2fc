"""MkDocs hook: the CLI reference is generated from the typer app itself, not written by hand.

mkdocs-click renders a click command named by module and attribute; typer builds that command from
`flows.cli.app`. MkDocs loads a hook under its file path, so the module is also registered under a plain
name that the `::: mkdocs-click` block in docs/cli.md can import.
"""

from __future__ import annotations

import sys

import typer.main

from flows.cli import app

command = typer.main.get_command(app)
sys.modules["cli_reference"] = sys.modules[__name__]
