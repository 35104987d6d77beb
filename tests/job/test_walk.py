"""The job's search walk (fhir_leuko/job/walk.py) against small in-memory servers: windows at the
cursor instead of deep pages, always advancing, order and completeness checks, stop between
requests. The same walk runs against the real test server behind the strict proxy in
test_paging.py."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import responses

from fhir_leuko.errors import FhirFatalError, PagingError
from fhir_leuko.fhir.client import FhirClient
from fhir_leuko.job.walk import Stopped, Walker, interruptible_sleep


class Fake:
    """A server of (id, lastUpdated) resources: pages of ``size``; past ``cap`` rows into one
    search a next link answers 400; ``sort=False`` ignores _sort; ``lose`` ids never appear."""

    def __init__(
        self,
        rows: list[tuple[str, str]],
        *,
        size: int = 3,
        cap: int = 1000,
        sort: bool = True,
        lose: frozenset[str] = frozenset(),
        total: bool = True,
    ) -> None:
        self.rows, self.size, self.cap, self.sort = rows, size, cap, sort
        self.lose, self.total = lose, total
        self.sent: list[list[tuple[str, str]]] = []

    def __call__(self, rtype: str, params: list[tuple[str, str]]) -> Iterator[bytes]:
        self.sent.append(params)
        rows = list(self.rows)
        for name, value in params:
            if name == "_lastUpdated":
                op, when = value[:2], value[2:]
                rows = [r for r in rows if (r[1] > when if op == "gt" else r[1] >= when)]
        if any(name == "_summary" for name, _ in params):
            yield orjson.dumps({"resourceType": "Bundle", "total": len(rows)})
            return
        rows = sorted(rows, key=lambda r: (r[1], r[0])) if self.sort else rows
        if not self.sort:
            random.Random(len(self.sent)).shuffle(rows)
        for offset in range(0, max(len(rows), 1), self.size):
            if offset > self.cap:
                raise FhirFatalError("Search offset exceeds maximum", status=400)
            page = rows[offset : offset + self.size]
            bundle: dict[str, Any] = {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [
                    {"resource": {"resourceType": rtype, "id": i, "meta": {"lastUpdated": t}}}
                    for i, t in page
                    if i not in self.lose
                ],
                "link": [{"relation": "next", "url": "x"}]
                if offset + self.size < len(rows)
                else [],
            }
            if self.total and offset == 0 and ("_total", "accurate") in params:
                bundle["total"] = len(rows)
            yield orjson.dumps(bundle)


def stamp(n: int) -> str:
    return f"2026-11-20T10:00:{n:02d}.000Z"


def walk(fake: Fake, **kwargs: Any) -> list[str]:
    walker = Walker(fake, threading.Event(), lambda rtype: "_lastUpdated,_id", window_size=6)
    out = []
    for page in walker.pages("Observation", [("code", "x")], **kwargs):
        out.extend(e["resource"]["id"] for e in orjson.loads(page)["entry"])
    return out


ROWS = [(f"o{i:02d}", stamp(i // 2)) for i in range(40)]  # two per instant


def test_a_walk_reads_everything_once_in_windows_without_deep_pages() -> None:
    fake = Fake(ROWS, cap=6)
    assert walk(fake, count=True) == [i for i, _ in sorted(ROWS, key=lambda r: (r[1], r[0]))]
    lowers = [v for params in fake.sent for n, v in params if n == "_lastUpdated"]
    assert lowers and all(v.startswith("ge") for v in lowers)  # windows from the cursor
    assert all(("_sort", "_lastUpdated,_id") in params for params in fake.sent)


def test_a_refused_deep_page_starts_a_new_window_at_the_cursor() -> None:
    fake = Fake(ROWS, cap=3)  # the third page of any search is refused
    walker = Walker(fake, threading.Event(), lambda rtype: "_lastUpdated", window_size=10_000)
    seen = [
        e["resource"]["id"]
        for page in walker.pages("Observation", [], after=stamp(2))
        for e in orjson.loads(page)["entry"]
    ]
    assert seen == [i for i, t in ROWS if t > stamp(2)]


def test_more_rows_in_one_instant_than_the_server_pages_fail_instead_of_looping() -> None:
    rows = [(f"b{i:02d}", stamp(5)) for i in range(20)]
    with pytest.raises(PagingError, match=r"share meta.lastUpdated .* cannot advance"):
        walk(Fake(rows, cap=6))
    # ... and a server that pages them (a cursor) is walked through, however many there are
    assert len(walk(Fake(rows, cap=1000))) == 20


def test_a_server_that_ignores_sort_fails_the_walk() -> None:
    with pytest.raises(PagingError, match="cannot be stable"):
        walk(Fake(ROWS, sort=False))
    assert len(walk(Fake(ROWS[:3], sort=False))) == 3  # one page: complete in any order


def test_a_shortfall_against_the_servers_count_fails_the_scan() -> None:
    with pytest.raises(PagingError, match="returned 39 distinct resources, the server counts 40"):
        walk(Fake(ROWS, lose=frozenset({"o07"})), count=True)
    fake = Fake(ROWS, total=False)
    assert len(walk(fake, count=True)) == 40
    assert fake.sent[-1] == [("code", "x"), ("_summary", "count")]  # asked to count, once


def test_stop_is_checked_between_requests() -> None:
    stop = threading.Event()
    fake = Fake(ROWS)
    pages = Walker(fake, stop, lambda rtype: "_lastUpdated").pages("Observation", [])
    next(pages)
    stop.set()
    with pytest.raises(Stopped):
        next(pages)
    assert len(fake.sent) == 1
    sleep = interruptible_sleep(stop)
    with pytest.raises(Stopped):
        sleep(30)


@responses.activate
def test_search_params_come_from_the_capability_statement() -> None:
    statement = {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "searchParam": [{"name": "_lastUpdated", "type": "date"}],
                "resource": [
                    {"type": "Observation", "searchParam": [{"name": "_id", "type": "token"}]},
                    {"type": "Flag"},
                ],
            }
        ],
    }
    responses.get("https://ehr.example.org/fhir/metadata", json=statement)
    client = FhirClient("https://ehr.example.org/fhir")
    assert client.search_params("Observation") == {"_id", "_lastUpdated"}
    assert client.search_params("Flag") is None  # lists none: nothing can be concluded
    assert client.search_params("Patient") is None
