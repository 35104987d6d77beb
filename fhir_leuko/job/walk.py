"""Walking a FHIR search the way a production server can serve it (issue 8).

Every paged search of the job goes through :class:`Walker`. A walk is a keyset walk over
``meta.lastUpdated``, in *windows*:

* Each window is one search sorted by ``_sort=_lastUpdated`` (plus ``_id`` as the tie-breaker when
  the server's CapabilityStatement lists ``_id`` for the type), whose ``next`` links are followed
  verbatim. The first window starts at the walk's lower bound (``_lastUpdated=gt<lo>``, or none).
* A window ends when the search does, or after ``window_size`` resources (when the cursor has moved
  past the window's first instant), or when the server refuses a deeper page (a 4xx on a ``next``
  link, e.g. ``400 Search offset exceeds maximum``). The next window starts at the cursor:
  ``_lastUpdated=ge<the last instant read>``, and the resources of that instant already read are
  dropped from its pages. So no walk depends on deep offsets, and a walk always advances: a window
  that could not move past one instant (more resources share it than the server pages) is a
  :class:`~fhir_leuko.errors.PagingError`, never a loop.
* The order is checked: a ``meta.lastUpdated`` earlier than one already read means the server
  ignores ``_sort``; a walk of more than one page is then not stable (rows are missed and repeated),
  which is a :class:`~fhir_leuko.errors.PagingError`.
* ``count=True`` (full scans) checks completeness where the server can tell: ``_total=accurate`` on
  the first page, else one ``_summary=count``; fewer distinct resources than the server counts
  (after one recount) is a :class:`~fhir_leuko.errors.PagingError`.
* The ``stop`` event is checked before every request: a set event raises :class:`Stopped`.

Pages are yielded as raw searchset Bundle bytes (a page with resources read before, after a window
restart, is re-serialised without them), for ``core.fhirjson.iter_document``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime

import msgspec
import orjson

from ..core.fhirtime import parse_fhir_datetime
from ..errors import AuthError, FhirFatalError, PagingError

__all__ = ["Stopped", "Walker", "interruptible_sleep"]

log = logging.getLogger(__name__)

Search = Callable[[str, list[tuple[str, str]]], Iterator[bytes]]

# Statuses of a next-link request that mean "not this deep" (offset caps, expired cursors).
_REFUSED = frozenset({400, 404, 410, 422})


class Stopped(Exception):
    """The pass was asked to stop (SIGTERM/SIGINT): raised between requests."""


def interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A ``sleep`` for :class:`~fhir_leuko.fhir.client.FhirClient` whose retry waits end at once,
    with :class:`Stopped`, when ``stop`` is set."""

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Stopped

    return sleep


class _Meta(msgspec.Struct):
    lastUpdated: str | None = None


class _Resource(msgspec.Struct):
    resourceType: str | None = None
    id: str | None = None
    meta: _Meta | None = None


class _Mode(msgspec.Struct):
    mode: str | None = None


class _Entry(msgspec.Struct):
    resource: _Resource | None = None
    search: _Mode | None = None


class _Link(msgspec.Struct):
    relation: str | None = None


class _Page(msgspec.Struct):
    total: int | None = None
    link: list[_Link] = []
    entry: list[_Entry] = []


_DECODE = msgspec.json.Decoder(_Page)


class Walker:
    """Walks searches (see the module docstring). ``search(rtype, params)`` yields the pages of
    one search following ``next`` links (the job's checked ``FhirClient.search``)."""

    def __init__(
        self,
        search: Search,
        stop: threading.Event,
        sort: Callable[[str], str],
        *,
        window_size: int = 5_000,
    ) -> None:
        self.search = search
        self.stop = stop
        self.sort = sort
        self.window_size = window_size
        self.windows = 0
        """Windows started (searches sent, not counting their next links)."""

    def pages(
        self,
        rtype: str,
        params: list[tuple[str, str]],
        *,
        after: str | None = None,
        count: bool = False,
    ) -> Iterator[bytes]:
        """The pages of a search, sorted by ``_lastUpdated``, whose resources were last updated
        after ``after`` (a FHIR instant; ``None``: all). ``count``: check completeness."""
        what = f"{rtype} search"
        sort = ("_sort", self.sort(rtype))
        lower = [("_lastUpdated", f"gt{after}")] if after else []
        cursor: tuple[datetime, str] | None = None  # (instant, the server's text of it)
        at_cursor: set[str] = set()  # ids read at the cursor instant
        ids: set[str] = set()
        expected: int | None = None
        pages = 0
        unordered = False
        first = True
        while True:
            start = cursor
            extra = [("_total", "accurate")] if count and first else []
            window = [*params, *lower, sort, *extra]
            first = False
            self.windows += 1
            in_window = 0
            window_pages = 0
            restart = False
            self._check_stop()
            it = self.search(rtype, window)
            try:
                for raw in it:
                    window_pages += 1
                    pages += 1
                    page = _DECODE.decode(raw)
                    if window_pages == 1 and count and expected is None:
                        expected = page.total
                    drop: set[int] = set()
                    for index, entry in enumerate(page.entry):
                        mode = entry.search.mode if entry.search is not None else None
                        res = entry.resource
                        if res is None or res.id is None or mode not in (None, "match"):
                            continue
                        if mode is None and res.resourceType not in (None, rtype):
                            continue  # an included resource from a server that omits the mode
                        text = res.meta.lastUpdated if res.meta else None
                        moment = parse_fhir_datetime(text) if text else None
                        if moment is None or text is None:
                            if count:
                                ids.add(res.id)
                            in_window += 1
                            continue
                        if cursor is None or moment > cursor[0]:
                            cursor = (moment, text)
                            at_cursor = {res.id}
                        elif moment == cursor[0]:
                            if res.id in at_cursor and start is not None and moment == start[0]:
                                drop.add(index)  # read in the window before
                                continue
                            at_cursor.add(res.id)
                        else:
                            unordered = True
                        if count:
                            ids.add(res.id)
                        in_window += 1
                    more = any(link.relation == "next" for link in page.link)
                    if unordered and (more or pages > 1):
                        raise PagingError(
                            f"{what}: the server does not keep the order asked for with "
                            f"_sort={sort[1]} (an earlier meta.lastUpdated after a later one), "
                            "so paging through it cannot be stable: resources would be missed "
                            "or repeated. Sorted search by _lastUpdated is required."
                        )
                    yield _without(raw, drop) if drop else raw
                    if not more:
                        break
                    self._check_stop()
                    if (
                        in_window >= self.window_size
                        and cursor is not None
                        and (start is None or cursor[0] > start[0])
                    ):
                        restart = True  # a new window at the cursor instead of a deeper page
                        break
            except AuthError:
                raise
            except FhirFatalError as exc:
                if isinstance(exc, PagingError) or window_pages == 0 or exc.status not in _REFUSED:
                    raise
                if cursor is None or (start is not None and cursor[0] <= start[0]):
                    where = f"meta.lastUpdated {cursor[1]}" if cursor else "the first instant"
                    raise PagingError(
                        f"{what}: the server refuses to page deeper than {in_window} resources "
                        f"({exc}), and they all share {where}: the walk cannot advance",
                        status=exc.status,
                        url=exc.url,
                    ) from None
                log.info(
                    "%s: the server refused a deeper page (HTTP %s): a new window from %s",
                    what,
                    exc.status,
                    cursor[1],
                )
                restart = True
            finally:
                close = getattr(it, "close", None)
                if callable(close):
                    close()
            if not restart:
                break
            assert cursor is not None
            lower = [("_lastUpdated", f"ge{cursor[1]}")]
        if count:
            self._check_count(rtype, params, after, len(ids), expected)

    def _check_count(
        self,
        rtype: str,
        params: list[tuple[str, str]],
        after: str | None,
        seen: int,
        expected: int | None,
    ) -> None:
        if expected is not None and seen >= expected:
            return
        # No total on the first page, or a shortfall (the data may have changed meanwhile):
        # ask the server to count (once).
        self._check_stop()
        lower = [("_lastUpdated", f"gt{after}")] if after else []
        # The search's criteria only: some servers refuse _summary=count with _elements.
        criteria = [(k, v) for k, v in params if k not in ("_elements", "_count")]
        counted: int | None = None
        for raw in self.search(rtype, [*criteria, *lower, ("_summary", "count")]):
            counted = _DECODE.decode(raw).total
            break
        if counted is None:
            if expected is None:
                log.warning(
                    "%s search: the server gives no total (neither _total=accurate nor "
                    "_summary=count): the scan's completeness cannot be checked",
                    rtype,
                )
                return
            counted = expected
        if seen < counted:
            raise PagingError(
                f"{rtype} search: the walk returned {seen} distinct resources, the server counts "
                f"{counted}: the scan is not complete (the server's paging lost "
                f"{counted - seen}); the pass fails rather than miss patients"
            )

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped


def _without(raw: bytes, drop: set[int]) -> bytes:
    """A page without the entries at the given positions."""
    bundle = orjson.loads(raw)
    bundle["entry"] = [e for i, e in enumerate(bundle.get("entry") or []) if i not in drop]
    return orjson.dumps(bundle)
