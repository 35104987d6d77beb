"""Reading profile and knowledge documents (TOML or YAML) from disk, with errors that name file and
field: the shipped ``profiles/`` directory, site profile directories and the knowledge files.

The rule core validates and compiles what is read here
(:func:`fhir_leuko.core.knowledge.compile_knowledge`, :func:`fhir_leuko.core.profiles.build_profiles`);
this module only finds and reads the files.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from ..core.knowledge import (
    KNOWLEDGE_FILES,
    ConditionsFile,
    DrugsFile,
    Knowledge,
    LoincFile,
    UnitsFile,
    compile_knowledge,
)
from ..core.profiles import Profile, ProfileDocuments, ProfileSet, build_profiles
from ..core.validation import validate_document
from ..errors import ProfileError

__all__ = [
    "DOCUMENT_SUFFIXES",
    "collect_profile_documents",
    "load_document",
    "load_knowledge",
    "load_profiles",
    "shipped_profiles_dir",
    "validate_profile_dir",
]

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


def _read(path: Path, model: type[_Model]) -> _Model:
    return validate_document(model, load_document(path), str(path))


def load_knowledge(directory: Path | None = None) -> Knowledge:
    """Load and compile the knowledge files from ``directory`` (default: the shipped ones).

    Raises:
        ProfileError: a file is missing or invalid; the message names the file and the field.
    """
    base = directory or shipped_profiles_dir() / "knowledge"
    files = {name: base / f"{name}.toml" for name in KNOWLEDGE_FILES}
    for path in files.values():
        if not path.is_file():
            raise ProfileError(str(path), "", "knowledge file not found")
    # Read and validated one after the other, so the first broken file is the one reported.
    return compile_knowledge(
        loinc=_read(files["loinc"], LoincFile),
        units=_read(files["units"], UnitsFile),
        drugs=_read(files["drugs"], DrugsFile),
        conditions=_read(files["conditions"], ConditionsFile),
    )


def collect_profile_documents(
    directories: Sequence[Path], *, file_too: bool = False
) -> tuple[ProfileDocuments, list[ProfileError]]:
    """Profile documents by id; a later directory's profile replaces an earlier one with its id.

    ``file_too``: an entry may also be a single profile file (``profiles validate FILE``).
    """
    documents: ProfileDocuments = {}
    errors: list[ProfileError] = []
    for directory in directories:
        try:
            files = _profile_files(directory, file_too=file_too)
        except ProfileError as exc:
            errors.append(exc)
            continue
        seen_here: dict[str, Path] = {}
        for path in files:
            try:
                document = load_document(path)
            except ProfileError as exc:
                errors.append(exc)
                continue
            profile_id = document.get("id")
            if not isinstance(profile_id, str) or not profile_id:
                errors.append(ProfileError(str(path), "id", "required field is missing"))
                continue
            if profile_id in seen_here:
                errors.append(
                    ProfileError(
                        str(path),
                        "id",
                        f"id {profile_id!r} is also used by {seen_here[profile_id]}",
                    )
                )
                continue
            seen_here[profile_id] = path
            documents[profile_id] = (document, path)
    return documents, errors


def _profile_files(directory: Path, *, file_too: bool = False) -> list[Path]:
    """The profile files of a directory (or, with ``file_too``, the one profile file given)."""
    if file_too and directory.is_file():
        if directory.suffix not in DOCUMENT_SUFFIXES:
            suffixes = ", ".join("*" + s for s in DOCUMENT_SUFFIXES)
            raise ProfileError(str(directory), "", f"not a profile file ({suffixes})")
        return [directory]
    if not directory.is_dir():
        raise ProfileError(str(directory), "", "not a directory")
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in DOCUMENT_SUFFIXES and not p.name.startswith(".")
    )


def load_profiles(knowledge: Knowledge, site_dirs: Sequence[Path] = ()) -> ProfileSet:
    """The shipped profiles, then each site directory: a site profile with a shipped id replaces it.

    Raises:
        ProfileError: the first invalid file, naming the file and the field.
    """
    documents, errors = collect_profile_documents([shipped_profiles_dir(), *site_dirs])
    if errors:
        raise errors[0]
    loaded, errors = build_profiles(documents, knowledge)
    if errors:
        raise errors[0]
    if not loaded:
        raise ProfileError(str(shipped_profiles_dir()), "", "no profiles found")
    return ProfileSet(loaded, knowledge)


def validate_profile_dir(
    path: Path, knowledge: Knowledge
) -> tuple[list[Profile], list[ProfileError]]:
    """Check every profile file of a site directory, or one profile file (it may extend the
    shipped profiles).

    Every error of every file is returned, not only the first.
    """
    shipped, _ = collect_profile_documents([shipped_profiles_dir()])
    site, errors = collect_profile_documents([path], file_too=True)
    site_paths = {p for _doc, p in site.values()}
    loaded, build_errors = build_profiles(
        {**shipped, **site}, knowledge, only=site_paths, every_error=True
    )
    return [lp.profile for lp in loaded], errors + build_errors
