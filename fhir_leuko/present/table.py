"""``--format table`` and ``--format csv``: the rows of :mod:`.rows` as text."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from .rows import COLUMNS, Row

__all__ = ["render_csv", "render_table"]

_GAP = "  "
_MIN = {"patient": 12, "trend": 16, "drug": 12, "profile": 10}
"""Columns that may be shortened (with …) to fit the width, and how far."""


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def render_table(rows: Sequence[Row], width: int = 160) -> str:
    """An aligned text table with a header, at most ``width`` columns wide where it can be.

    The trend, drug, patient and profile columns give way first (cut with …); the finding,
    severity, value and date never do.
    """
    if not rows:
        return ""
    cells = [r.cells() for r in rows]
    widths = [max(len(COLUMNS[i]), *(len(c[i]) for c in cells)) for i in range(len(COLUMNS))]
    total = sum(widths) + len(_GAP) * (len(widths) - 1)
    for name in ("drug", "patient", "profile", "trend"):
        if total <= width:
            break
        i = COLUMNS.index(name)
        spare = widths[i] - max(_MIN[name], len(name))
        take = min(spare, total - width)
        if take > 0:
            widths[i] -= take
            total -= take
    lines = [_GAP.join(h.upper().ljust(w) for h, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines.append(_GAP.join("-" * w for w in widths))
    for row in cells:
        lines.append(
            _GAP.join(_cut(c, w).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(lines) + "\n"


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _safe(cell: str) -> str:
    # A spreadsheet runs a cell that starts like a formula (OWASP "CSV injection"); patient ids
    # and drug names come from the input, so such a cell gets a leading apostrophe.
    return "'" + cell if cell.startswith(_FORMULA) else cell


def render_csv(rows: Sequence[Row]) -> str:
    """RFC 4180 CSV with a header row, the same columns as the table (never cut). A cell that
    starts with ``= + - @`` gets a leading ``'`` so a spreadsheet does not run it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_safe(c) for c in row.cells()])
    return out.getvalue()
