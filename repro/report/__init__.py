"""Renderers: one module per output format, each only reading a Report.

Every file renderer has the same signature, `render(report, out)`; `RENDERERS` names them:

- ``markdown``: report.md, a GitHub issue body (`repro.report.markdown`);
- ``json``: report.json, the versioned, loadable record (`repro.report.json_report`);
- ``terminal``: the terminal summary as plain text (`repro.report.terminal`; `render_terminal` prints it).

The activity picture is drawn from the watchdog's samples, which are not part of the Report, by
`repro.report.timeline.render_activity`; the report then points at it (`Report.activity_plot`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from repro.records import Report
from repro.report import json_report, markdown, terminal
from repro.report.json_report import load_report, schema
from repro.report.markdown import render_markdown
from repro.report.terminal import render_terminal
from repro.report.timeline import render_activity


class Renderer(Protocol):
    """Writes one output format of a report to `out`. Never collects, never runs anything."""

    def __call__(self, report: Report, out: Path) -> None: ...


RENDERERS: Mapping[str, Renderer] = MappingProxyType(
    {
        "markdown": markdown.render,
        "json": json_report.render,
        "terminal": terminal.render,
    }
)

__all__ = [
    "RENDERERS",
    "Renderer",
    "load_report",
    "render_activity",
    "render_markdown",
    "render_terminal",
    "schema",
]
