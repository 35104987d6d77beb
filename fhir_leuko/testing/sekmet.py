"""Run a real FHIR R4 server (``sekmet-fhir==0.1.1`` from PyPI) on loopback for tests.

The server runs in a child process started from ``python`` (by default the current interpreter),
which must have ``sekmet-fhir==0.1.1`` installed.  The child is a tiny wrapper (passed with
``python -c``) that, before the app is built:

* checks that the installed sekmet is exactly :data:`SEKMET_VERSION` and that its internal
  search-parameter table (``sekmet.fhir.search_params.PARAMS``) looks as expected; it fails loudly
  (non-zero exit, message in the log) otherwise;
* adds search parameters for ``DetectedIssue`` (:data:`DETECTED_ISSUE_PARAMS`), which 0.1.1 lacks,
  so that searches and conditional creates (``If-None-Exist: identifier=...``) on DetectedIssue work;
* builds the app with ``sekmet.main.create_app`` and adds one test-only route,
  ``POST /__launcher__/reset`` (outside ``/fhir``), used by :meth:`SekmetServer.reset`, and one
  that freezes sekmet's clock, ``POST /__launcher__/clock``, used by :meth:`SekmetServer.freeze_clock`;
* runs it with uvicorn on ``127.0.0.1`` only, and shuts itself down if the process that
  started it disappears, so a killed test run leaves no server behind (nor the data directory,
  when the launcher created it).

Settings written for the child (``<data_dir>/settings.json``; JSON is valid YAML):
the SQLite store and every other file go to ``data_dir``, the hospital simulator is off, inbound auth
is ``none``, the inbound traffic log is off, and ``base_url`` is ``http://127.0.0.1:<port>/fhir``.
Any of them can be overridden with ``settings=`` (deep-merged), e.g. to test auth::

    SekmetServer(tmp, settings={"server_auth": {"types": ["basic"], "users": {"u": "p"}}})

Only the standard library and ``requests`` are used.

Example::

    with SekmetServer(tmp_path) as fhir:
        requests.post(f"{fhir.base_url}/Patient", json={"resourceType": "Patient"}, timeout=10)
        fhir.reset()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from ..configfile import deep_merge

__all__ = [
    "DETECTED_ISSUE_PARAMS",
    "SEKMET_VERSION",
    "SekmetError",
    "SekmetServer",
    "free_port",
]

SEKMET_VERSION = "0.1.1"
"""The only sekmet-fhir version the in-process patch is written for."""

DETECTED_ISSUE_PARAMS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    # name: (kind, element paths, reference target type)
    "identifier": ("token", ("identifier",), None),
    "patient": ("reference", ("patient",), "Patient"),
    "code": ("token", ("code",), None),
    "identified": ("date", ("identifiedDateTime", "identifiedPeriod"), None),
    "implicated": ("reference", ("implicated",), None),
    "author": ("reference", ("author",), None),
    # NOT an R4 (4.0.1) search parameter of DetectedIssue (R4 has author, code, identified,
    # identifier, implicated, patient). Added for convenience in tests only: a strict R4 server
    # answers 400 to DetectedIssue?status=..., so production code must not rely on it.
    "status": ("token", ("status",), None),
}
"""Search parameters added to sekmet's table for DetectedIssue before the server starts."""

RESET_PATH = "/__launcher__/reset"
CLOCK_PATH = "/__launcher__/clock"
PING_PATH = "/__launcher__/ping"

_DEFAULT_SETTINGS: dict[str, Any] = {
    "host": "127.0.0.1",
    "simulator": {"enabled": False},
    "server_auth": {"types": ["none"]},
    "validation": {"inbound": "strict"},
    "log_inbound": False,
}

# Environment variables sekmet lets override the settings file: never inherit them.
_OVERRIDE_ENV = (
    "SEKMET_CONFIG",
    "SEKMET_BASE_URL",
    "SEKMET_DB",
    "SEKMET_PUBLIC_URL",
    "SEKMET_PORT",
)

# Runs in the child interpreter. argv[1] is JSON with: version, config, port, params, reset_path,
# clock_path, ping_path, nonce, parent_pid, data_dir, remove_dir_if_orphaned.
_WRAPPER = r"""
import json, sys
cfg = json.loads(sys.argv[1])

def die(msg):
    sys.stderr.write("sekmet launcher: " + msg + "\n")
    sys.stderr.flush()
    raise SystemExit(3)

try:
    from importlib.metadata import version
    installed = version("sekmet-fhir")
except Exception as e:
    die("sekmet-fhir is not installed in %s: %r" % (sys.executable, e))
if installed != cfg["version"]:
    die("sekmet-fhir %s is installed, the launcher is written for %s only" % (installed, cfg["version"]))

from sekmet.fhir import search_params as sp
table = getattr(sp, "PARAMS", None)
if (not isinstance(table, dict) or "*" not in table or "Observation" not in table
        or not hasattr(sp, "SearchParam") or not callable(getattr(sp, "get_param", None))):
    die("sekmet.fhir.search_params.PARAMS is not where/what the launcher expects")
di = table.setdefault("DetectedIssue", {})
for name, (kind, paths, target) in cfg["params"].items():
    di[name] = sp.SearchParam(name, kind, tuple(paths), target)
for name in cfg["params"]:
    if sp.get_param("DetectedIssue", name) is None:
        die("patching DetectedIssue search parameter %r had no effect" % name)

from sekmet.config import load_settings
from sekmet.main import create_app
settings = load_settings(cfg["config"])
app = create_app(settings)
ctx = app.state.ctx

from datetime import datetime
from sekmet.fhir import common as _common
from starlette.requests import Request
_real_now = _common.now

async def _clock(request: Request):
    # Freeze sekmet's clock (every write gets the same meta.lastUpdated, as in a bulk load), or
    # let it run again ({"at": null}).
    at = (await request.json()).get("at")
    if at is None:
        _common.now = _real_now
    else:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
        _common.now = lambda: moment
    return {"at": at}


def _reset():
    _common.now = _real_now
    with ctx.store.lock:
        ctx.store.reset()
        ctx.subscriptions.seed_topics()
        ctx.subscriptions.invalidate()
    return {"reset": True}

app.add_api_route(cfg["reset_path"], _reset, methods=["POST"], include_in_schema=False)
app.add_api_route(cfg["clock_path"], _clock, methods=["POST"], include_in_schema=False)
app.add_api_route(cfg["ping_path"], lambda: {"nonce": cfg["nonce"]}, methods=["GET"], include_in_schema=False)

import os, shutil, threading, time
import uvicorn

server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(cfg["port"]), log_level="warning",
                                       access_log=False))
orphaned = []

def _watch_parent(parent):
    # shut down when the test process that started us is gone (e.g. killed with SIGKILL)
    while not server.should_exit:
        time.sleep(1.0)
        if os.getppid() != parent:
            orphaned.append(True)
            server.should_exit = True

threading.Thread(target=_watch_parent, args=(int(cfg["parent_pid"]),), daemon=True).start()
server.run()
if orphaned and cfg["remove_dir_if_orphaned"]:
    ctx.store.conn.close()
    shutil.rmtree(cfg["data_dir"], ignore_errors=True)
"""


class SekmetError(RuntimeError):
    """The sekmet server could not be started, or misbehaved while being driven by the launcher."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SekmetServer:
    """A sekmet-fhir server in a child process, bound to 127.0.0.1. Use as a context manager.

    :param data_dir: directory for the SQLite store, settings and log (``sekmet.log``); created if
        missing and left in place. ``None``: a private temporary directory, removed by :meth:`stop`.
    :param port: TCP port; ``None`` picks a free one (retried if it is taken before sekmet binds it).
    :param python: interpreter that has ``sekmet-fhir==0.1.1`` installed.
    :param settings: sekmet settings deep-merged over the launcher's defaults (e.g. ``server_auth``).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        python: str = sys.executable,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="sekmet-"))
        )
        self._fixed_port = port
        self.port: int = port if port is not None else 0
        self.python = python
        self._settings_override: Mapping[str, Any] = settings or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._nonce = ""
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ properties

    @property
    def root_url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:PORT`` (SMART discovery lives here)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:PORT/fhir`` (no trailing slash)."""
        return f"{self.root_url}/fhir"

    @property
    def log_path(self) -> Path:
        """File receiving the child's stdout and stderr."""
        return self.data_dir / "sekmet.log"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, if any."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until ``GET {base_url}/metadata`` answers 200.

        Also checks that the CapabilityStatement lists the patched DetectedIssue parameters.
        Raises :class:`SekmetError` (with the log's tail) on failure or timeout.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise SekmetError("server already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port is not None else 3
        t0 = time.monotonic()
        for attempt in range(attempts):
            self.port = self._fixed_port if self._fixed_port is not None else free_port()
            self._spawn()
            try:
                self._wait_ready(t0 + timeout)
            except SekmetError:
                exited = self._proc is not None and self._proc.poll() is not None
                self.stop(_keep_dir=True)
                if (
                    exited
                    and attempt + 1 < attempts
                    and "address already in use" in self._log_tail().lower()
                ):
                    continue
                if self._own_dir:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                raise
            self.startup_seconds = time.monotonic() - t0
            return

    def _spawn(self) -> None:
        self._nonce = secrets.token_hex(16)
        settings = deep_merge(
            _DEFAULT_SETTINGS,
            {
                "port": self.port,
                "base_url": self.base_url,
                "data_dir": str(self.data_dir),
                "db_path": str(self.data_dir / "sekmet.db"),
                "own_private_key_path": str(self.data_dir / "keys" / "sekmet_private.pem"),
            },
        )
        settings = deep_merge(settings, self._settings_override)
        settings["host"] = "127.0.0.1"  # never anything else, whatever the override says
        config = self.data_dir / "settings.json"
        config.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        arg = json.dumps(
            {
                "version": SEKMET_VERSION,
                "config": str(config),
                "port": self.port,
                "params": {
                    k: [kind, list(paths), tgt]
                    for k, (kind, paths, tgt) in DETECTED_ISSUE_PARAMS.items()
                },
                "reset_path": RESET_PATH,
                "clock_path": CLOCK_PATH,
                "ping_path": PING_PATH,
                "nonce": self._nonce,
                "parent_pid": os.getpid(),
                "data_dir": str(self.data_dir),
                "remove_dir_if_orphaned": self._own_dir,
            }
        )
        env = {k: v for k, v in os.environ.items() if k not in _OVERRIDE_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.python, "-c", _WRAPPER, arg],
                cwd=self.data_dir,  # relative paths sekmet may use (reports/, keys/) stay in data_dir
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test runner does not hit the server first
            )

    def _wait_ready(self, deadline: float) -> None:
        # The ping route answers with this run's nonce, so another server that happens to hold the
        # port is never mistaken for ours; then /metadata must answer 200.
        ping, url = f"{self.root_url}{PING_PATH}", f"{self.base_url}/metadata"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise SekmetError(
                    f"sekmet exited during start-up (code {code}):\n{self._log_tail()}"
                )
            try:
                ours = requests.get(ping, timeout=2).json().get("nonce") == self._nonce
                r = (
                    requests.get(url, timeout=5, headers={"Accept": "application/fhir+json"})
                    if ours
                    else None
                )
            except (requests.RequestException, ValueError, AttributeError):
                r = None
            if r is not None and r.status_code == 200:
                self._check_capabilities(r.json())
                return
            if time.monotonic() > deadline:
                raise SekmetError(f"sekmet did not answer {url} in time:\n{self._log_tail()}")
            time.sleep(0.1)

    def _check_capabilities(self, cs: Any) -> None:
        try:
            resources = cs["rest"][0]["resource"]
            di = next(r for r in resources if r["type"] == "DetectedIssue")
            names = {p["name"] for p in di["searchParam"]}
        except (KeyError, IndexError, TypeError, StopIteration) as e:
            raise SekmetError(
                f"DetectedIssue missing from sekmet's CapabilityStatement: {e!r}"
            ) from e
        missing = set(DETECTED_ISSUE_PARAMS) - names
        if missing:
            raise SekmetError(
                f"patched DetectedIssue search parameters not served: {sorted(missing)}"
            )

    def stop(self, timeout: float = 10, *, _keep_dir: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s). Idempotent.

        Removes ``data_dir`` only if the launcher created it itself.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._own_dir and not _keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def reset(self) -> None:
        """Empty the store (all resources, history, index, logs) without restarting.

        Runs inside the server under its store lock, then re-seeds sekmet's built-in
        SubscriptionTopic ``Basic`` resources exactly as at start-up. Takes a few milliseconds.
        """
        r = requests.post(f"{self.root_url}{RESET_PATH}", timeout=30)
        if r.status_code != 200:
            raise SekmetError(f"reset failed: HTTP {r.status_code} {r.text[:500]}")

    def freeze_clock(self, at: str | None) -> None:
        """Give every write from now on ``meta.lastUpdated = at`` (a FHIR instant), as a bulk load
        or a migration does; ``None`` lets the clock run again. Test use only."""
        r = requests.post(f"{self.root_url}{CLOCK_PATH}", json={"at": at}, timeout=30)
        if r.status_code != 200:
            raise SekmetError(f"clock failed: HTTP {r.status_code} {r.text[:500]}")

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> SekmetServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
