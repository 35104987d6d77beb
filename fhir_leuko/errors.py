"""The one exception tree of fhir-leuko, and the exit codes the CLI maps it to.

Library code raises these; only the edges translate them: ``cli.py`` into exit codes, the CDS
service into HTTP statuses. Exit code numbers are part of the command-line contract (other tools
script against them), so a number is never reused for a different meaning.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented process exit codes."""

    OK = 0
    """All input was read cleanly (and, for ``run``, every patient was written)."""
    INPUT_PROBLEMS = 1
    """Some input had problems (or some patients failed); everything valid was still processed."""
    USAGE = 2
    """A usage or configuration error: nothing was processed."""


class FhirLeukoError(Exception):
    """Base class of every error fhir-leuko raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(FhirLeukoError):
    """The command line or a configuration value is wrong."""

    exit_code = ExitCode.USAGE


class ProfileError(FhirLeukoError):
    """A profile or knowledge file is invalid. The message names the file and the field."""

    exit_code = ExitCode.USAGE

    def __init__(self, file: str, field: str, reason: str) -> None:
        self.file = file
        self.field = field
        self.reason = reason
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {reason}")


class InputError(FhirLeukoError):
    """An input file cannot be read at all (missing path, permission)."""

    exit_code = ExitCode.USAGE
