"""The README's main command (``./dev demo``): the scheduled job against a real local FHIR server.

1. starts a FHIR R4 server (sekmet-fhir, a pip package) on 127.0.0.1 with an empty private store;
2. loads the hand-written example patients of ``examples/`` into it (``ward/*.json`` Bundles and the
   ``bulk-export/*.ndjson(.gz)`` files);
3. runs one pass of ``fhir-leuko run`` as of 2026-11-20 (the examples are dated around that day);
4. reads the DetectedIssues back from the server and prints them, one line each;
5. evaluates everyone again (``--full``) to show that nothing is written twice.

Extra arguments are passed to ``fhir-leuko run`` (e.g. ``--log-format json``). The server and its
data are removed at the end.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import requests

from fhir_leuko.cli import main
from fhir_leuko.core.detectedissue import FINDING_SYSTEM
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer

EXAMPLES = Path(__file__).resolve().parent
AS_OF = "2026-11-20"


def _show_issues(base_url: str) -> int:
    response = requests.get(
        f"{base_url}/DetectedIssue",
        params={"code": f"{FINDING_SYSTEM}|", "_count": "100"},
        headers={"Accept": "application/fhir+json"},
        timeout=30,
    )
    response.raise_for_status()
    entries = [e["resource"] for e in response.json().get("entry", [])]
    entries.sort(key=lambda r: (r["patient"]["reference"], r["code"]["coding"][1]["code"]))
    print(f"\nDetectedIssues on the server ({len(entries)}), read back with GET DetectedIssue:")
    for issue in entries:
        finding = issue["code"]["coding"][1]["code"]
        first = issue["detail"].splitlines()[0]
        print(
            f"  DetectedIssue/{issue['id'][:8]}… v{issue['meta']['versionId']} {issue['status']:7} "
            f"{issue['severity']:8} {issue['patient']['reference']:22} {finding:12} {first}"
        )
    return len(entries)


def demo(extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="fhir-leuko-demo-") as tmp, SekmetServer(
        Path(tmp) / "server"
    ) as server:
        print(f"demo: FHIR server (sekmet-fhir) at {server.base_url}")
        count = seed_paths(server.base_url, [EXAMPLES / "ward", EXAMPLES / "bulk-export"])
        print(f"demo: loaded {count} example resources from examples/ward and examples/bulk-export")
        args = [
            "run",
            "--server",
            server.base_url,
            "--as-of",
            AS_OF,
            "--state",
            str(Path(tmp) / "state.sqlite3"),
            *extra,
        ]
        print(f"\n$ fhir-leuko {' '.join(args)}", flush=True)
        code = main(args)
        if code != 0:
            return code
        _show_issues(server.base_url)
        again = [*args, "--full"]
        print(f"\n$ fhir-leuko {' '.join(again)}   # everyone again: nothing is written twice", flush=True)
        return main(again)


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
