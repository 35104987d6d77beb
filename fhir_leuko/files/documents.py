"""Reading profile and knowledge documents (TOML or YAML) with errors that name file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from ..errors import ProfileError

__all__ = ["DOCUMENT_SUFFIXES", "load_document", "shipped_profiles_dir", "validate_document"]

DOCUMENT_SUFFIXES = (".toml", ".yaml", ".yml")

_Model = TypeVar("_Model", bound=pydantic.BaseModel)


def shipped_profiles_dir() -> Path:
    """The ``profiles/`` directory shipped with fhir-leuko.

    In a wheel it is ``fhir_leuko/profiles`` (copied there at build time, see pyproject.toml); in a
    source checkout or an editable install it is the repository's top-level ``profiles/``.
    """
    package = Path(__file__).resolve().parent.parent  # fhir_leuko/
    packaged = package / "profiles"
    if packaged.is_dir():
        return packaged
    return package.parent / "profiles"


def load_document(path: Path) -> dict[str, Any]:
    """Parse one TOML or YAML file into a mapping.

    Raises:
        ProfileError: unreadable file, syntax error, or not a mapping at the top.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(str(path), "", f"cannot read: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(raw.decode("utf-8"))
        else:
            data = yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ProfileError(str(path), "", f"syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(str(path), "", "the document must be a mapping (TOML table / YAML map)")
    return data


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
