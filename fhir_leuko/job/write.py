"""Writing DetectedIssues exactly once: transactions, conditional creates, ``If-Match`` updates.

A new finding is a conditional create (``If-None-Exist: identifier=...``; 200 and 201 are both
success) or, with ``write_mode="put"``, a PUT of the deterministic UUID; updates and resolutions
carry ``If-Match``. Writes of a group go in one transaction Bundle when ``metadata`` lists
``transaction`` (single requests otherwise, and as the fallback that isolates a failing patient).
When the server's resource is not what the plan assumed (a create that found one, a version
conflict), the write is decided again once. Re-running, also after a kill -9 at any point, finds
the resources by identifier and changes nothing. Each write is recorded in the state's ledger.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.detectedissue import conditional_query
from ..errors import (
    AuthError,
    FhirConflictError,
    FhirError,
    FhirFatalError,
    FhirTemporaryError,
    LockError,
)
from .patients import pseudonym
from .plan import Write, content, for_update, is_resolved, version_of

if TYPE_CHECKING:
    from .runner import Job

__all__ = ["Writer"]

log = logging.getLogger(__name__)


class Writer:
    """The writes of one pass (or, in a dry run, their count and the resources emitted)."""

    def __init__(
        self,
        job: Job,
        actions: Counter[str],
        run_id: int,
        use_tx: bool,
        deferred: set[str],
        outage: Callable[[FhirTemporaryError], None],
    ) -> None:
        self.job = job
        self.client = job.client
        self.options = job.options
        self.server = job.server
        self.actions = actions
        self.run_id = run_id
        self.use_tx = use_tx
        self.deferred = deferred
        """Patients whose write failed because the server was unavailable (see the pass)."""
        self.outage = outage

    def write(self, planned: dict[str, list[Write]]) -> tuple[list[str], list[tuple[str, str]]]:
        writes = [w for ws in planned.values() for w in ws]
        if self.options.dry_run:
            for w in writes:
                self.actions[w.action] += 1
                if self.job.emit is not None:
                    self.job.emit(w.resource)
            return list(planned), []
        failed: dict[str, str] = {}
        pending = writes
        if self.use_tx and len(writes) > 0:
            try:
                pending = self.transaction(writes)
            except (AuthError, LockError):
                raise
            except FhirError as exc:
                if exc.status == 403:
                    log.warning(
                        "transactions refused (HTTP 403, e.g. scopes for one type only): "
                        "single requests for the rest of this run"
                    )
                    self.use_tx = False
                else:
                    log.warning("transaction failed (%s); writing one by one", exc)
                pending = writes
            except Exception as exc:  # an answer it cannot read: every write is conditional or
                # If-Match, so writing them one by one again cannot duplicate anything
                log.warning(
                    "transaction answer unusable (%s); writing one by one", type(exc).__name__
                )
                pending = writes
        for w in pending:
            if w.patient in failed:
                continue
            try:
                self.write_one(w)
            except (AuthError, LockError):
                raise
            except FhirError as exc:
                failed[w.patient] = str(exc)
                if isinstance(exc, FhirTemporaryError):
                    self.deferred.add(w.patient)
                    self.outage(exc)
            except Exception as exc:  # an answer it cannot read fails this patient only
                failed[w.patient] = f"the answer to a write could not be used ({type(exc).__name__})"
        return [p for p in planned if p not in failed], sorted(failed.items())

    def _record(self, w: Write, resource_id: str | None, version: str | None, action: str) -> None:
        self.actions[action] += 1
        state = self.job.state
        if state is not None:
            state.record_write(
                self.run_id,
                self.server,
                w.identifier,
                resource_id,
                version,
                action,
                patient=pseudonym(self.server, w.patient),
                finding=w.kind.value,
            )

    def transaction(self, writes: list[Write]) -> list[Write]:
        """All writes in one transaction; returns the writes that need a second look (a
        conditional create that found an existing resource)."""
        entries = []
        for w in writes:
            entry: dict[str, Any] = {"resource": w.resource}
            if w.action == "create" and self.options.write_mode == "conditional":
                entry["fullUrl"] = f"urn:uuid:{w.identifier}"
                entry["request"] = {
                    "method": "POST",
                    "url": "DetectedIssue",
                    "ifNoneExist": conditional_query({"identifier": w.resource["identifier"]}),
                }
            else:
                request: dict[str, Any] = {
                    "method": "PUT",
                    "url": f"DetectedIssue/{w.resource['id']}",
                }
                if w.if_match:
                    request["ifMatch"] = f'W/"{w.if_match}"'
                entry["request"] = request
            entries.append(entry)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        # Every entry is conditional or a PUT: a retry after a lost answer cannot duplicate.
        answer = self.client.transaction(bundle, idempotent=True)
        self.job.point("write")
        again: list[Write] = []
        results = answer.get("entry") or []
        if len(results) != len(writes):
            raise FhirFatalError(
                f"transaction response has {len(results)} entries for {len(writes)} requests"
            )
        for w, entry in zip(writes, results, strict=True):
            response = entry.get("response") or {}
            status = str(response.get("status") or "")
            location = str(response.get("location") or "")
            rid = location.split("/_history/")[0].rstrip("/").rsplit("/", 1)[-1] or None
            version = str(response.get("etag") or "").removeprefix("W/").strip('"') or None
            if w.action == "create" and status.startswith("200"):
                again.append(w)  # it existed after all (search index lag): look again
                continue
            self._record(w, rid, version, w.action)
        return again

    def write_one(self, w: Write, *, second: bool = False) -> None:
        client = self.client
        if w.action == "create":
            if self.options.write_mode == "put":
                result = client.update(w.resource)
            else:
                query = conditional_query({"identifier": w.resource["identifier"]})
                result = client.create(w.resource, if_none_exist=query)
            self.job.point("write")
            if result.status == 201 or self.options.write_mode == "put":
                self._record(w, result.id, result.version, "create")
                return
            # 200: the resource exists although the search did not show it: compare and update.
            current = result.resource
            if current is None or current.get("resourceType") != "DetectedIssue":
                if result.id is None:
                    raise FhirFatalError("conditional create answered 200 without the resource")
                current = client.read("DetectedIssue", result.id)
            self.reconsider(w, current, second)
            return
        try:
            result = client.update(w.resource, if_match=w.if_match)
        except FhirConflictError:
            if second:
                raise
            current = client.read("DetectedIssue", str(w.resource["id"]))
            self.reconsider(w, current, True)
            return
        self.job.point("write")
        self._record(w, result.id, result.version, w.action)

    def reconsider(self, w: Write, current: dict[str, Any], second: bool) -> None:
        """The server's resource differs from what the plan assumed: decide again, once."""
        if second and w.action == "create":
            raise FhirConflictError("the DetectedIssue changed twice while being written")
        if w.action == "resolve":
            if is_resolved(current):
                self.actions["unchanged"] += 1
                return
            body = {
                **current,
                "detail": w.resource["detail"],
                "mitigation": w.resource["mitigation"],
            }
            redo = Write(
                w.patient, w.kind, "resolve", for_update(body, current), version_of(current)
            )
        else:
            if content(current) == content(w.resource) and not is_resolved(current):
                self.actions["unchanged"] += 1
                return
            redo = Write(
                w.patient, w.kind, "update", for_update(w.resource, current), version_of(current)
            )
        self.write_one(redo, second=True)
