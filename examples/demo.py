"""The README's main command (``./dev demo``): the scheduled job against a real local FHIR server.

1. starts a FHIR R4 server (sekmet-fhir, a pip package) on 127.0.0.1 with an empty private store;
2. loads the hand-written example patients of ``examples/`` into it (``ward/*.json`` Bundles and the
   ``bulk-export/*.ndjson(.gz)`` files);
3. runs one pass of ``fhir-leuko run`` as of 2026-11-20 (the examples are dated around that day);
4. reads the DetectedIssues back from the server and prints them, one line each;
5. evaluates everyone again (``--full``) to show that nothing is written twice.

Extra arguments are passed to ``fhir-leuko run`` (e.g. ``--log-format json``). The server and its
data are removed at the end; with ``--keep`` (``./dev demo --keep``) the server keeps running until
Ctrl-C, and the demo prints how to explore it: curl lines, ``run`` again, and ``serve`` against it.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

import requests

from fhir_leuko.cli import main
from fhir_leuko.core.detectedissue import FINDING_SYSTEM
from fhir_leuko.testing.seed import seed_paths
from fhir_leuko.testing.sekmet import SekmetServer, free_port

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


def _service_config(tmp: Path, base_url: str) -> tuple[Path, int]:
    """A CDS Hooks service configuration that may fetch from the demo server (local tests only)."""
    port = free_port()
    path = tmp / "service.toml"
    path.write_text(
        "# Written by ./dev demo --keep: LOCAL TESTS ONLY (no JWT, http allowed, fixed as-of).\n"
        "[service]\n"
        f"port = {port}\n"
        f'feedback_database = "{tmp / "cds-feedback.sqlite3"}"\n'
        "[[service.clients]]\n"
        'iss = "demo"\n'
        'jwks_url = "http://127.0.0.1:9/unused-jwks.json"\n'
        f'fhir_servers = ["{base_url}"]\n'
        "[service.testing]\n"
        "disable_jwt = true\n"
        "allow_http = true\n"
        f"as_of = {AS_OF}T12:00:00Z\n",
        encoding="utf-8",
    )
    return path, port


def _explore(tmp: Path, base_url: str, run_args: list[str]) -> None:
    """Print how to explore the demo server while it keeps running."""
    config, port = _service_config(tmp, base_url)
    fhir_leuko = shlex.quote(str(Path(sys.executable).parent / "fhir-leuko"))
    hook = json.dumps(
        {
            "hook": "patient-view",
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "fhirServer": base_url,
            "fhirAuthorization": {
                "access_token": "demo",
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "demo",
            },
            "context": {"userId": "Practitioner/demo", "patientId": "ex-cloz-1"},
        }
    )
    print(
        f"""
demo: the FHIR server keeps running at {base_url} until you press Ctrl-C
      (it and its data in {tmp} are removed then). In another terminal:

  # what is on the server
  curl -s '{base_url}/DetectedIssue?_count=5' -H 'Accept: application/fhir+json'
  curl -s '{base_url}/Observation?patient=ex-cloz-1&_sort=-date&_count=3'
  curl -s '{base_url}/metadata' | head -c 300

  # the job again (incremental: nothing changed, nothing is written)
  {fhir_leuko} {" ".join(shlex.quote(a) for a in run_args)}

  # the CDS Hooks service against this server (no JWT: local tests only), then a patient-view call
  # that sends no prefetch, so the service fetches the patient's data from the demo server
  {fhir_leuko} serve --config {config}
  curl -s http://127.0.0.1:{port}/cds-services/leuko-patient-view \\
       -H 'Content-Type: application/json' --data '{hook}'
""",
        flush=True,
    )


def demo(extra: list[str]) -> int:
    keep = "--keep" in extra
    extra = [a for a in extra if a != "--keep"]
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
        code = main(again)
        if keep and code == 0:
            _explore(Path(tmp), server.base_url, args)
            # SIGTERM as Ctrl-C, so that the server and the temporary directory are removed too.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print("\ndemo: stopping the FHIR server and removing its data", flush=True)
        return code


if __name__ == "__main__":
    sys.exit(demo(sys.argv[1:]))
