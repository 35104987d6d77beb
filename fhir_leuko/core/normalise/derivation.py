"""Absolute counts derived from WBC x fraction where a blood count has none.

Per patient, results are grouped by specimen, else report (or panel), else time (clinical.md §4.5:
same specimen or time). Where a group has a fraction but no absolute count of an analyte, the count
is WBC x the total fraction, or x the segmented fraction plus bands; neutrophils also from segmented
plus band counts (clozapine prescribing information §5.1). A lower bound (``>``) derives nothing;
an upper bound (``<``) derives an upper bound. The derivation is written out for the explanation.
Which results form a group is decided when they are placed (:meth:`Normaliser.place`); derivation
across reports starts there.
"""

from __future__ import annotations

from collections import Counter

from ..model import Analyte, Form, LabResult, Measure
from .results import format_number

__all__ = ["derive", "derive_one"]


def derive(results: list[LabResult], counts: Counter[str]) -> list[LabResult]:
    """Absolute counts derived from WBC x fraction where a specimen has no absolute count.

    ``results`` are one patient's, so ``group`` (specimen, report or time) needs no patient.
    """
    by_group: dict[str, list[LabResult]] = {}
    for result in results:
        members = by_group.get(result.group)
        if members is None:
            by_group[result.group] = [result]
        else:
            members.append(result)
    derived: list[LabResult] = []
    count, total = Measure.COUNT, Form.TOTAL
    for group, members in by_group.items():
        counted = {r.analyte for r in members if r.measure is count and r.form is total}
        wanting = {r.analyte for r in members} - counted
        wanting.discard(Analyte.WBC)
        if not wanting:
            continue  # the usual complete differential: every absolute count is there
        wbcs = sorted(
            (r for r in members if r.analyte is Analyte.WBC),
            key=lambda r: (not r.corrected, r.key),
        )
        wbc = wbcs[0] if wbcs else None
        for analyte in Analyte:
            if analyte in wanting:
                mine = [r for r in members if r.analyte is analyte]
                made = derive_one(analyte, mine, wbc, group, counts)
                if made is not None:
                    derived.append(made)
    return derived


def derive_one(
    analyte: Analyte,
    mine: list[LabResult],
    wbc: LabResult | None,
    group: str,
    counts: Counter[str],
) -> LabResult | None:
    """One absolute count from ``mine`` (the analyte's results of one group) and the group's WBC:
    segmented + band counts, else WBC x (total fraction, or segmented + band fractions)."""

    def first(measure: Measure, form: Form) -> LabResult | None:
        found = sorted(
            (r for r in mine if r.measure is measure and r.form is form), key=lambda r: r.key
        )
        return found[0] if found else None

    parts: list[LabResult]
    how: str
    segs_count = first(Measure.COUNT, Form.SEGMENTED)
    if analyte is Analyte.NEUTROPHILS and segs_count is not None:
        band_count = first(Measure.COUNT, Form.BAND)
        parts = [segs_count, *([band_count] if band_count else [])]
        value = sum(p.value for p in parts)
        how = " + ".join(f"{p.reported} ({_form_word(p)}, {p.key})" for p in parts)
    else:
        if wbc is None:
            return None
        total = first(Measure.FRACTION, Form.TOTAL)
        if total is not None:
            fractions = [total]
        else:
            segs = first(Measure.FRACTION, Form.SEGMENTED)
            if segs is None:
                return None
            bands = first(Measure.FRACTION, Form.BAND)
            # Bands are added to a segmented percentage only: a total percentage already
            # includes them (clozapine PI §5.1; clinical.md §4.5).
            fractions = [segs, *([bands] if bands else [])]
        parts = [wbc, *fractions]
        value = wbc.value * sum(f.value for f in fractions)
        how = f"WBC {wbc.reported} ({wbc.key}) x " + " + ".join(
            f"{f.reported} ({_form_word(f)}, {f.key})" for f in fractions
        )
    if any(p.comparator in (">", ">=") for p in parts):
        return None  # a lower bound times a fraction says nothing about how low it is
    comparator = "<" if any(p.comparator in ("<", "<=") for p in parts) else None
    status = "preliminary" if any(p.status == "preliminary" for p in parts) else "final"
    first_part = parts[0]
    counts["results:derived"] += 1
    value = round(value, 9)
    return LabResult(
        key=f"derived:{analyte.value}:{'+'.join(p.key for p in parts)}",
        patient=first_part.patient,
        analyte=analyte,
        measure=Measure.COUNT,
        form=Form.TOTAL,
        loinc="",
        value=value,
        comparator=comparator,
        reported=f"{'< ' if comparator else ''}{format_number(value)} 10*9/L (derived)",
        effective=max(p.effective for p in parts),
        effective_text=max(parts, key=lambda p: p.effective).effective_text,
        status=status,
        group=group,
        sources=tuple(p.key for p in parts),
        derivation=how,
    )


def _form_word(result: LabResult) -> str:
    base = result.analyte.value
    if result.form is Form.SEGMENTED:
        return f"segmented {base}"
    if result.form is Form.BAND:
        return f"band {base}"
    return base
