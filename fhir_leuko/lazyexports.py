"""A package's names imported from their modules when first used (PEP 562), not with the package.

``fhir_leuko.fhir`` and ``fhir_leuko.job`` name their rooms' public classes in their
``__init__``; importing those modules at once would bring requests, PyJWT and cryptography to every
command that touches the package for one small module (``evaluate`` reads the job's configuration
for its ``[scale]`` table and logs through ``fhir.privacy``), 0.1 s of start-up for nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each exported name to the module
    of the package that defines it."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__
