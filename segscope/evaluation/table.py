"""Plain-text tables for metric summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 2) -> str:
    """Align ``rows`` under ``header``: text left-aligned, numbers right-aligned.

    Floats are printed with ``digits`` decimals and NaN as ``nan``; the first column is the
    row label and is separated from the numbers by ``|``.
    """
    cells = [[_cell(v, digits) for v in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(row[i]) for row in cells)) if cells else len(str(h))
        for i, h in enumerate(header)
    ]

    def line(values: Sequence[str], numeric: bool) -> str:
        label = values[0].ljust(widths[0])
        rest = [
            v.rjust(w) if numeric else v.center(w) for v, w in zip(values[1:], widths[1:])
        ]
        return (f"{label} | " + "  ".join(rest)).rstrip()

    out = [line([str(h) for h in header], numeric=False)]
    out.append("-" * len(out[0]))
    out.extend(line(row, numeric=True) for row in cells)
    return "\n".join(out)


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
