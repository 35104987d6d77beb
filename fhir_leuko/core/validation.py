"""Validating a profile or knowledge document already read: errors name the file and the field.

Loading stops at the first error (:func:`validate_document`); ``fhir-leuko profiles validate`` wants
every error of a file at once (:func:`document_errors`).

The documents are read from disk by :mod:`fhir_leuko.files.documents`; here they are only data.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic

from ..errors import ProfileError

__all__ = ["document_errors", "validate_document"]

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


def _profile_error(error: Any, file: str) -> ProfileError:
    field = _field_path(tuple(error["loc"]))
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field (see profiles/README.md for the grammar)"
    elif error["type"] == "missing":
        message = "required field is missing"
    return ProfileError(file, field, message)


def validate_document(model: type[_Model], data: dict[str, Any], file: str) -> _Model:
    """Validate ``data`` against ``model``; the first error becomes a :class:`ProfileError`.

    Raises:
        ProfileError: naming ``file`` and the dotted field path of the first error.
    """
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _profile_error(exc.errors(include_url=False)[0], file) from None


def document_errors(
    model: type[_Model], data: dict[str, Any], file: str
) -> tuple[_Model | None, list[ProfileError]]:
    """Validate ``data`` against ``model``: the model, or ``None`` and every error found."""
    try:
        return model.model_validate(data), []
    except pydantic.ValidationError as exc:
        return None, [_profile_error(e, file) for e in exc.errors(include_url=False)]
