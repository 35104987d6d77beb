"""Validating a profile or knowledge document already read: the first error names file and field.

The documents are read from disk by :mod:`fhir_leuko.files.documents`; here they are only data.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic

from ..errors import ProfileError

__all__ = ["validate_document"]

_Model = TypeVar("_Model", bound=pydantic.BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as people read the file: ``rules[1].lower_limit.value``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not item.startswith(("function-", "literal[", "float", "int")):
            # pydantic adds union-member names to locations; they are not fields of the file
            parts.append(f".{item}" if parts else item)
    return "".join(parts)


def validate_document(model: type[_Model], data: dict[str, Any], file: str) -> _Model:
    """Validate ``data`` against ``model``; the first error becomes a :class:`ProfileError`.

    Raises:
        ProfileError: naming ``file`` and the dotted field path of the first error.
    """
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _field_path(tuple(first["loc"]))
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field (see profiles/README.md for the grammar)"
        elif first["type"] == "missing":
            message = "required field is missing"
        raise ProfileError(file, field, message) from None
