"""The report stage's part of the run document (``stages.report``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from policysearch.rundoc import Stage, register_stage

__all__ = ["ReportStage"]


@register_stage
@dataclass(kw_only=True)
class ReportStage(Stage):
    """Where the HTML report and its figures were written, and what it could not show."""

    name: ClassVar[str] = "report"
    file: str | None = None
    figures: list[str] | None = None
    answer_trial: int | None = None
    missing: list[str] | None = None
