"""The FHIR R4 (4.0.1) search parameters of the resources fhir-leuko searches.

Strict servers answer 400 to an unknown search parameter (lenient ones, like sekmet, silently ignore
it, which is worse: the search returns too much). Everything the scheduled job sends is checked
against this table (:func:`check_search_params`), which is copied from the specification's search
tables: https://hl7.org/fhir/R4/searchparameter-registry.html and each resource's "Search
Parameters" section (e.g. https://hl7.org/fhir/R4/observation.html#search). Note that R4's
DetectedIssue has no ``status`` parameter and Flag has no ``code`` parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["COMMON", "R4_SEARCH_PARAMS", "check_search_params"]

COMMON = frozenset(
    {
        # https://hl7.org/fhir/R4/resource.html#search and https://hl7.org/fhir/R4/search.html
        "_id",
        "_lastUpdated",
        "_tag",
        "_profile",
        "_security",
        "_source",
        "_text",
        "_content",
        "_list",
        "_has",
        "_type",
        "_query",
        # result parameters (https://hl7.org/fhir/R4/search.html#Summary)
        "_sort",
        "_count",
        "_include",
        "_revinclude",
        "_summary",
        "_total",
        "_elements",
        "_contained",
        "_containedType",
    }
)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


R4_SEARCH_PARAMS: dict[str, frozenset[str]] = {
    "Observation": _names(
        "based-on category code code-value-concept code-value-date code-value-quantity "
        "code-value-string combo-code combo-code-value-concept combo-code-value-quantity "
        "combo-data-absent-reason combo-value-concept combo-value-quantity component-code "
        "component-code-value-concept component-code-value-quantity component-data-absent-reason "
        "component-value-concept component-value-quantity data-absent-reason date derived-from "
        "device encounter focus has-member identifier method part-of patient performer specimen "
        "status subject value-concept value-date value-quantity value-string"
    ),
    "DiagnosticReport": _names(
        "based-on category code conclusion date encounter identifier issued media patient "
        "performer result results-interpreter specimen status subject"
    ),
    "MedicationRequest": _names(
        "authoredon category code date encounter identifier intended-dispenser "
        "intended-performer intended-performertype intent medication patient priority requester "
        "status subject"
    ),
    "MedicationStatement": _names(
        "category code context effective identifier medication part-of patient source status "
        "subject"
    ),
    "MedicationAdministration": _names(
        "code context device effective-time identifier medication patient performer "
        "reason-given reason-not-given request status subject"
    ),
    "MedicationDispense": _names(
        "code context destination identifier medication patient performer prescription receiver "
        "responsibleparty status subject type whenhandedover whenprepared"
    ),
    "Medication": _names(
        "code expiration-date form identifier ingredient ingredient-code lot-number manufacturer "
        "status"
    ),
    "Patient": _names(
        "active address address-city address-country address-postalcode address-state "
        "address-use birthdate death-date deceased email family gender general-practitioner "
        "given identifier language link name organization phone phonetic telecom"
    ),
    "Condition": _names(
        "abatement-age abatement-date abatement-string asserter body-site category "
        "clinical-status code encounter evidence evidence-detail identifier onset-age onset-date "
        "onset-info patient recorded-date severity stage subject verification-status"
    ),
    "Flag": _names("author date encounter identifier patient subject"),
    "DetectedIssue": _names("author code identified identifier implicated patient"),
}
"""Resource-specific R4 search parameters (the common ones are in :data:`COMMON`)."""

_INCLUDES: dict[str, frozenset[str]] = {
    # _include=[type]:[reference search parameter of that type]
    "MedicationRequest": frozenset({"MedicationRequest:medication"}),
    "MedicationStatement": frozenset({"MedicationStatement:medication"}),
    "MedicationAdministration": frozenset({"MedicationAdministration:medication"}),
    "MedicationDispense": frozenset({"MedicationDispense:medication"}),
    "DiagnosticReport": frozenset({"DiagnosticReport:result"}),
}

_MODIFIERS = frozenset(
    {
        "missing",
        "exact",
        "contains",
        "text",
        "not",
        "above",
        "below",
        "in",
        "not-in",
        "of-type",
        "identifier",
    }
)


_RESULT_VALUES: dict[str, frozenset[str]] = {
    # https://hl7.org/fhir/R4/search.html#total and #summary
    "_total": frozenset({"none", "estimate", "accurate"}),
    "_summary": frozenset({"true", "text", "data", "count", "false"}),
}


def check_search_params(
    resource_type: str,
    params: Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]],
) -> None:
    """Raise ``ValueError`` for a parameter (or ``_include``, or a ``_sort`` key, or a ``_total`` or
    ``_summary`` value) that R4 does not define for the type."""
    known = R4_SEARCH_PARAMS.get(resource_type)
    if known is None:
        raise ValueError(f"no R4 search parameter table for {resource_type}")
    items: Iterable[tuple[str, object]] = params.items() if isinstance(params, Mapping) else params
    for name, value in items:
        base, _, modifier = name.partition(":")
        if base not in known and base not in COMMON:
            raise ValueError(
                f"{resource_type}?{base}: not an R4 search parameter of {resource_type}"
            )
        if modifier and modifier not in _MODIFIERS and not modifier[:1].isupper():
            raise ValueError(f"{resource_type}?{name}: not an R4 search modifier")
        if base == "_include":
            values = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
            for include in values:
                if include not in _INCLUDES.get(resource_type, frozenset()):
                    raise ValueError(f"{resource_type}?_include={include}: not an R4 include")
        if base == "_sort":
            # comma-separated search parameters of the type, each optionally with "-" (descending)
            for key in str(value).split(","):
                name = key.strip().removeprefix("-")
                if name not in known and name not in ("_id", "_lastUpdated"):
                    raise ValueError(f"{resource_type}?_sort={value}: {name!r} is not an R4 sort")
        if base in _RESULT_VALUES and str(value) not in _RESULT_VALUES[base]:
            raise ValueError(f"{resource_type}?{base}={value}: not an R4 value of {base}")
