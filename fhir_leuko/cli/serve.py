"""``fhir-leuko serve``: run the CDS Hooks 2.0 service with uvicorn.

The service lives in :mod:`fhir_leuko.service` and needs the ``service`` extra; it is imported only
when this command runs, so the rest of the command line works without it.

The listening socket is bound here, before uvicorn starts: a port in use (or a host that is not
this machine's) is one clear error line and exit code 5, printed before anything claims to be
listening, and the "listening" line is printed only once the socket listens.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import ExitCode, ListenError, UsageError, exit_code_table
from ..fhir.privacy import install_log_scrubbing, uvicorn_log_config
from .run import JsonFormatter

__all__ = ["bind", "register", "startup_line"]

_DESCRIPTION = """\
Run the CDS Hooks 2.0 service: GET /cds-services (discovery), POST /cds-services/{id} for the
patient-view, order-select and order-sign services, POST /cds-services/{id}/feedback. Every
request must carry a JWT from a configured client (ES384 or RS384). GET /healthz (liveness) and
GET /readyz (readiness) need no JWT and answer no configuration detail. The OpenAPI document is at
/openapi.json. Configuration: the [service] table of --config FILE and FHIR_LEUKO_SERVICE_*
environment variables (docs/cds-hooks.md; example: examples/cds/service.toml).
"""

_EPILOG = (
    """\
examples:
  fhir-leuko serve --config /etc/fhir-leuko/service.toml
  fhir-leuko serve --config service.toml --host 0.0.0.0 --port 8443   # behind a TLS proxy
  FHIR_LEUKO_SERVICE_PUBLIC_BASE_URL=https://cds.example.org fhir-leuko serve --config service.toml

Requests are logged (-v) with service, hookInstance, iss, tenant and jti; never tokens or patient
data: every log line (uvicorn's too, at any -v) names a patient only by a pseudonym (pt- and 10 hex
digits of a hash of the fhirServer and the reference), a FHIR server's error text is logged as its
OperationOutcome codes and a scrubbed text, and urllib3's request lines are silenced. The service
itself speaks plain HTTP: put it behind TLS (CDS Hooks requires https).

"""
    + exit_code_table(
        (ExitCode.OK, ExitCode.USAGE, ExitCode.CANNOT_LISTEN, ExitCode.INTERNAL),
        "stopped by signal N, after a graceful shutdown (143 SIGTERM, 130 Ctrl-C)",
    )
)


def _port(text: str) -> int:
    """A TCP port, 1-65535, as the configuration's ``port`` is checked."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


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
    parser.add_argument(
        "--port", type=_port, help="TCP port, 1-65535 (default: [service] port, else 8080)"
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML file with a [service] table (default: FHIR_LEUKO_SERVICE_* variables only)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="worker processes (default: [service] workers, else 1); they share the JWT replay "
        "cache, the card and feedback store and the metrics",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text (default) or one JSON object per line, uvicorn's included "
        "([service] log_format)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="the state directory shared with the job: the feedback database is "
        "cds-feedback.sqlite3 in it (FHIR_LEUKO_STATE_DIR; default ~/.local/state/fhir-leuko)",
    )
    parser.set_defaults(handler=_serve)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, as the host resolves).

    Raises:
        ListenError: the address is in use, not allowed, or not this machine's.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may reuse a port whose old connections are in TIME_WAIT; a
        # port another process listens on is still refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = ""
        if exc.errno is not None and exc.errno == getattr(socket, "EADDRINUSE", 98):
            hint = ": another process listens there (another fhir-leuko serve?); choose --port"
        elif port < 1024:
            hint = ": ports below 1024 need privileges; use a higher --port behind a proxy"
        raise ListenError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    return sock


def startup_line(host: str, port: int, public_base_url: str | None) -> str:
    """What ``serve`` prints once it listens: where, and the URL clients call."""
    where = f"http://{host}:{port}/cds-services"
    if public_base_url:
        return (
            f"fhir-leuko: CDS Hooks service listening on {where}; "
            f"clients call {public_base_url}/cds-services"
        )
    return f"fhir-leuko: CDS Hooks service listening on {where} (no JWT checked: local tests only)"


def _json_logging(verbose: int) -> None:
    """One JSON object per line on stderr (the job's format: ``time``, ``level``, ``logger``,
    ``message``), for the service's and uvicorn's loggers alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.INFO, handlers=[handler], force=True
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Patients as pseudonyms in every line, urllib3's request lines silenced (fhir/privacy.py).
    install_log_scrubbing()


def _uvicorn_logging(json_logs: bool) -> dict[str, Any]:
    """uvicorn's ``log_config``: none with JSON logs (its loggers propagate to the root handler),
    else its own configuration with the log scrubber on its handlers."""
    if json_logs:
        return {"log_config": None}
    from uvicorn.config import LOGGING_CONFIG

    return {"log_config": uvicorn_log_config(LOGGING_CONFIG)}


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..service import create_app, load_settings
    except ImportError as exc:
        raise UsageError(
            f"the CDS Hooks service needs the service extra (missing module {exc.name!r}): "
            "pip install 'fhir-leuko[service]'"
        ) from None
    given: dict[str, Any] = {}
    if args.state_dir is not None:
        given["state_dir"] = args.state_dir
    if args.log_format is not None:
        given["log_format"] = args.log_format
    if args.workers is not None:
        given["workers"] = args.workers
    settings = load_settings(args.config, **given)
    json_logs = settings.log_format == "json"
    if json_logs:
        _json_logging(args.verbose)
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    # Bound first, so a port in use fails at once, before the profiles are loaded.
    sock = bind(host, port)
    # The service logs one line per request at INFO; show them unless the user asked for less.
    service_log = logging.getLogger("fhir_leuko")
    if service_log.getEffectiveLevel() > logging.INFO:
        service_log.setLevel(logging.INFO)
    if settings.workers > 1:
        return _serve_workers(args, given, settings, sock, host, port, json_logs)
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    # Everything loaded so far (knowledge, profiles, the FHIR models) lives as long as the process:
    # keep it out of the garbage collector's full passes, which otherwise show as latency spikes
    # of tens of milliseconds on hook calls (benchmarks/README.md, "cds").
    gc.collect()
    gc.freeze()
    line = startup_line(host, port, settings.public_base_url)
    if json_logs:
        logging.getLogger("fhir_leuko.service").info(
            line.removeprefix("fhir-leuko: "), extra={"fields": {"event": "service.listening"}}
        )
    else:
        print(line, file=sys.stderr, flush=True)
    # JSON: uvicorn's loggers (start-up, access lines) go to the root handler (one JSON object per
    # line, scrubbed); text: uvicorn's own format, its handlers scrubbed too (a traceback of a
    # failed request may name the patient).
    config = uvicorn.Config(app, server_header=False, log_level="info", **_uvicorn_logging(json_logs))
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


# -- several worker processes ------------------------------------------------------------------

_WORKER_ENV = "FHIR_LEUKO_SERVE_WORKER"
"""JSON handed to each worker process: the config file, the overrides and the log format."""


def _serve_workers(
    args: argparse.Namespace,
    given: dict[str, Any],
    settings: Any,
    sock: socket.socket,
    host: str,
    port: int,
    json_logs: bool,
) -> int:
    """``--workers N``: uvicorn's supervisor and N processes on the one socket bound here. Each
    builds its app from the same configuration (:func:`worker_app`), so all share the store of
    the settings (the SQLite file of one machine, or PostgreSQL); the metrics of all of them are
    gathered in a private ``PROMETHEUS_MULTIPROC_DIR``."""
    import tempfile

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from ..service import create_app

    # Check the configuration once here (a broken profile is one error, not N).
    create_app(settings)
    metrics_dir = tempfile.mkdtemp(prefix="fhir-leuko-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[_WORKER_ENV] = json.dumps(
        {
            "config": str(args.config) if args.config is not None else None,
            "given": {k: str(v) if isinstance(v, Path) else v for k, v in given.items()},
            "verbose": args.verbose,
        }
    )
    line = startup_line(host, port, settings.public_base_url)
    print(f"{line} ({settings.workers} worker processes)", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        "fhir_leuko.cli.serve:worker_app",
        factory=True,
        workers=settings.workers,
        server_header=False,
        log_level="info",
        **_uvicorn_logging(json_logs),
    )
    try:
        with sock:
            Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def worker_app() -> Any:
    """The app of one worker process (``--workers N``), from the configuration the supervisor
    was given."""
    from ..service import create_app, load_settings

    spec = json.loads(os.environ[_WORKER_ENV])
    given = dict(spec["given"])
    for key in ("state_dir",):
        if key in given:
            given[key] = Path(given[key])
    config = Path(spec["config"]) if spec["config"] else None
    settings = load_settings(config, **given)
    if settings.log_format == "json":
        _json_logging(spec["verbose"])
    else:
        install_log_scrubbing()
    service_log = logging.getLogger("fhir_leuko")
    if service_log.getEffectiveLevel() > logging.INFO:
        service_log.setLevel(logging.INFO)
    return create_app(settings)
