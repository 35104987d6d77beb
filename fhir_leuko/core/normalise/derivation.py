"""Absolute counts derived from WBC x fraction where a blood draw has none.

The ANC is WBC x neutrophil fraction (clozapine prescribing information §5.1: WBC x (segs % +
bands %); clinical.md §4.5). The two must come from one blood draw, and labs report a draw in
more than one way: a CBC report (58410-2) with the WBC and a separate differential report (a manual
differential, 24318-8) with the percentages, or one specimen named by some results and not others.
So two results of one patient are *of one draw* when (profiles/README.md, "Derived counts"):

1. both name a specimen and it is the same one (their times may differ: it is one tube), or
2. they are listed by the same DiagnosticReport or panel (unless they name two different
   specimens), or
3. they were collected at the same instant (``effective[x]``, compared as instants) and at most
   one of them names a specimen. No tolerance: the effective time of a lab result is the time
   the blood was taken, so two draws minutes apart are two specimens, and in the days after
   chemotherapy (or on clozapine) the ANC can fall within hours. A time that is only a date is
   no collection time: results of one date pair this way only when neither names a specimen or
   a report (as results outside any report always have).

Each fraction is the anchor of one derived count: a total fraction of the analyte (770-8 …), or a
segmented neutrophil fraction (26505-8) when no total one is of the same draw, plus the bands of
that draw (never to a total fraction: it already includes them). Neutrophils are also derived from
segmented plus band counts. An anchor with an absolute count of its analyte in the same draw
derives nothing (the measured count is the count). When several WBC counts are of the anchor's
draw, one is chosen, and the derivation says which and why: the one of the same specimen, else of
the same report, else a WBC corrected for nucleated red cells, else the lower (the safer: a missed
low is worse than a noisy one), else by key. Two derived counts of one time (an automated and a
manual differential) are both kept: the lower is graded and both are named (evaluate).

A lower bound (``>``) derives nothing; an upper bound (``<``) derives an upper bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ..model import Analyte, Form, LabResult, Measure
from .results import format_number

__all__ = ["derive", "of_one_draw"]


def _specimen(result: LabResult) -> str:
    return result.group if result.group.startswith("specimen:") else ""


def of_one_draw(a: LabResult, b: LabResult) -> bool:
    """Whether two results of one patient are of one blood draw (module docstring)."""
    specimen_a, specimen_b = _specimen(a), _specimen(b)
    if specimen_a and specimen_b:
        return specimen_a == specimen_b
    if a.report and a.report == b.report:
        return True
    if a.effective != b.effective:
        return False
    # A date is no collection time (two counts of one day are often two draws): results of the
    # same date pair only when neither names a specimen or a report, as they always have.
    timed = "T" in a.effective_text and "T" in b.effective_text
    return timed or not (specimen_a or specimen_b or a.report or b.report)


def _affinity(anchor: LabResult, other: LabResult) -> tuple[bool, bool]:
    """(same specimen, same report): how closely ``other`` belongs with ``anchor``."""
    specimen = _specimen(anchor)
    return (
        bool(specimen) and specimen == _specimen(other),
        bool(anchor.report) and anchor.report == other.report,
    )


def _best(anchor: LabResult, candidates: Iterable[LabResult]) -> tuple[LabResult | None, int]:
    """The candidate of the anchor's draw that belongs best with it, and how many there were."""
    mine = [c for c in candidates if of_one_draw(anchor, c)]
    if not mine:
        return None, 0
    best = min(
        mine,
        key=lambda c: (
            tuple(not x for x in _affinity(anchor, c)),
            not c.corrected,
            c.value,
            c.key,
        ),
    )
    return best, len(mine)


def _why(anchor: LabResult, chosen: LabResult, others: int) -> str:
    same_specimen, same_report = _affinity(anchor, chosen)
    if same_specimen:
        reason = "of the same specimen"
    elif same_report:
        reason = "of the same report"
    elif chosen.corrected:
        reason = "corrected for nucleated red cells"
    else:
        reason = "the lowest"
    return f"; chosen of {others} WBC counts of this draw: {reason}"


def derive(results: list[LabResult], counts: Counter[str]) -> list[LabResult]:
    """Absolute counts derived from one patient's results (module docstring)."""
    count, fraction = Measure.COUNT, Measure.FRACTION
    total, segmented = Form.TOTAL, Form.SEGMENTED
    # Most blood counts are complete: each analyte with a fraction also has its absolute count in
    # the same group (specimen, report or time). Those anchors derive nothing, found in one pass.
    by_group: dict[str, list[LabResult]] = {}
    for result in results:
        members = by_group.get(result.group)
        if members is None:
            by_group[result.group] = [result]
        else:
            members.append(result)
    anchors: list[LabResult] = []
    for members in by_group.values():
        counted = {r.analyte for r in members if r.measure is count and r.form is total}
        anchors.extend(
            r
            for r in members
            if r.analyte not in counted
            and r.analyte is not Analyte.WBC
            and (r.form is total or r.form is segmented)
            and (r.measure is fraction or r.form is segmented)
        )
    if not anchors:
        return []
    draws = _Draws(results)
    derived: list[LabResult] = []
    for analyte in Analyte:
        mine = [a for a in anchors if a.analyte is analyte]
        totals = [a for a in mine if a.measure is fraction and a.form is total]
        for anchor in mine:
            near = draws.of(anchor)
            if any(m.analyte is analyte and m.measure is count and m.form is total for m in near):
                continue  # a measured count of this draw is the count
            if anchor.measure is count:  # segmented neutrophil count (+ band count)
                band_count, _ = _best(
                    anchor, (b for b in near if _is(b, analyte, count, Form.BAND))
                )
                parts = [anchor, *([band_count] if band_count else [])]
                how = " + ".join(f"{p.reported} ({_form_word(p)}, {p.key})" for p in parts)
                value = sum(p.value for p in parts)
            else:
                if anchor.form is segmented and any(of_one_draw(anchor, t) for t in totals):
                    continue  # a total fraction of this draw: bands must never be added to it
                wbc, candidates = _best(anchor, (w for w in near if w.analyte is Analyte.WBC))
                if wbc is None or wbc.measure is not count:
                    continue
                fractions = [anchor]
                if anchor.form is segmented:
                    # Bands are added to a segmented fraction only: a total fraction already
                    # includes them (clozapine PI §5.1; clinical.md §4.5).
                    bands, _ = _best(
                        anchor, (b for b in near if _is(b, analyte, fraction, Form.BAND))
                    )
                    fractions += [bands] if bands is not None else []
                chosen = _why(anchor, wbc, candidates) if candidates > 1 else ""
                how = f"WBC {wbc.reported} ({wbc.key}{chosen}) x " + " + ".join(
                    f"{f.reported} ({_form_word(f)}, {f.key})" for f in fractions
                )
                parts = [wbc, *fractions]
                value = wbc.value * sum(f.value for f in fractions)
            made = _made(analyte, anchor, parts, value, how, counts)
            if made is not None:
                derived.append(made)
    return derived


def _is(result: LabResult, analyte: Analyte, measure: Measure, form: Form) -> bool:
    return result.analyte is analyte and result.measure is measure and result.form is form


class _Draws:
    """One patient's results by specimen, report and time: what may be of one draw with a
    result, found without comparing every pair."""

    def __init__(self, results: list[LabResult]) -> None:
        self.by: dict[object, list[LabResult]] = {}
        for result in results:
            for key in self._keys(result):
                self.by.setdefault(key, []).append(result)

    @staticmethod
    def _keys(result: LabResult) -> list[object]:
        keys: list[object] = [result.effective]
        if result.report:
            keys.append(("report", result.report))
        specimen = _specimen(result)
        if specimen:
            keys.append(specimen)
        return keys

    def of(self, result: LabResult) -> list[LabResult]:
        """The other results of ``result``'s draw (:func:`of_one_draw`)."""
        found: dict[int, LabResult] = {}
        for key in self._keys(result):
            for other in self.by.get(key, ()):
                if other is not result and of_one_draw(result, other):
                    found[id(other)] = other
        return list(found.values())


def _made(
    analyte: Analyte,
    anchor: LabResult,
    parts: list[LabResult],
    value: float,
    how: str,
    counts: Counter[str],
) -> LabResult | None:
    if any(p.comparator in (">", ">=") for p in parts):
        return None  # a lower bound times a fraction says nothing about how low it is
    comparator = "<" if any(p.comparator in ("<", "<=") for p in parts) else None
    status = "preliminary" if any(p.status == "preliminary" for p in parts) else "final"
    counts["results:derived"] += 1
    value = round(value, 9)
    latest = max(parts, key=lambda p: p.effective)
    return LabResult(
        key=f"derived:{analyte.value}:{'+'.join(p.key for p in parts)}",
        patient=parts[0].patient,
        analyte=analyte,
        measure=Measure.COUNT,
        form=Form.TOTAL,
        loinc="",
        value=value,
        comparator=comparator,
        reported=f"{'< ' if comparator else ''}{format_number(value)} 10*9/L (derived)",
        effective=latest.effective,
        effective_text=latest.effective_text,
        status=status,
        group=anchor.group,
        sources=tuple(p.key for p in parts),
        derivation=how,
        report=anchor.report,
        matched=_matched(parts),
    )


def _matched(parts: list[LabResult]) -> str:
    """How the parts were matched, when they share no specimen and no report."""
    first = parts[0]
    specimen = _specimen(first)
    if specimen and all(_specimen(p) == specimen for p in parts):
        return ""
    if first.report and all(p.report == first.report for p in parts):
        return ""
    if first.group and all(p.group == first.group for p in parts):
        return ""  # one group as before (a time group of results outside any report)
    reports = sorted({p.report for p in parts if p.report})
    across = f", {len(reports)} reports" if len(reports) > 1 else ""
    return f"the same collection time ({first.effective_text}{across})"


def _form_word(result: LabResult) -> str:
    base = result.analyte.value
    if result.form is Form.SEGMENTED:
        return f"segmented {base}"
    if result.form is Form.BAND:
        return f"band {base}"
    return base
