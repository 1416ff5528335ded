"""Stage 8 of a day: the day's report page ``report.html`` (:mod:`analysis.day_report`)."""

from __future__ import annotations

from analysis.day_report import write_day_report

__all__ = ["run_stage"]


def run_stage(day) -> dict:
    """Write ``report.html`` into the day folder."""
    path = write_day_report(day.folder)
    return {"report": path.name}
