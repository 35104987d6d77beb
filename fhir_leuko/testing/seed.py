"""Load FHIR files (Bundles of any type, resources, NDJSON, .ndjson.gz) into a FHIR server, for the
demo, the tests and the benchmarks of the scheduled job.

Each file becomes one transaction Bundle: resources with an id are PUT to ``[type]/[id]`` (so the
references between hand-written files keep working), resources without one are POSTed; ``urn:uuid``
fullUrls are kept so the server rewrites references to them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

__all__ = ["seed_paths", "seed_resources", "transaction_of"]

_HEADERS = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _resources(path: Path) -> Iterator[tuple[dict[str, Any], str | None]]:
    name = path.name.lower().removesuffix(".gz")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if name.endswith((".ndjson", ".jsonl")):
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        docs = [json.loads(text)]
    for doc in docs:
        if doc.get("resourceType") == "Bundle":
            for entry in doc.get("entry") or []:
                if entry.get("resource"):
                    yield entry["resource"], entry.get("fullUrl")
        else:
            yield doc, None


def transaction_of(items: Iterable[tuple[Mapping[str, Any], str | None]]) -> dict[str, Any]:
    """A transaction Bundle that stores these resources (PUT by id, POST without)."""
    entries = []
    for resource, full_url in items:
        rtype, rid = resource["resourceType"], resource.get("id")
        entry: dict[str, Any] = {"resource": dict(resource)}
        if full_url and full_url.startswith("urn:uuid:"):
            entry["fullUrl"] = full_url
        if rid:
            entry["request"] = {"method": "PUT", "url": f"{rtype}/{rid}"}
        else:
            entry["request"] = {"method": "POST", "url": rtype}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def seed_resources(
    base_url: str,
    items: Iterable[tuple[Mapping[str, Any], str | None]],
    *,
    session: requests.Session | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """POST one transaction storing these resources; returns the transaction-response."""
    http = session or requests.Session()
    response = http.post(
        base_url.rstrip("/"),
        data=json.dumps(transaction_of(items)),
        headers={**_HEADERS, **(headers or {})},
        timeout=120,
    )
    if response.status_code != 200:
        raise RuntimeError(f"seeding failed: HTTP {response.status_code}: {response.text[:1000]}")
    result: dict[str, Any] = response.json()
    return result


def seed_paths(
    base_url: str,
    paths: Iterable[Path],
    *,
    session: requests.Session | None = None,
    headers: Mapping[str, str] | None = None,
) -> int:
    """Store every resource of these files and directories; returns how many."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.name.lower().endswith((".json", ".ndjson", ".ndjson.gz"))
                )
            )
        else:
            files.append(path)
    count = 0
    for file in files:
        items = list(_resources(file))
        if items:
            seed_resources(base_url, items, session=session, headers=headers)
            count += len(items)
    return count
