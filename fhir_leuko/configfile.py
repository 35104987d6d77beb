"""The configuration file of ``run``/``watch`` and ``serve``, and the order of their sources.

One TOML file may configure both: the job reads the tables ``[fhir]``, ``[auth]``, ``[run]`` and
``[state]``, the service ``[service]``. Precedence, highest first: flags (or keyword arguments),
``FHIR_LEUKO_*`` environment variables, the file, the defaults. Both settings classes take only
their init values (``settings_customise_sources``); :func:`layer_sources` builds those values, so
the two entry points cannot drift apart on precedence.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource

from .errors import UsageError

__all__ = ["deep_merge", "layer_sources", "read_toml"]


def read_toml(path: Path, label: str) -> dict[str, Any]:
    """The parsed file.

    Raises:
        UsageError: it cannot be read or is not TOML; the message starts with ``label`` (how the
            user named the file).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{label}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{label}: not valid TOML: {exc}") from None


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top; tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def layer_sources(
    settings_cls: type[BaseSettings], file_values: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """The init values of ``settings_cls``: ``given`` over the environment (read by pydantic-settings
    with the class's own prefix and nesting rules) over ``file_values``."""
    environment = EnvSettingsSource(settings_cls)()
    return deep_merge(deep_merge(file_values, environment), given)
