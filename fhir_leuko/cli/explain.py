"""``fhir-leuko explain PATIENT PATH...``: why one patient got (or did not get) a finding."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from ..core.model import PatientRecord
from ..core.normalise import Dataset
from ..core.pipeline import LATEST, trace_patient
from ..errors import ExitCode, UsageError
from ..fhir.exportstate import check_exports
from ..files.bulkread import normalise_files
from ..files.reader import input_files
from ..present.explain import PatientExplanation, explain_text
from .options import add_as_of, add_profile_options, as_of_or_latest, profiles_from

__all__ = ["find_patient", "register"]

_HELP = "explain one patient's results and decisions: what counted, what did not and why"

_EPILOG = """\
Reads the same input as 'fhir-leuko evaluate' and shows, for one patient: every white-cell result
that was read, which one counted for each finding kind and why the others did not (status,
lookback, superseded by a later result, a part of a count; or, for results that could not be used
at all, the unit, value or status problem), the profile that decided and those passed over, the
lower limit with its source, the grade bands, the implicated drugs and the decision. It answers
"why did this patient get no alert?" with the evaluator's own decisions.

PATIENT is 'Patient/123' or '123' (or the subject reference as the input gives it when there is
no Patient resource). When several sources each have a Patient/123, name one as evaluate's output
does (SOURCE|Patient/123).

examples:
  fhir-leuko explain Patient/123 export/ --as-of 2024-05-01
  fhir-leuko explain 123 export/ --as-of latest

exit codes:
  0  explained (the input was read cleanly)
  1  explained, but some input had problems (printed on stderr)
  2  a usage error: no such patient in the input, bad option, missing path
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "explain",
        help=_HELP,
        description=f"Explain one patient ({_HELP}).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("patient", metavar="PATIENT", help="Patient/123 or 123")
    parser.add_argument("paths", metavar="PATH", nargs="+", type=Path, help="files or directories")
    add_as_of(parser, latest=True)
    add_profile_options(parser)
    parser.add_argument(
        "--same-source",
        action="store_true",
        help="read all PATHs as one source, as 'fhir-leuko evaluate --same-source'",
    )
    parser.set_defaults(handler=run)


def find_patient(dataset: Dataset, text: str) -> str:
    """The patient key ``text`` names: ``Patient/123``, ``123``, or a key as given.

    Raises:
        UsageError: no patient, or more than one (each listed), matches.
    """
    wanted = text.strip()
    keys = set(dataset.patients) | set(dataset.unused)
    if wanted in keys:
        return wanted
    pid = wanted.removeprefix("Patient/")
    matches = sorted(
        k
        for k in keys
        if k == f"Patient/{pid}" or k.endswith((f"/Patient/{pid}", f"|Patient/{pid}"))
    )
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"{text!r} names more than one patient: {', '.join(matches)}; give one")
    raise UsageError(
        f"no patient {text!r} with white-cell results in the input ({len(keys)} patients read)"
    )


def run(args: argparse.Namespace) -> int:
    gc.disable()  # a batch read, as in evaluate
    as_of = as_of_or_latest(args)
    knowledge, profiles = profiles_from(args)
    files = input_files(args.paths, same_source=args.same_source)
    export_problems = check_exports(args.paths, same_source=args.same_source)
    dataset = normalise_files(files, knowledge)
    key = find_patient(dataset, args.patient)
    record = dataset.patients.get(key) or PatientRecord(key)
    when, _findings, decisions = trace_patient(record, profiles, as_of=as_of)
    unused = dataset.unused.get(key, [])
    keys = {u.key for u in unused}
    data = PatientExplanation(
        record=record,
        as_of=when,
        latest=as_of == LATEST,
        decisions=decisions,
        unused=unused,
        problems=[p for p in dataset.problems if p.resource in keys],
        profiles=[(p.id, p.version) for p in profiles.profiles],
    )
    sys.stdout.write(explain_text(data))
    sys.stdout.flush()
    for problem in export_problems:  # any could be this patient's: the server does not say
        print(f"problem: {problem}", file=sys.stderr)
    if dataset.problems:
        print(
            f"fhir-leuko: input problems: {len(dataset.problems)} "
            "('fhir-leuko evaluate' lists them)",
            file=sys.stderr,
        )
    return int(ExitCode.INPUT_PROBLEMS if dataset.problems or export_problems else ExitCode.OK)
