"""The one exception tree of fhir-leuko, and the exit codes the CLI maps it to.

Library code raises these; only the edges translate them: ``fhir_leuko.cli`` into exit codes, the
CDS service into HTTP statuses. Exit code numbers are part of the command-line contract (schedulers
and scripts act on them), so they are stable: a number keeps its meaning, and a code that is no
longer used is listed in :data:`RETIRED_EXIT_CODES` so that its number is never given another
meaning (the rule cumulus-etl's ``errors.py`` follows).
"""

from __future__ import annotations

import enum
import textwrap


class ExitCode(enum.IntEnum):
    """Documented process exit codes (``fhir-leuko --help``, README, docs/scheduled-job.md); what
    each means is :attr:`meaning`.

    ``evaluate`` uses 0, 1, 2, 3 (workers only) and 70; ``profiles`` 0, 1, 2 and 70; ``run`` all
    but 5; ``serve`` 0, 2, 5 and 70.
    A process stopped by signal N exits 128 + N, as shells report it (130 Ctrl-C, 143 SIGTERM).
    """

    OK = 0
    INPUT_PROBLEMS = 1
    USAGE = 2
    INCOMPLETE = 3
    LOCKED = 4
    CANNOT_LISTEN = 5
    INTERNAL = 70  # EX_SOFTWARE of sysexits.h

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "clean: all input was read (run: every patient evaluated and written)",
    ExitCode.INPUT_PROBLEMS: "input problems only, each reported; everything valid was evaluated "
    "(run: and written)",
    ExitCode.USAGE: "usage or configuration error (bad option, missing file, invalid profile, "
    "refused credentials); nothing was evaluated",
    ExitCode.INCOMPLETE: "run: some patients failed or the pass stopped early (server "
    "unavailable); the rest was written and the failed patients are retried next pass; "
    "evaluate: a worker process or the Dask cluster was lost before the end; nothing was "
    "written",
    ExitCode.LOCKED: "run: another run holds this server's lock; nothing was done",
    ExitCode.CANNOT_LISTEN: "serve: cannot listen on the host and port (in use, or not "
    "allowed); nothing was served",
    ExitCode.INTERNAL: "an unexpected error (a bug): one line names it, -vv shows the traceback",
}

RETIRED_EXIT_CODES: dict[int, str] = {}
"""Numbers no longer used, with what they meant: never given another meaning."""


def exit_code_table(codes: tuple[ExitCode, ...], signals: str) -> str:
    """The ``exit codes:`` section of a command's ``--help``: ``codes`` and what a signal does."""
    lines = ["exit codes:"]
    rows = [(str(int(code)), code.meaning) for code in codes] + [("128+N", signals)]
    for number, meaning in rows:
        lines.extend(
            textwrap.wrap(meaning, 96, initial_indent=f"  {number:<6} ", subsequent_indent=" " * 9)
        )
    return "\n".join(lines) + "\n"


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


class ListenError(FhirLeukoError):
    """``serve`` cannot listen on its host and port (in use, not allowed, no such address)."""

    exit_code = ExitCode.CANNOT_LISTEN


class InputError(FhirLeukoError):
    """An input file cannot be read at all (missing path, permission)."""

    exit_code = ExitCode.USAGE


class WorkerLostError(FhirLeukoError):
    """A worker process or the Dask cluster was lost before its task was done (killed by the
    system, perhaps for memory; disconnected). Nothing was written; running again repeats the
    whole evaluation. Never "a bug": the cause is outside fhir-leuko."""

    exit_code = ExitCode.INCOMPLETE


class ExportWriteError(FhirLeukoError):
    """A Bulk Data export cannot be written to its directory (no space, not writable). What was
    downloaded and verified is kept, so the same command resumes once there is room: exit 3."""

    exit_code = ExitCode.INCOMPLETE


class WorkDirError(FhirLeukoError):
    """The work directory of a sharded run cannot be created, written or read (full, not writable,
    not shared with the workers). The setup's problem, never an input problem: exit code 2."""

    exit_code = ExitCode.USAGE


class StateError(FhirLeukoError):
    """The state file (watermarks, ledgers, lock) cannot be opened or has an unknown layout."""

    exit_code = ExitCode.USAGE


class LockError(FhirLeukoError):
    """Another run holds the single-writer lock for this server (and it is not stale)."""

    exit_code = ExitCode.LOCKED


class FhirError(FhirLeukoError):
    """A FHIR server request failed. The message carries the OperationOutcome text, if any.

    ``status`` is the HTTP status (``None`` for connection errors and timeouts); ``url`` has no
    query string (search parameters may name patients). One that ends a pass is exit code 3.
    """

    exit_code = ExitCode.INCOMPLETE

    def __init__(
        self, message: str, *, status: int | None = None, url: str = "", outcome: str = ""
    ) -> None:
        self.status = status
        self.url = url
        self.outcome = outcome
        super().__init__(message)


class FhirTemporaryError(FhirError):
    """The server stayed unavailable (429, 502-504, connection errors, timeouts) past the retry budget."""


class FhirFatalError(FhirError):
    """The server refused the request for good (a 4xx, a malformed or cyclic response)."""


class FhirConflictError(FhirFatalError):
    """412 Precondition Failed: the resource changed since it was read (If-Match), or a
    conditional create matched more than one resource."""


class PagingError(FhirFatalError):
    """A paged search could not be walked completely and stably: the server ignores ``_sort``,
    refuses to page past resources that share one ``meta.lastUpdated``, or returned fewer
    resources than it counts. The pass fails: never a silent success."""


class AuthError(FhirError):
    """Authentication failed for good (token endpoint refused, 401 after a token refresh).

    A configuration problem (credentials, keys, client registration): exit code 2.
    """

    exit_code = ExitCode.USAGE


# --- CDS Hooks service ------------------------------------------------------------------------
# The service maps these to HTTP statuses in one place (fhir_leuko/service/app.py); they carry no
# HTTP knowledge themselves. Their messages never contain a token, a JWT or patient data.


class ServiceError(FhirLeukoError):
    """A CDS Hooks request could not be answered (mapped to an HTTP status by the service)."""


class AuthenticationError(ServiceError):
    """The request's JWT is missing or invalid. The reason is logged, never sent to the client."""


class MalformedRequestError(ServiceError):
    """The request body or a field of it is not what CDS Hooks 2.0 requires."""


class UnknownServiceError(ServiceError):
    """No CDS service with this id."""


class RequestTooLargeError(ServiceError):
    """The request body is larger than the configured limit."""


class PrefetchUnavailableError(ServiceError):
    """Required FHIR data could be had neither from the prefetch nor from the client's FHIR server.

    ``missing`` maps each prefetch key to why it is missing (CDS Hooks 2.0: HTTP 412).
    """

    def __init__(self, missing: dict[str, str]) -> None:
        self.missing = dict(missing)
        keys = ", ".join(f"'{k}'" for k in sorted(self.missing))
        super().__init__(f"required prefetch data unavailable: {keys}")


class FhirFetchError(ServiceError):
    """Fetching from the CDS client's FHIR server failed (HTTP error, timeout, bad page).

    ``kind`` (for metrics): ``http`` (an error status), ``timeout`` (no answer in time, connection
    errors), ``refused`` (a link the service will not follow), ``invalid`` (an unusable answer).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class ServiceTimeoutError(ServiceError):
    """The request was not answered within the configured time."""
