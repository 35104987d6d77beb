"""The configuration file of ``run``/``watch`` and ``serve``, and the order of their sources.

One TOML file may configure both: the job reads the tables ``[fhir]``, ``[auth]``, ``[run]`` and
``[state]``, the service ``[service]``. Precedence, highest first: flags (or keyword arguments),
``FHIR_LEUKO_*`` environment variables, the file, the defaults. Both settings classes take only
their init values (``settings_customise_sources``); :func:`layer_sources` builds those values, so
the two entry points cannot drift apart on precedence.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs
from pydantic_settings import BaseSettings, EnvSettingsSource

from .errors import UsageError

__all__ = ["STATE_DIR_ENV", "deep_merge", "layer_sources", "read_toml", "state_dir"]

STATE_DIR_ENV = "FHIR_LEUKO_STATE_DIR"


def state_dir(given: Path | None = None) -> Path:
    """The one directory of fhir-leuko's state on disk, shared by the job (``state.sqlite3``) and
    the service (``cds-feedback.sqlite3``): ``given`` (``--state-dir``, ``[state] dir``), else
    ``FHIR_LEUKO_STATE_DIR``, else the XDG state directory (``$XDG_STATE_HOME/fhir-leuko``, i.e.
    ``~/.local/state/fhir-leuko`` on Linux; platformdirs elsewhere)."""
    if given is not None:
        return given
    from_env = os.environ.get(STATE_DIR_ENV)
    if from_env:
        return Path(from_env)
    return platformdirs.user_state_path("fhir-leuko", appauthor=False)


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
