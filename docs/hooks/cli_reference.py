"""MkDocs hook: the CLI reference page is generated from the typer app itself at build time, never written by hand.

typer's own Markdown generator (`typer ... utils docs`) renders `flows.cli.app`; this hook puts its output where
docs/cli.md has the marker below. (mkdocs-click cannot read it: typer vendors its own click, whose options are not
`click.Option`s.)
"""

from __future__ import annotations

MARKER = "<!-- generated: lowrank CLI -->"


def on_page_markdown(markdown: str, page, **_) -> str:
    if MARKER not in markdown:
        return markdown
    import typer
    import typer.main
    from typer.cli import get_docs_for_click

    from flows.cli import app

    command = typer.main.get_command(app)
    generated = get_docs_for_click(obj=command, ctx=typer.Context(command), indent=1, name="lowrank")
    return markdown.replace(MARKER, generated)
