"""A segment request's options (task, threshold, output) from its query string and form fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from segscope.pipeline import TASKS
from segscope.service.errors import ServiceError

OUTPUTS = ("json", "png")


@dataclass(frozen=True)
class RequestOptions:
    """What a request asked for; None leaves the choice to the server (task) or the task (threshold)."""

    task: str | None
    threshold: float | None
    output: str


def parse_options(query: dict[str, str | None], form: dict[str, str]) -> RequestOptions:
    """Options from ``query`` and ``form`` (a form field fills what the query leaves out).

    Raises:
        ServiceError: 422 for an unknown task or output, or a threshold that is not a number in [0, 1].
    """
    merged = {name: value if value not in (None, "") else form.get(name) for name, value in query.items()}
    task = merged.get("task") or None
    if task is not None and task not in TASKS:
        raise ServiceError(422, "bad_option", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    output = merged.get("output") or "json"
    if output not in OUTPUTS:
        raise ServiceError(422, "bad_option", f"unknown output {output!r}; expected one of {', '.join(OUTPUTS)}")
    return RequestOptions(task, _threshold(merged.get("threshold")), output)


def _threshold(text: str | None) -> float | None:
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ServiceError(422, "bad_option", f"threshold must be a number in [0, 1] (a score), got {text!r}")
    return value
