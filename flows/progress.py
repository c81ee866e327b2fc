"""The live view of a sweep on stderr: one row per configuration with the stage it is at, and a count of those done."""

from __future__ import annotations

import sys

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lowrank.pipeline.sweep_plan import Configuration, Job, status


class SweepView:
    """A `rich` table redrawn as jobs finish, on a terminal; otherwise (or `enabled=False`) one line per configuration
    as it ends: redrawn frames in a file or a pipe are hundreds of lines, and the last one ends without a line break."""

    def __init__(self, configs: list[Configuration], jobs: dict[str, Job], enabled: bool = True) -> None:
        self.configs, self.jobs = configs, jobs
        console = Console(stderr=True)
        live = enabled and console.is_terminal
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False) if live else None
        self.said: set[int] = set()

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False)
        for column in ("#", "configuration", "stage"):
            table.add_column(column)
        done = 0
        for config in self.configs:
            state = status(config, self.jobs)
            done += state in ("completed", "failed")
            style = {"completed": "green", "failed": "red"}.get(state, "yellow")
            table.add_row(str(config.number), config.label, Text(state, style=style))
        return Group(table, Text(f"{done}/{len(self.configs)} configurations done"))

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            return
        for config in self.configs:
            state = status(config, self.jobs)
            if state in ("completed", "failed") and config.number not in self.said:
                self.said.add(config.number)
                sys.stderr.write(f"configuration {config.number} ({config.label}): {state}\n")

    def __enter__(self) -> "SweepView":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.update()
            self.live.stop()
