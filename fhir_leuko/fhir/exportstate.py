"""Where ``fhir-leuko export`` keeps the state of an export directory, whether the export it
records is complete and what the server could not export: ``evaluate`` asks before it reads a
directory (this module imports neither requests nor the client, so ``evaluate`` starts without
them).

Why ``evaluate`` asks: an export stopped part-way (kill -9, a network failure, ``--max-wait``, a
file the server kept sending broken) holds the files downloaded so far and nothing of the others.
Read as it is, it gives the findings of some patients and says nothing of the rest, which looks
like "no problem" for them. The files themselves cannot tell: each one on disk is complete (they
are verified before they are moved there); only the state file knows what the manifest listed.
Likewise the resources the server could not export (its error files, kept in the hidden state
directory that the reader skips): ``export`` names them once; ``evaluate`` names them again as
problems, rather than calling the export clean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from ..core.model import Problem
from ..errors import InputError
from ..files.reader import STDIN, walk_directory

__all__ = ["STATE_DIR", "STATE_FILE", "check_exports", "unfinished_export"]

log = logging.getLogger(__name__)

STATE_DIR = ".fhir-leuko"
STATE_FILE = "export.json"


def _state(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The export state recorded in ``directory`` (``None`` when there is none), or why it
    cannot be read."""
    path = directory / STATE_DIR / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"its state {path} cannot be read ({exc.strerror or exc})"
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"its state {path} is not JSON ({exc})"
    if not isinstance(state, dict):
        return None, f"its state {path} is not a JSON object"
    return state, None


def unfinished_export(directory: Path) -> str | None:
    """Why the export recorded in ``directory`` is not complete, or ``None`` when it is complete
    or ``directory`` holds no export state (any other directory of NDJSON)."""
    state, unreadable = _state(directory)
    return unreadable if state is None else _unfinished(state)


def _unfinished(state: dict[str, Any]) -> str | None:
    if state.get("complete") is True:
        return None
    manifest = state.get("manifest")
    if not isinstance(manifest, dict):
        return "the server had not finished it when it stopped: no file was listed yet"
    outputs = manifest.get("output")
    listed = len(outputs) if isinstance(outputs, list) else 0
    files = state.get("files")
    downloaded = len(files) if isinstance(files, dict) else 0
    return f"{downloaded} of the {listed} files the server listed were downloaded"


def _not_as_verified(state: dict[str, Any], directory: Path) -> str | None:
    """Why a complete export's files are no longer what it downloaded and verified: one missing
    (removed, moved) or of another size (cut short by a copy), or ``None``. A file gzipped since
    (``.ndjson.gz``) is taken as it is: its size cannot be compared."""
    files = state.get("files")
    for entry in files.values() if isinstance(files, dict) else []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name:
            continue
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if (directory / f"{name}.gz").is_file():
                continue
            return f"its file {name} is missing (removed or moved since it was downloaded)"
        except OSError as exc:
            return f"its file {name} cannot be read ({exc.strerror or exc})"
        if isinstance(entry.get("size"), int) and size != entry["size"]:
            return (
                f"its file {name} has {size:,} bytes, {entry['size']:,} when it was downloaded and "
                "verified"
            )
    return None


def check_exports(paths: Iterable[Path], *, same_source: bool = False) -> list[Problem]:
    """Check the directories read (given, or inside one given, as the reader walks them) that
    hold an export of ``fhir-leuko export``; the problems of the complete ones: each issue of the
    server's error files, a resource the server did not export (``export`` reported them; a later
    ``evaluate`` must not call the export clean). Logs a warning for an incremental export
    (``_since``: the patients' earlier results are not in it) and, unless ``same_source``, for
    PATHs holding exports of the same server (read as sources of their own, a patient in both is
    two patients, with two sets of findings).

    Raises:
        InputError: an export did not finish, or one of its files is missing or changed since it
            was verified: its patients in the files not there would get no finding and no word
            (the module docstring). Files named one by one are the user's choice and read as
            they are.
    """
    problems: list[Problem] = []
    servers: dict[str, list[str]] = {}  # a server -> the PATHs holding an export of it
    for path in paths:
        if path == STDIN or not path.is_dir():
            continue
        for directory, _files in walk_directory(path):
            root = str(directory)
            state, unreadable = _state(directory)
            why = unreadable if state is None else _unfinished(state)
            if why is not None:
                raise InputError(
                    f"{root} holds an export that is not complete ({why}): evaluating it would "
                    "say nothing of the patients in the files not downloaded. Run the same "
                    "'fhir-leuko export' again to finish it (it resumes where it stopped), or "
                    "name the files to evaluate only them"
                )
            if state is None:
                continue
            changed = _not_as_verified(state, directory)
            if changed is not None:
                raise InputError(
                    f"{root} holds an export that is no longer whole ({changed}): evaluating it "
                    "would say nothing of the patients in what is not there. Export again into "
                    "an empty directory (the server has let this export go), or name the files "
                    "to evaluate only them"
                )
            errors = state.get("server_errors")
            for error in errors if isinstance(errors, list) else []:
                problems.append(
                    Problem(
                        str(directory / STATE_DIR / "errors"),
                        f"the server could not export it ({error}): it is not in the export, "
                        "so it is not evaluated",
                    )
                )
            server = state.get("server")
            if isinstance(server, str) and str(path) not in servers.setdefault(server, []):
                servers[server].append(str(path))
            request = state.get("request")
            since = request.get("since") if isinstance(request, dict) else None
            if since:
                log.warning(
                    "%s is an incremental export (_since %s): it holds what changed since then, "
                    "not the patients' earlier results, so a finding that needs them (a low "
                    "count still within its lookback, a trend) is not seen. Screen with a full "
                    "export, or use 'fhir-leuko run --bulk', which reads the whole record of "
                    "each patient who changed from the server",
                    root,
                    since,
                )
    for server, given in servers.items():
        if len(given) > 1 and not same_source:
            log.warning(
                "%s hold exports of the same server (%s), read as sources of their own: a "
                "patient in both is two patients, with two sets of findings. Evaluate the latest "
                "export alone, or give --same-source to read them as one (the latest version of "
                "each resource counts; what the server deleted in between stays)",
                " and ".join(given),
                server,
            )
    return problems
