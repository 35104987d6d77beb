"""``fhir-leuko serve``: run the CDS Hooks 2.0 service with uvicorn.

The service lives in :mod:`fhir_leuko.service` and needs the ``service`` extra; it is imported only
when this command runs, so the rest of the command line works without it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["register"]

_DESCRIPTION = """\
Run the CDS Hooks 2.0 service: GET /cds-services (discovery), POST /cds-services/{id} for the
patient-view, order-select and order-sign services, POST /cds-services/{id}/feedback. Every
request must carry a JWT from a configured client (ES384 or RS384). The OpenAPI document is at
/openapi.json. Configuration: the [service] table of --config FILE and FHIR_LEUKO_SERVICE_*
environment variables (docs/cds-hooks.md; example: examples/cds/service.toml).
"""

_EPILOG = """\
examples:
  fhir-leuko serve --config /etc/fhir-leuko/service.toml
  fhir-leuko serve --config service.toml --host 0.0.0.0 --port 8443   # behind a TLS proxy
  FHIR_LEUKO_SERVICE_PUBLIC_BASE_URL=https://cds.example.org fhir-leuko serve --config service.toml

Requests are logged (-v) with service, hookInstance, iss, tenant and jti; never tokens or patient
data. The service itself speaks plain HTTP: put it behind TLS (CDS Hooks requires https).
"""


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the CDS Hooks service (patient-view, order-select, order-sign)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", help="interface to listen on (default: [service] host, else 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, help="TCP port (default: [service] port, else 8080)")
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML file with a [service] table (default: FHIR_LEUKO_SERVICE_* variables only)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..service import create_app, load_settings
    except ImportError as exc:
        raise UsageError(
            f"the CDS Hooks service needs the service extra (missing module {exc.name!r}): "
            "pip install 'fhir-leuko[service]'"
        ) from None
    settings = load_settings(args.config)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    # The service logs one line per request at INFO; show them unless the user asked for less.
    service_log = logging.getLogger("fhir_leuko")
    if service_log.getEffectiveLevel() > logging.INFO:
        service_log.setLevel(logging.INFO)
    app = create_app(settings)
    # Everything loaded so far (knowledge, profiles, the FHIR models) lives as long as the process:
    # keep it out of the garbage collector's full passes, which otherwise show as latency spikes
    # of tens of milliseconds on hook calls (benchmarks/README.md, "cds").
    gc.collect()
    gc.freeze()
    print(
        f"fhir-leuko: CDS Hooks service listening on http://{host}:{port}/cds-services "
        f"(clients call {settings.public_base_url or '(JWT disabled)'}/cds-services)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=host, port=port, server_header=False, log_level="info")
    return 0
