"""Whatever a Python caller has, into the rule core: paths, or resources already in memory.

``fhir_leuko.evaluate_resources`` and ``fhir_leuko.normalise`` take a mix of

* ``str`` or :class:`os.PathLike`: a file or directory, read as ``fhir-leuko evaluate`` reads it;
* a ``dict`` (``json.loads``, ``fhirpy``, any FHIR client), a ``fhir.resources`` model, or JSON
  ``bytes``: a resource or a Bundle already in memory (:mod:`fhir_leuko.core.memory`);
* ``(resource, Origin)`` pairs and :class:`~fhir_leuko.core.model.Problem` as
  :func:`~fhir_leuko.files.reader.read_paths` yields them (passed through);

or one such item on its own (a Bundle dict, a path).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.fhirjson import Origin, Sourced
from ..core.knowledge import Knowledge
from ..core.memory import iter_in_memory
from ..core.model import Problem
from ..core.normalise import Dataset
from ..core.normalise import normalise as normalise_items
from ..core.pipeline import Evaluation, evaluate_dataset
from ..core.profiles import ProfileSet
from .reader import read_paths

__all__ = ["evaluate_resources", "iter_inputs", "normalise"]


def _single(inputs: Any) -> bool:
    """One item given on its own rather than an iterable of items."""
    return isinstance(inputs, str | bytes | bytearray | memoryview | os.PathLike | Mapping) or (
        callable(getattr(inputs, "model_dump_json", None))
    )


def iter_inputs(inputs: Any) -> Iterator[Sourced | Problem]:
    """The resources and problems of paths and in-memory resources (module docstring).

    Raises:
        InputError: a path does not exist.
        TypeError: an item is none of the kinds above.
    """
    items: Iterable[Any] = [inputs] if _single(inputs) else inputs
    for index, item in enumerate(items):
        if isinstance(item, Problem) or (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Origin)):
            yield item
        elif isinstance(item, str | os.PathLike):
            yield from read_paths([Path(item)])
        else:
            yield from iter_in_memory(item, f"[{index}]")


def normalise(inputs: Any, knowledge: Knowledge) -> Dataset:
    """Normalise paths and in-memory resources (:func:`iter_inputs`) into a :class:`Dataset`."""
    return normalise_items(iter_inputs(inputs), knowledge)


def evaluate_resources(
    inputs: Any, knowledge: Knowledge, profiles: ProfileSet, *, as_of: datetime
) -> Evaluation:
    """Evaluate paths and in-memory resources (:func:`iter_inputs`): findings and DetectedIssues.

    Example::

        bundle = fhirpy_client.resources("Observation").search(patient="123").fetch_raw()
        result = fl.evaluate_resources(bundle, knowledge, profiles, as_of=as_of)
    """
    return evaluate_dataset(normalise(inputs, knowledge), profiles, as_of=as_of)
