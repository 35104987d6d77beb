"""Evaluate one patient against the profiles in force. Pure: data and ``as_of`` in, findings out.

For each finding kind the applicable profile with the highest priority decides alone (a child's
counts are judged by the pediatric profile, a clozapine patient's ANC by the clozapine tables):

1. The profile applies to the patient's age at ``as_of`` (``applies``) and has a rule for the kind
   whose flag conditions hold (``when_flags`` / ``unless_flags``).
2. The result that counts is the most recent valid absolute count (measured, or derived from WBC x
   percentage) with an accepted status, taken within the lookback before ``as_of``. A patient whose
   latest count has recovered gets no finding. Two valid counts of that time with different values
   (a CBC's and a manual differential's): the lower counts, as a missed low is worse than a noisy
   one, and the finding names the other (``Finding.alternatives``).
3. A profile restricted to drugs (``applies.drugs``) only decides when one of them is implicated in
   that result; otherwise the next profile decides.
4. "Low" means below the lower limit: the lab's reference range when the Observation has one,
   otherwise the profile's default (by age where the profile says so). Without any lower limit only
   bands with a numeric edge can fire (grade 1 needs a lower limit: CTCAE v5.0).
5. The grade is the deepest band the value falls in. A comparator is honoured: ``< 0.1`` is below
   0.1 and is graded so; a ``>`` value is never taken as low.

A deceased patient (``Patient.deceasedBoolean`` true, or a ``deceasedDateTime`` at or before
``as_of``) gets no finding: an alert about a death helps no one (issue 13 §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta

from .decision import Decision, NotUsed, Outcome, ProfileSkip, ResultUse
from .fhirtime import age_reached, parse_duration, shift
from .model import (
    FINDING_ANALYTE,
    Analyte,
    ConditionMatch,
    DrugExposure,
    Finding,
    FindingKind,
    Form,
    ImplicatedDrug,
    LabResult,
    LowerLimit,
    Measure,
    PatientRecord,
)
from .profiles import Band, Profile, ProfileSet, Rule

__all__ = [
    "evaluate",
    "implicated_drugs",
    "is_below",
    "is_deceased",
    "latest_result",
    "profile_applies",
]


def is_below(value: float, comparator: str | None, edge: float) -> bool:
    """Whether a value (with its Quantity comparator) is certainly below ``edge``."""
    if comparator is None:
        return value < edge
    if comparator == "<":
        return value <= edge  # the true value is below `value`, so below any edge >= value
    if comparator == "<=":
        return value < edge
    return False  # ">" and ">=" give a lower bound only


def _age_ok(birth: date | None, on: date, profile: Profile) -> bool:
    applies = profile.applies
    if birth is None:
        return applies.age_unknown
    if applies.min_age and not age_reached(birth, on, parse_duration(applies.min_age)):
        return False
    return not (applies.max_age and age_reached(birth, on, parse_duration(applies.max_age)))


def is_deceased(record: PatientRecord, as_of: datetime) -> bool:
    """Whether the patient is recorded as deceased at ``as_of``: ``deceasedBoolean`` true, or a
    ``deceasedDateTime`` at or before ``as_of`` (a later one means alive at ``as_of``)."""
    if record.deceased_at is not None:
        return record.deceased_at <= as_of
    return record.deceased


def profile_applies(profile: Profile, record: PatientRecord, as_of: datetime) -> bool:
    """Whether the profile's age conditions hold for this patient at ``as_of``."""
    return _age_ok(record.birth_date, as_of.date(), profile)


def _rule_for(profile: Profile, kind: FindingKind, flags: set[str]) -> Rule | None:
    for rule in profile.rules:
        if rule.finding is not kind:
            continue
        if rule.when_flags and not set(rule.when_flags) <= flags:
            continue
        if set(rule.unless_flags) & flags:
            continue
        return rule
    return None


def latest_result(
    record: PatientRecord,
    kind: FindingKind,
    *,
    as_of: datetime,
    lookback: timedelta,
    statuses: Sequence[str],
    results: Sequence[LabResult] | None = None,
    uses: list[ResultUse] | None = None,
) -> LabResult | None:
    """The most recent valid absolute count of the finding's analyte within the lookback.

    ``results`` narrows the search to these of the record's results (e.g. those of the analyte).
    ``uses``, when given, receives every result of the analyte with why it did not count (the
    decision data of :mod:`.decision`; the same checks, not a copy of them).
    """
    analyte = FINDING_ANALYTE[kind]
    earliest = shift(as_of, -lookback)
    best: LabResult | None = None
    best_key: tuple[datetime, float, bool, bool, bool, str] | None = None
    usable: list[LabResult] = []
    for result in record.results if results is None else results:
        if result.analyte is not analyte:
            continue
        # Only a total absolute count is "the" count: a segmented or band-form count (30451-9,
        # 26507-4 ...) is a part of it, and enters only through the derived total (normalise).
        if result.measure is not Measure.COUNT or result.form is not Form.TOTAL:
            if uses is not None:
                uses.append(ResultUse(result, NotUsed.PART))
            continue
        if uses is None and best is not None and result.effective < best.effective:
            continue  # cannot win: the rank below compares the time first
        if result.status not in statuses or not earliest <= result.effective <= as_of:
            if uses is not None:
                uses.append(ResultUse(result, _why_not(result, statuses, earliest, as_of)))
            continue
        if uses is not None:
            usable.append(result)
        # Latest first; at the same time the lower value (an upper bound "< x" below x itself),
        # then a measured value over a derived one, a corrected WBC over an uncorrected one; the
        # key breaks remaining ties so the choice is stable.
        rank = (
            result.effective,
            -result.value,
            result.comparator in ("<", "<="),
            not result.derived,
            result.corrected,
            result.key,
        )
        if best_key is None or rank > best_key:
            best, best_key = result, rank
    if uses is not None:
        uses.extend(ResultUse(r, None if r is best else NotUsed.SUPERSEDED) for r in usable)
        uses.sort(key=lambda u: (u.result.effective, u.result.key))
    return best


def _why_not(
    result: LabResult, statuses: Sequence[str], earliest: datetime, as_of: datetime
) -> NotUsed:
    if result.effective > as_of:
        return NotUsed.AFTER_AS_OF
    if result.effective < earliest:
        return NotUsed.BEFORE_LOOKBACK
    return NotUsed.STATUS


def _days_before(days: int) -> str:
    if days == 0:
        return "the same day"
    return f"{days} day{'s' if days != 1 else ''} before"


def _event_relation(exposure: DrugExposure, at: datetime, window: timedelta) -> str | None:
    """The relation of an administration or a dispense: what happened (``exposure.event``), then
    when that was, seen from the count: ``given 2026-11-12, 5 days before``."""
    end = exposure.end
    if end is None:
        return f"{exposure.event}, in progress"
    if end >= at:
        if exposure.start == end:
            return f"{exposure.event}, the same day"  # given once, later on the count's day
        return f"{exposure.event}, active at this count"
    days = (at.date() - end.date()).days
    if days > window.days:
        return None
    if exposure.start != end and exposure.record_type == "MedicationDispense":
        return f"{exposure.event}, supply ended {_days_before(days)}"
    return f"{exposure.event}, {_days_before(days)}"


def _exposure_relation(exposure: DrugExposure, at: datetime, window: timedelta) -> str | None:
    """How an exposure relates to a result at ``at``: ``None`` when it does not implicate."""
    start, end = exposure.start, exposure.end
    if start is not None and start.date() > at.date():
        return None  # started after the count (the same day counts: dates are often day-precise)
    if exposure.event:
        return _event_relation(exposure, at, window)
    if end is None:
        return "active" if exposure.status not in ("completed", "stopped") else None
    if end >= at:
        return "active"
    # The window counts calendar days, like the start check above: an end date is often
    # day-precise ("2024-04-01" parses to midnight), and "stopped 30 days before" the count must
    # not depend on the hour the count was taken.
    days = (at.date() - end.date()).days
    if days > window.days:
        return None
    if exposure.ended_on_status:
        return f"{exposure.status}, last recorded {end.date().isoformat()} ({days} days before)"
    return f"stopped {end.date().isoformat()} ({days} days before)"


def implicated_drugs(
    record: PatientRecord,
    at: datetime,
    window: timedelta,
    *,
    kind: FindingKind | None = None,
    drug_ids: Sequence[str] = (),
) -> list[ImplicatedDrug]:
    """Exposures active at ``at`` or stopped within ``window`` before it.

    Only drugs known to cause ``kind`` (when given) and, when ``drug_ids`` is given, only those drugs
    or groups.
    """
    wanted = set(drug_ids)
    found: list[ImplicatedDrug] = []
    for exposure in record.exposures:
        hits = [
            h
            for h in exposure.drugs
            if (kind is None or kind.value in h.effects)
            and (not wanted or h.drug_id in wanted or wanted.intersection(h.groups))
        ]
        if not hits:
            continue
        relation = _exposure_relation(exposure, at, window)
        if relation is not None:
            labels = tuple(dict.fromkeys(h.label for h in hits))
            found.append(ImplicatedDrug(exposure, labels, relation))
    return found


def _lower_limit(rule: Rule, result: LabResult, birth: date | None) -> LowerLimit:
    spec = rule.lower_limit
    if spec.lab_range and result.ref_low is not None:
        # ref_source names the entry chosen among several and cites the element it was read from.
        which = result.ref_source or "(Observation.referenceRange.low)"
        return LowerLimit(result.ref_low, f"the laboratory's reference range {which}")
    # The lab's range was given but none of it could be used: the profile's default decides, and
    # the explanation says why (issue 13 §3). A rule that never uses the lab's range needs no note.
    note = result.ref_note if spec.lab_range else ""
    if spec.value is not None:
        return LowerLimit(spec.value, spec.source, note)
    if spec.by_age and birth is not None:
        on = result.effective.date()
        for band in spec.by_age:
            if not age_reached(birth, on, parse_duration(band.from_age)):
                continue
            if band.to_age and age_reached(birth, on, parse_duration(band.to_age)):
                continue
            return LowerLimit(band.value, band.source, note)
    return LowerLimit(None, "no lower limit known for this result", note)


def _grade(bands: Sequence[Band], result: LabResult, limit: float | None) -> Band | None:
    below_limit = limit is not None and is_below(result.value, result.comparator, limit)
    chosen: Band | None = None
    for band in bands:
        if band.below == "lower-limit":
            holds = below_limit
        else:
            holds = is_below(result.value, result.comparator, band.below) and (
                limit is None or below_limit
            )
        if holds:
            chosen = band
    return chosen


def _conditions(record: PatientRecord, at: datetime) -> tuple[ConditionMatch, ...]:
    seen: dict[str, ConditionMatch] = {}
    for match in record.conditions:
        if match.onset is not None and match.onset.date() > at.date():
            continue
        if match.abatement is not None and match.abatement < at:
            continue
        seen.setdefault(match.cause_id, match)
    return tuple(seen.values())


def _decide(
    record: PatientRecord,
    profile: Profile,
    rule: Rule,
    result: LabResult,
    as_of: datetime,
) -> Finding | None:
    settings = profile.settings
    grading = profile.gradings[rule.grading]
    limit = _lower_limit(rule, result, record.birth_date)
    band = _grade(grading.bands, result, limit.value)
    if band is None:
        return None
    term_text = rule.term
    codes: list[tuple[str, str]] = []
    if rule.evidence is not None:
        codes.append((rule.evidence.code, rule.evidence.display))
    for term in sorted(rule.terms, key=lambda t: t.below, reverse=True):
        if is_below(result.value, result.comparator, term.below):
            term_text = term.text
            if term.snomed is not None and (term.snomed.code, term.snomed.display) not in codes:
                codes.append((term.snomed.code, term.snomed.display))
    window = timedelta(days=settings.drug_window_days)
    implicated = (
        implicated_drugs(record, result.effective, window, kind=rule.finding)
        if rule.implicate_drugs
        else []
    )
    trend_from = shift(result.effective, -timedelta(days=settings.trend_days))
    trend = [
        r
        for r in record.results
        if r.analyte is result.analyte
        and r.measure is Measure.COUNT
        and r.form is Form.TOTAL
        and r.status in settings.statuses
        and trend_from <= r.effective <= result.effective
    ]
    # One value per time point: the one latest_result would take at that time.
    by_time: dict[datetime, LabResult] = {}
    for r in trend:
        current = by_time.get(r.effective)
        if current is None or _counts_before(r, current):
            by_time[r.effective] = r
    by_time[result.effective] = result
    recent = sorted(by_time.values(), key=lambda r: r.effective)[-settings.trend_count :]
    alternatives = tuple(
        sorted(
            (
                r
                for r in trend
                if r.effective == result.effective
                and r is not result
                and (r.value, r.comparator) != (result.value, result.comparator)
            ),
            key=lambda r: (r.value, r.key),
        )
    )
    applied = set(rule.when_flags)
    profile_flags = {f for r in profile.rules for f in (*r.when_flags, *r.unless_flags)}
    return Finding(
        patient=record.key,
        kind=rule.finding,
        result=result,
        grade=band.grade,
        grade_label=band.label,
        grading_name=grading.name,
        grading_version=grading.version,
        severity=band.severity,
        lower_limit=limit,
        term=term_text,
        recommendation=band.recommendation or rule.recommendation,
        profile_id=profile.id,
        profile_url=profile.url,
        profile_version=profile.version,
        profile_title=profile.title,
        evidence_codes=tuple(codes),
        implicated=tuple(implicated),
        conditions=_conditions(record, result.effective),
        trend=tuple(recent),
        flags=tuple(sorted(f for f in record.flags if f in applied)),
        merged_from=tuple(record.merged_from),
        source=record.source,
        alternatives=alternatives,
        flag_notes=tuple(
            note
            for flag, note in sorted(record.flag_notes.items())
            if flag in profile_flags and flag not in record.flags
        ),
    )


def _counts_before(a: LabResult, b: LabResult) -> bool:
    """Whether ``a`` is the count taken over ``b`` of the same time (as :func:`latest_result`)."""
    rank_a = (-a.value, a.comparator in ("<", "<="), not a.derived, a.corrected, a.key)
    rank_b = (-b.value, b.comparator in ("<", "<="), not b.derived, b.corrected, b.key)
    return rank_a > rank_b


def evaluate(
    record: PatientRecord,
    profiles: ProfileSet | Sequence[Profile],
    *,
    as_of: datetime,
    trace: list[Decision] | None = None,
) -> list[Finding]:
    """The findings of one patient at ``as_of``, one at most per finding kind.

    ``trace``, when given, receives one :class:`~.decision.Decision` per finding kind: which
    profiles were passed over and why, which results counted or not and why, the limit and bands
    (``fhir-leuko explain``; the report's plots). Without it nothing extra is built.
    """
    if is_deceased(record, as_of):
        if trace is not None:
            trace.extend(Decision(kind, Outcome.DECEASED, as_of) for kind in FindingKind)
        return []
    ordered = profiles.profiles if isinstance(profiles, ProfileSet) else tuple(profiles)
    ordered = tuple(sorted(ordered, key=lambda p: (-p.priority, p.id)))
    findings: list[Finding] = []
    # Each kind looks at one analyte, and profiles mostly share their settings: sort the results
    # by analyte once, and find each (kind, lookback, statuses) latest result once.
    by_analyte: dict[Analyte, list[LabResult]] = {}
    for candidate in record.results:
        by_analyte.setdefault(candidate.analyte, []).append(candidate)
    latest: dict[tuple[FindingKind, int, tuple[str, ...]], LabResult | None] = {}
    # The patient's age is the same for every kind: each profile's age conditions, checked once.
    fits = [profile_applies(profile, record, as_of) for profile in ordered]
    for kind in FindingKind:
        skipped: list[ProfileSkip] | None = [] if trace is not None else None
        for profile, fitting in zip(ordered, fits, strict=True):
            if not fitting:
                if skipped is not None:
                    skipped.append(_skip(profile, "the patient's age is outside its applies"))
                continue
            rule = _rule_for(profile, kind, record.flags)
            if rule is None:
                if skipped is not None:
                    skipped.append(_skip(profile, _no_rule_reason(profile, kind)))
                continue
            settings = profile.settings
            wanted = (kind, settings.lookback_days, tuple(settings.statuses))
            if wanted not in latest:
                latest[wanted] = latest_result(
                    record,
                    kind,
                    as_of=as_of,
                    lookback=timedelta(days=settings.lookback_days),
                    statuses=settings.statuses,
                    results=by_analyte.get(FINDING_ANALYTE[kind], []),
                )
            result = latest[wanted]
            if profile.applies.drugs and (
                result is None
                or not implicated_drugs(
                    record,
                    result.effective,
                    timedelta(days=settings.drug_window_days),
                    drug_ids=profile.applies.drugs,
                )
            ):
                # Not this patient's or this result's profile: the next one decides.
                if skipped is not None:
                    skipped.append(_skip(profile, _drug_reason(profile, result)))
                continue
            finding = None
            if result is not None:
                finding = _decide(record, profile, rule, result, as_of)
                if finding is not None:
                    findings.append(finding)
            if trace is not None and skipped is not None:
                trace.append(
                    _traced(
                        record, kind, profile, rule, result, finding, as_of, skipped, by_analyte
                    )
                )
            break
        else:
            if trace is not None and skipped is not None:
                trace.append(Decision(kind, Outcome.NO_PROFILE, as_of, tuple(skipped)))
    return findings


def _skip(profile: Profile, reason: str) -> ProfileSkip:
    return ProfileSkip(profile.id, profile.version, reason)


def _no_rule_reason(profile: Profile, kind: FindingKind) -> str:
    rules = [r for r in profile.rules if r.finding is kind]
    if not rules:
        return f"it has no rule for {kind.value}"
    return f"its {kind.value} rules need other patient flags (when_flags / unless_flags)"


def _drug_reason(profile: Profile, result: LabResult | None) -> str:
    drugs = ", ".join(profile.applies.drugs)
    if result is None:
        return f"it applies only with {drugs}, and no result counted"
    return f"it applies only when {drugs} is implicated in the result that counts, and none is"


def _traced(
    record: PatientRecord,
    kind: FindingKind,
    profile: Profile,
    rule: Rule,
    result: LabResult | None,
    finding: Finding | None,
    as_of: datetime,
    skipped: list[ProfileSkip],
    by_analyte: dict[Analyte, list[LabResult]],
) -> Decision:
    """The decision a profile made for one kind, with the results it looked at (trace only)."""
    settings = profile.settings
    lookback = timedelta(days=settings.lookback_days)
    uses: list[ResultUse] = []
    latest_result(
        record,
        kind,
        as_of=as_of,
        lookback=lookback,
        statuses=settings.statuses,
        results=by_analyte.get(FINDING_ANALYTE[kind], []),
        uses=uses,
    )
    if result is None:
        outcome = Outcome.NO_RESULT
    else:
        outcome = Outcome.FINDING if finding is not None else Outcome.NOT_LOW
    grading = profile.gradings[rule.grading]
    return Decision(
        kind=kind,
        outcome=outcome,
        as_of=as_of,
        skipped=tuple(skipped),
        profile_id=profile.id,
        profile_version=profile.version,
        profile_title=profile.title,
        lookback=lookback,
        statuses=tuple(settings.statuses),
        result=result,
        uses=tuple(uses),
        lower_limit=_lower_limit(rule, result, record.birth_date) if result is not None else None,
        grading_name=grading.name,
        grading_version=grading.version,
        bands=tuple(grading.bands),
        finding=finding,
    )
