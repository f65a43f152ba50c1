"""The report of `sdelang check`: a table (one row per check and a summary line) or one JSON object."""
from __future__ import annotations

import json
import math

from ..text import table
from .common import FAIL, NA, OK, WARN, CheckResult


def passed(results: list[CheckResult]) -> bool:
    """True unless a check failed (warnings and n/a do not fail)."""
    return all(r.status != FAIL for r in results)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_table(results: list[CheckResult]) -> str:
    """The report: one row per check (check | result | measured | tolerance | note) and a summary line."""
    rows = [("check", "result", "measured", "tolerance", "note")]
    rows += [(r.name, r.status, _number(r.measured), _number(r.tolerance), r.note) for r in results]
    counts = {status: sum(r.status == status for r in results) for status in (OK, WARN, NA, FAIL)}
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    verdict = "passed" if passed(results) else "FAILED"
    return f"{table(rows)}\n{verdict}: {summary}"


def _json_number(value: float | None):
    """JSON has no inf or nan: they become the strings "inf", "-inf" and "nan"."""
    return value if value is None or math.isfinite(value) else str(value)


def to_json(results: list[CheckResult]) -> str:
    """{"ok": bool, "checks": [{"name", "status", "measured", "tolerance", "note"}, ...]}"""
    checks = [dict(r._asdict(), measured=_json_number(r.measured), tolerance=_json_number(r.tolerance))
              for r in results]
    return json.dumps({"ok": passed(results), "checks": checks})
