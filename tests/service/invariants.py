"""The one checker of CDS Hooks 2.0 response invariants, applied to every response the tests see.

Written from the spec (CDS Hooks 2.0 §Use of JSON, §Card Attributes, §Source, §Suggestion, §Action,
§Link, §Coding) and the logical-model invariants cds-resp-1..7 of HL7/cds-hooks, independently of the
service code. :class:`tests.service.harness.CdsClient` calls :func:`check_response` on each answer.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import urlsplit

from fhir_leuko.core.fhir_models import check_resource
from fhir_leuko.service.models import CardsResponse, DiscoveryResponse, OperationOutcome

INDICATORS = {"info", "warning", "critical"}
SELECTION = {"at-most-one", "any"}
ACTION_TYPES = {"create", "update", "delete"}
RELATIVE_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
RAW_HTML = re.compile(r"(?<!\\)<[A-Za-z/!?]")


class InvariantError(AssertionError):
    pass


def _fail(where: str, why: str) -> None:
    raise InvariantError(f"{where}: {why}")


def _absolute(url: Any, where: str) -> None:
    if not isinstance(url, str):
        _fail(where, "URL is not a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        _fail(where, f"{url!r} is not an absolute URL")


def no_null_or_empty(value: Any, where: str = "$", *, root_cards_ok: bool = False) -> None:
    """CDS Hooks 2.0 §Use of JSON: no null, "", [] or {} anywhere (except ``{"cards": []}``)."""
    if value is None:
        _fail(where, "null")
    empty = isinstance(value, str | list | dict) and len(value) == 0
    if empty and not (root_cards_ok and where == "$.cards"):
        _fail(where, "empty value")
    if isinstance(value, dict):
        for key, item in value.items():
            no_null_or_empty(item, f"{where}.{key}", root_cards_ok=root_cards_ok)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            no_null_or_empty(item, f"{where}[{index}]", root_cards_ok=root_cards_ok)


def _coding(coding: Any, where: str, *, display: bool) -> None:
    if not isinstance(coding, dict):
        _fail(where, "not an object")
    for name in ("system", "code") + (("display",) if display else ()):
        if not isinstance(coding.get(name), str) or not coding[name]:
            _fail(where, f"{name} missing")


def check_card(card: dict[str, Any], where: str) -> None:
    card_uuid = card.get("uuid")
    if not isinstance(card_uuid, str):
        _fail(where, "no uuid (needed for feedback)")
    uuid.UUID(card_uuid)
    summary = card.get("summary")
    if not isinstance(summary, str) or not summary or len(summary) >= 140:
        _fail(where, f"summary must be a string under 140 characters: {summary!r}")
    if card.get("indicator") not in INDICATORS:
        _fail(where, f"indicator {card.get('indicator')!r}")
    source = card.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("label"), str):
        _fail(where, "source.label missing")
    if "url" in source:
        _absolute(source["url"], f"{where}.source.url")
    if "icon" in source:
        _absolute(source["icon"], f"{where}.source.icon")
    if "topic" in source:
        _coding(source["topic"], f"{where}.source.topic", display=False)
    detail = card.get("detail")
    if detail is not None:
        if not isinstance(detail, str):
            _fail(where, "detail is not a string")
        if RAW_HTML.search(detail):
            _fail(where, "detail contains raw HTML")
    suggestions = card.get("suggestions")
    if suggestions is not None:
        # cds-resp-1 / cds-resp-6: suggestions require selectionBehavior.
        if card.get("selectionBehavior") not in SELECTION:
            _fail(where, "suggestions without a valid selectionBehavior")
        for s_index, suggestion in enumerate(suggestions):
            s_where = f"{where}.suggestions[{s_index}]"
            if not isinstance(suggestion.get("label"), str):
                _fail(s_where, "label missing")
            if "uuid" in suggestion:
                uuid.UUID(suggestion["uuid"])
            for a_index, action in enumerate(suggestion.get("actions", [])):
                a_where = f"{s_where}.actions[{a_index}]"
                if action.get("type") not in ACTION_TYPES:
                    _fail(a_where, f"type {action.get('type')!r}")
                # cds-resp-5: every suggestion action has a description.
                if not isinstance(action.get("description"), str):
                    _fail(a_where, "description missing")
                if action["type"] == "delete":
                    # cds-resp-7: deletes name their target with resourceId.
                    if not RELATIVE_REFERENCE.match(str(action.get("resourceId", ""))):
                        _fail(a_where, "delete without a relative resourceId")
                    if "resource" in action:
                        _fail(a_where, "delete carries a resource (deprecated)")
                else:
                    resource = action.get("resource")
                    if not isinstance(resource, dict) or "resourceType" not in resource:
                        _fail(a_where, f"{action['type']} without a FHIR resource")
                    check_resource(resource)
    elif "selectionBehavior" in card:
        _fail(where, "selectionBehavior without suggestions")
    for r_index, reason in enumerate(card.get("overrideReasons", [])):
        # cds-resp-4: override reasons carry a display.
        _coding(reason, f"{where}.overrideReasons[{r_index}]", display=True)
    for l_index, link in enumerate(card.get("links", [])):
        l_where = f"{where}.links[{l_index}]"
        if not isinstance(link.get("label"), str) or link.get("type") not in ("absolute", "smart"):
            _fail(l_where, "label or type missing")
        _absolute(link.get("url"), l_where)
        if "appContext" in link and link["type"] != "smart":
            _fail(l_where, "appContext on a non-smart link (cds-resp-3)")


def check_cards_response(body: Any) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("cards"), list):
        _fail("$", "no cards array")
    if set(body) - {"cards", "systemActions"}:
        _fail("$", f"unexpected members {sorted(set(body) - {'cards', 'systemActions'})}")
    no_null_or_empty(body, root_cards_ok=True)
    for index, card in enumerate(body["cards"]):
        check_card(card, f"$.cards[{index}]")
    CardsResponse.model_validate(body)


def check_discovery(body: Any) -> None:
    no_null_or_empty(body)
    DiscoveryResponse.model_validate(body)
    for service in body["services"]:
        for name in ("hook", "id", "description"):
            if not isinstance(service.get(name), str):
                _fail(f"$.services[{service.get('id')}]", f"{name} missing")


def check_operation_outcome(body: Any) -> None:
    no_null_or_empty(body)
    OperationOutcome.model_validate(body)


def check_response(path: str, status: int, body: Any) -> None:
    """Check one response of the service: cards, discovery, OperationOutcome or feedback."""
    if status >= 400:
        check_operation_outcome(body)
        return
    if (
        path.rstrip("/").endswith("/cds-services")
        and path.count("/cds-services") == 1
        and (path.rstrip("/").split("/cds-services")[-1] == "")
    ):
        check_discovery(body)
    elif path.endswith("/feedback"):
        if body is not None:
            _fail(path, "feedback answers have no body")
    else:
        check_cards_response(body)
