"""Several processes of one deployment share the JWT replay cache (issue 11 §1): the same `jti`
sent to two real `fhir-leuko serve` processes is accepted once, with the embedded SQLite store
(two processes of one machine, and `--workers 2`) and with a real PostgreSQL server started by the
tests from Debian's packages (`./dev test` installs `postgresql` as root; skipped with the reason
where it cannot be had)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_leuko.testing.sekmet import free_port

from .harness import AS_OF, CdsClient, ClientKeys, MutableClock, hook_request, prefetch

PUBLIC = "https://cds.example.org"
ISS = "https://ehr.example.org"


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    return ClientKeys("shared")


def _config(tmp: Path, keys: ClientKeys, **service: Any) -> Path:
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()), encoding="utf-8")
    lines = [
        "[service]",
        f'public_base_url = "{PUBLIC}"',
        *(f"{k} = {json.dumps(v)}" for k, v in service.items()),
        "[[service.clients]]",
        f'iss = "{ISS}"',
        f'jwks_file = "{jwks}"',
        "[service.testing]",
        f"as_of = {AS_OF.isoformat().replace('+00:00', 'Z')}",
    ]
    path = tmp / "service.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class _Serve:
    """`fhir-leuko serve` in a child process on a free port."""

    def __init__(self, config: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
        environment.update(env or {})
        self._log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fhir_leuko", "serve", "--config", str(config), "--port", str(self.port), *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # refused, or queued on the socket while starting
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(log.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self._out.close()


def _client(keys: ClientKeys, base: str) -> CdsClient:
    return CdsClient(base_url=base, audience_base=PUBLIC, keys=keys, iss=ISS, clock=MutableClock())


def _discovery(base: str, token: str) -> int:
    answer = requests.get(f"{base}/cds-services", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return answer.status_code


def _once_across(keys: ClientKeys, first: _Serve, second: _Serve) -> None:
    """One token to both processes, one after the other and at the same moment: accepted once."""
    signer = _client(keys, first.url)
    token = signer.token("/cds-services", jti=str(uuid.uuid4()))
    assert _discovery(first.url, token) == 200
    assert _discovery(second.url, token) == 401
    assert _discovery(first.url, token) == 401
    for _ in range(5):
        token = signer.token("/cds-services", jti=str(uuid.uuid4()))
        results: list[int] = []

        def call(url: str, token: str = token, results: list[int] = results) -> None:
            results.append(_discovery(url, token))

        threads = [
            threading.Thread(target=call, args=(url,))
            for url in (first.url, second.url, first.url, second.url)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [200, 401, 401, 401]


@pytest.mark.slow
def test_two_processes_share_the_sqlite_replay_cache(tmp_path: Path, keys: ClientKeys) -> None:
    config = _config(tmp_path, keys, state_dir=str(tmp_path / "state"))
    first = _Serve(config, tmp_path / "a.log")
    try:
        second = _Serve(config, tmp_path / "b.log")
        try:
            _once_across(keys, first, second)
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.slow
def test_two_processes_share_the_postgresql_store(tmp_path: Path, keys: ClientKeys, postgres: str) -> None:
    env = {"FHIR_LEUKO_SERVICE_DATABASE_URL": postgres}
    # Two "replicas": different state directories (as on two machines), one PostgreSQL.
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(_config(tmp_path / name, keys, store="postgresql", state_dir=str(tmp_path / name)))
    first = _Serve(configs[0], tmp_path / "a.log", env=env)
    try:
        second = _Serve(configs[1], tmp_path / "b.log", env=env)
        try:
            _once_across(keys, first, second)
            # A card issued by one replica, its feedback received by the other: one store.
            view = _client(keys, first.url).call(
                "leuko-patient-view",
                hook_request("patient-view", "pt-cloz-severe", prefetch=prefetch("clozapine-severe")),
            )
            (card,) = view.cards
            entry = {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "known"},
                "outcomeTimestamp": "2026-11-20T12:01:00Z",
            }
            feedback = _client(keys, second.url).feedback("leuko-patient-view", {"feedback": [entry]})
            assert feedback.status == 200
        finally:
            second.stop()
    finally:
        first.stop()
    import psycopg

    with psycopg.connect(postgres) as connection:
        rows = connection.execute("SELECT card, known_card FROM feedback").fetchall()
    assert rows == [(card["uuid"], True)]
    log = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert postgres not in log  # the connection string is never logged


def test_postgresql_store_that_cannot_be_reached_is_a_usage_error(tmp_path: Path, keys: ClientKeys) -> None:
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    config = _config(tmp_path, keys, store="postgresql")
    secret = f"postgresql://fhir:pa55word@127.0.0.1:{free_port()}/nowhere"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_LEUKO_")}
    env["FHIR_LEUKO_SERVICE_DATABASE_URL"] = secret
    done = subprocess.run(
        [sys.executable, "-m", "fhir_leuko", "serve", "--config", str(config), "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot use the PostgreSQL store" in done.stderr
    assert "pa55word" not in done.stderr


@pytest.mark.slow
def test_workers_share_the_store_and_the_metrics(tmp_path: Path, keys: ClientKeys) -> None:
    config = _config(tmp_path, keys, state_dir=str(tmp_path / "state"))
    serve = _Serve(config, tmp_path / "w.log", "--workers", "2")
    try:
        signer = _client(keys, serve.url)
        tokens = [signer.token("/cds-services", jti=str(uuid.uuid4())) for _ in range(12)]
        # New connections each time: the kernel spreads them over both workers.
        firsts = [_discovery(serve.url, t) for t in tokens]
        seconds = [_discovery(serve.url, t) for t in tokens]
        assert firsts == [200] * 12 and seconds == [401] * 12
        text = requests.get(f"{serve.url}/metrics", timeout=30).text
        assert 'fhir_leuko_cds_requests_total{hook="discovery",service="discovery",status="200"} 12.0' in text
        assert 'fhir_leuko_cds_jwt_rejections_total{reason="replay"} 12.0' in text
    finally:
        serve.stop()
    log = (tmp_path / "w.log").read_text()
    assert "(2 worker processes)" in log
    pids = {line.split("[")[1].split("]")[0] for line in log.splitlines() if "Started server process [" in line}
    assert len(pids) == 2
