"""report.json: the whole Report, versioned, loadable again (`vdiag report RUN_DIR`).

The format is `Report.model_dump_json(indent=2)`; its JSON Schema is `schema()` (`vdiag report --schema`).
docs/report-schema.md describes the fields and the compatibility rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from repro.errors import ExitCode, VdiagError
from repro.records import REPORT_SCHEMA_VERSION, Report


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def render(report: Report, out: Path) -> None:
    """Write report.json; the file is replaced whole, so a reader never sees half of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def load_report(path: Path) -> Report:
    """Read a report.json back. Raises VdiagError (exit 2) with advice when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VdiagError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE) from exc
    try:
        report = Report.model_validate_json(text)
    except ValidationError as exc:
        found = _declared_version(text)
        if found and _major(found) != _major(REPORT_SCHEMA_VERSION):
            raise _version_error(path, found) from exc
        problems = exc.errors()
        where, msg = "the top level", "invalid"
        if problems:
            where = ".".join(str(p) for p in problems[0]["loc"]) or where
            msg = problems[0]["msg"]
        raise VdiagError(
            f"{path} is not a vdiag report ({exc.error_count()} problems; first at {where}: {msg}). "
            "Regenerate it with `vdiag report RUN_DIR`.",
            ExitCode.USAGE,
        ) from exc
    if _major(report.schema_version) != _major(REPORT_SCHEMA_VERSION):
        raise _version_error(path, report.schema_version)
    return report


def _declared_version(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    version = data.get("schema_version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _version_error(path: Path, found: str) -> VdiagError:
    return VdiagError(
        f"{path} uses report schema {found}; this vdiag reads {REPORT_SCHEMA_VERSION} "
        f"(major versions differ). Open it with the vdiag version that wrote it, or re-run "
        f"`vdiag report RUN_DIR` to rebuild it from the run directory.",
        ExitCode.USAGE,
    )


def schema() -> dict[str, Any]:
    """The JSON Schema of report.json, stamped with its version."""
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "x-report-schema-version": REPORT_SCHEMA_VERSION,
    }
    out.update(Report.model_json_schema())
    return out
