"""FHIR resources already in memory: dicts (from ``json.loads``, ``fhirpy``, any FHIR client that
gives JSON objects), ``fhir.resources`` models, and JSON bytes, into the rule core.

Each goes through JSON bytes and :func:`~fhir_leuko.core.fhirjson.iter_document`, the one decoding
path every other input takes: a Bundle is flattened, a resource type fhir-leuko does not read is
skipped, and a malformed resource becomes a :class:`~fhir_leuko.core.model.Problem`, never an
exception. Duck-typed on purpose: the core imports neither fhirpy nor ``fhir.resources`` here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from .fhirjson import Sourced, iter_document
from .model import Problem

__all__ = ["IN_MEMORY", "in_memory_json", "iter_in_memory"]

IN_MEMORY = "<in memory>"
"""The source named in problems, and the one input all in-memory resources share (``Origin.input``),
so references between them resolve as within one file."""


def in_memory_json(obj: Any) -> bytes | None:
    """The JSON bytes of a resource held in memory, or ``None`` if ``obj`` is not one.

    * ``bytes``: taken as a JSON document;
    * a fhirpy resource (a ``dict`` with ``serialize()``): its plain-JSON form;
    * any other mapping (``dict`` from ``json.loads`` or a FHIR client);
    * a pydantic model, ``fhir.resources`` among them (``model_dump_json``): its FHIR JSON.

    Raises:
        TypeError: a mapping holds a value JSON cannot carry (``orjson.JSONEncodeError``).
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, Mapping):
        serialize = getattr(obj, "serialize", None)
        plain = serialize() if callable(serialize) else obj
        return orjson.dumps(plain if isinstance(plain, dict) else dict(plain))
    dump = getattr(obj, "model_dump_json", None)
    if callable(dump):
        text = dump(by_alias=True, exclude_none=True)
        return text.encode() if isinstance(text, str) else bytes(text)
    return None


def iter_in_memory(obj: Any, position: str = "") -> Iterator[Sourced | Problem]:
    """The resources of one in-memory item (a Bundle flattened), and its problems.

    Raises:
        TypeError: ``obj`` is not a resource, a Bundle or JSON bytes.
    """
    try:
        data = in_memory_json(obj)
    except TypeError as exc:
        label = obj.get("resourceType", "") if isinstance(obj, Mapping) else ""
        yield Problem(IN_MEMORY, f"not valid JSON ({exc})", str(label), position)
        return
    if data is None:
        raise TypeError(
            f"{position or 'input'}: a {type(obj).__name__} is not a FHIR resource: give a dict, "
            "a fhir.resources model, JSON bytes, or a path"
        )
    # One input for everything held in memory, as one file holding it all would be: a Bundle
    # entry's RESTful fullUrl still names its server (core/normalise/sources.py).
    yield from iter_document(data, IN_MEMORY, position, IN_MEMORY)
