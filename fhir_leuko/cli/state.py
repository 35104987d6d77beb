"""``fhir-leuko state show|ledger|reset``: the scheduled job's state file without opening SQLite by
hand. Patients are shown by the pseudonym the logs use, never by their reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from ..core.detectedissue import issue_id
from ..core.model import FindingKind
from ..errors import ExitCode, LockError, UsageError, exit_code_table
from ..job.config import load_job_config, resolve_state_path
from ..job.patients import as_patient, pseudonym
from ..job.state import State, server_key

__all__ = ["register"]

_EPILOG = (
    """\
examples:
  fhir-leuko state show                                 # every server in the state file
  fhir-leuko state show --server https://ehr.example.org/fhir --passes 20 --json
  fhir-leuko state ledger pt-3fa2c1d9e0                 # the pseudonym a log line named
  fhir-leuko state ledger Patient/123 --server https://ehr.example.org/fhir
  fhir-leuko state reset --server https://ehr.example.org/fhir

The state file is the one run and watch use: --state FILE, else state.sqlite3 in --state-dir DIR
(FHIR_LEUKO_STATE_DIR; default $XDG_STATE_HOME/fhir-leuko, ~/.local/state/fhir-leuko), or [state]
of --config FILE. See docs/scheduled-job.md, "The state file".

"""
    + exit_code_table(
        (ExitCode.OK, ExitCode.USAGE, ExitCode.LOCKED, ExitCode.INTERNAL),
        "stopped by signal N (130 Ctrl-C)",
    )
)


def _add_state_options(parser: argparse.ArgumentParser, *, server_required: bool = False) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        required=server_required,
        help="the FHIR server (its base URL, as run was given it)"
        + ("" if server_required else "; default: every server in the state file"),
    )
    parser.add_argument("--state", metavar="FILE", type=Path, help="the state file")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="the state directory (FHIR_LEUKO_STATE_DIR; default ~/.local/state/fhir-leuko)",
    )
    parser.add_argument("--config", metavar="FILE", type=Path, help="a TOML configuration file")


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "state",
        help="show the job's state (watermark, passes, a patient's ledger) or reset it",
        description="The scheduled job's state file: show it, a patient's ledger, or reset a "
        "server's progress.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="the watermark, pending patients, the lock and the last passes of each server",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_state_options(show)
    show.add_argument("--passes", metavar="N", type=int, default=10, help="last passes (10)")
    show.add_argument("--json", action="store_true", help="one JSON document on stdout")
    show.set_defaults(handler=_show)
    ledger = actions.add_parser(
        "ledger",
        help="what the job wrote for one patient (by pseudonym, reference or id)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ledger.add_argument(
        "patient",
        metavar="PATIENT",
        help="the pseudonym of a log line (pt-…), or Patient/ID, or an id",
    )
    _add_state_options(ledger)
    ledger.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ledger.set_defaults(handler=_ledger)
    reset = actions.add_parser(
        "reset",
        help="forget a server's watermark, seen versions and pending patients (asks first)",
        description="Forget a server's progress: its watermark, the versions seen in the "
        "overlap and the pending patients. The next pass is a first pass (every patient with labs "
        "in the lookback); nothing is written twice (every write is conditional). The ledgers "
        "of passes and writes are kept, and the reset is recorded in them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_state_options(reset, server_required=True)
    reset.add_argument("--yes", action="store_true", help="do not ask (scripts)")
    reset.set_defaults(handler=_reset)


def _open(args: argparse.Namespace, *, create: bool = False) -> State:
    flags = {"state": {k: v for k, v in (("path", args.state), ("dir", args.state_dir)) if v}}
    path = resolve_state_path(load_job_config(flags, args.config))
    if not path.exists() and not create:
        raise UsageError(f"no state file at {path} (no pass has run with it; see --state, --state-dir)")
    return State(path)


def _servers(state: State, given: str | None) -> list[str]:
    known = state.servers()
    if given is None:
        return known
    server = server_key(given)
    if server not in known:
        listed = ", ".join(known) or "none"
        raise UsageError(f"{server}: not in the state file {state.path} (servers: {listed})")
    return [server]


def _counts(run: dict[str, Any]) -> dict[str, Any]:
    counts = run.get("counts")
    if not counts:
        return {}
    try:
        parsed = orjson.loads(counts)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _server_view(state: State, server: str, passes: int) -> dict[str, Any]:
    lock = state.lock_holder(server)
    runs = state.runs(server)[-passes:] if passes > 0 else []
    return {
        "server": server,
        "watermark": state.watermark(server),
        "last_success": state.last_success(server),
        "pending": [
            {"patient": pseudonym(server, p["patient"]), "attempts": p["attempts"], "since": p["since"], "reason": p["reason"]}
            for p in state.pending_rows(server)
        ],
        "lock": None if lock is None else {"host": lock.host, "pid": lock.pid, "since": lock.acquired_at},
        "passes": [
            {
                "id": r["id"],
                "mode": r["mode"],
                "status": r["status"],
                "started_at": r["started_at"],
                "finished_at": r["finished_at"],
                "as_of": r["as_of"],
                "watermark_from": r["watermark_from"],
                "watermark_to": r["watermark_to"],
                **{k: v for k, v in _counts(r).items() if k in _PASS_COUNTS},
            }
            for r in reversed(runs)
        ],
    }


_PASS_COUNTS = ("written", "updated", "resolved", "unchanged", "patients_scanned", "patients_failed", "input_problems", "http_requests")


def _show(args: argparse.Namespace) -> int:
    if args.passes < 0:
        raise UsageError("--passes must be 0 or more")
    with _open(args) as state:
        views = [_server_view(state, s, args.passes) for s in _servers(state, args.server)]
        if args.json:
            document = {"state_file": str(state.path), "schema": state.schema, "servers": views}
            sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
            return int(ExitCode.OK)
        print(f"state file: {state.path} (schema {state.schema})")
        if not views:
            print("no server yet: no pass has been recorded")
        for view in views:
            _print_view(view)
    return int(ExitCode.OK)


def _print_view(view: dict[str, Any]) -> None:
    print(f"\nserver {view['server']}")
    print(f"  watermark:    {view['watermark'] or '- (the next pass is a first pass)'}")
    print(f"  last success: {view['last_success'] or '-'}")
    lock = view["lock"]
    print(f"  lock:         {'free' if lock is None else 'held by ' + lock['host'] + ' pid ' + str(lock['pid']) + ' since ' + lock['since']}")
    pending = view["pending"]
    print(f"  pending:      {len(pending)} patient(s)")
    for p in pending[:20]:
        print(f"    {p['patient']}  {p['attempts']} attempt(s) since {p['since']}: {p['reason'][:160]}")
    if len(pending) > 20:
        print(f"    ... and {len(pending) - 20} more (--json lists all)")
    if not view["passes"]:
        return
    print("  last passes (newest first):")
    for run in view["passes"]:
        counts = ", ".join(
            f"{run[k]} {k.replace('_', ' ')}" for k in ("written", "updated", "resolved", "patients_failed") if k in run
        )
        ended = run["finished_at"] or "(running, or stopped dead)"
        print(f"    #{run['id']:<5} {run['mode']:<11} {run['status']:<11} {run['started_at']} -> {ended}  {counts}")


def _ledger(args: argparse.Namespace) -> int:
    given = args.patient.strip()
    with _open(args) as state:
        found: list[dict[str, Any]] = []
        for server in _servers(state, args.server):
            if given.startswith("pt-"):
                alias, reference = given, state.patient_of(server, given)
            else:
                reference = as_patient(given)
                if reference is None:
                    raise UsageError(f"{given!r}: give a pseudonym (pt-…), Patient/ID or an id")
                alias = pseudonym(server, reference)
            identifiers = [issue_id(reference, kind) for kind in FindingKind] if reference else []
            rows = state.ledger(server, alias, identifiers)
            pending = next((p for p in state.pending_rows(server) if pseudonym(server, p["patient"]) == alias), None)
            if rows or pending is not None:
                found.append({"server": server, "patient": alias, "pending": _pending(pending), "written": rows})
        if args.json:
            sys.stdout.buffer.write(orjson.dumps({"patient": given, "ledgers": found}, option=orjson.OPT_INDENT_2) + b"\n")
            return int(ExitCode.OK)
        if not found:
            print(f"nothing recorded for {given} in {state.path}")
            return int(ExitCode.OK)
        for entry in found:
            print(f"patient {entry['patient']} on {entry['server']}")
            pending = entry["pending"]
            if pending:
                print(f"  pending: {pending['attempts']} attempt(s) since {pending['since']}: {pending['reason'][:160]}")
            for row in entry["written"]:
                version = f" v{row['version']}" if row["version"] else ""
                finding = row["finding"] or "-"
                print(f"  {row['at']}  pass #{row['run_id']}  {row['action']:<8} {finding:<13} DetectedIssue/{row['resource_id']}{version}")
    return int(ExitCode.OK)


def _pending(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"attempts": row["attempts"], "since": row["since"], "reason": row["reason"]}


def _reset(args: argparse.Namespace) -> int:
    with _open(args) as state:
        (server,) = _servers(state, args.server)
        holder = state.lock_holder(server)
        if holder is not None:
            raise LockError(
                f"{server}: a run holds the lock (host {holder.host}, pid {holder.pid}, since "
                f"{holder.acquired_at}); stop it first"
            )
        pending = len(state.pending_rows(server))
        print(
            f"reset {server} in {state.path}:\n"
            f"  forget the watermark ({state.watermark(server) or 'none'}), the versions seen in "
            f"the overlap and {pending} pending patient(s);\n"
            "  the next pass is a first pass (every patient with labs in the lookback); the "
            "ledgers are kept.",
            file=sys.stderr,
        )
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError("state reset: not confirmed (no terminal to ask on): add --yes")
            answer = input("Type 'reset' to confirm: ")
            if answer.strip() != "reset":
                print("state reset: not confirmed; nothing changed", file=sys.stderr)
                return int(ExitCode.USAGE)
        state.reset(server)
        print(f"state reset: {server}: done", file=sys.stderr)
    return int(ExitCode.OK)
