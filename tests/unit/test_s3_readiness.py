"""Readiness under an S3 write outage: moto behind a WSGI wrapper that fails every write while reads go through.

`Storage.write_problem` is what the Ingress's /readyz reports as `checks["s3"]` once HeadBucket passed
(deployments/ingress.py); in this outage HeadBucket still passes, so only the outcome of writes can tell.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from pydantic import ValidationError
from werkzeug.serving import make_server

from serve.config import S3Config
from serve.local_s3 import use_dummy_credentials
from serve.storage import (
    CANARY_KEY,
    NotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    WriteHealth,
)

INTERVAL_S = 30.0
TIMEOUT_S = 5.0
_OUTAGE_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                b"<Message>injected write outage</Message></Error>")


class WriteOutage:
    """WSGI middleware in front of moto. While `failing`, every write (PUT, POST, DELETE) is answered 503
    ServiceUnavailable, as S3 answers in a write outage; reads (GET, HEAD, listing) always pass. Writes wait for
    `release` first (cleared: S3 hangs), and every write that arrives is logged in `writes` as (method, path)."""

    _WRITES = frozenset({"PUT", "POST", "DELETE"})

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app
        self.failing = False
        self.release = threading.Event()
        self.release.set()
        self.writes: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method not in self._WRITES:
            return self._app(environ, start_response)
        self.writes.append((method, environ.get("PATH_INFO", "")))
        self.release.wait(10)
        if not self.failing:
            return self._app(environ, start_response)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # keep the connection usable
        start_response("503 Service Unavailable",
                       [("Content-Type", "application/xml"), ("Content-Length", str(len(_OUTAGE_BODY)))])
        return [_OUTAGE_BODY]

    def canaries(self) -> list[tuple[str, str]]:
        return [w for w in self.writes if w[1].endswith("/" + CANARY_KEY)]

    def reset(self) -> None:
        self.failing = False
        self.release.set()
        self.writes.clear()


@dataclass
class Clock:
    """The `WriteHealth` clock: seconds advance only when the test says so."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def outage_s3() -> Iterator[tuple[str, WriteOutage]]:
    """(endpoint URL, its outage switch) of a moto S3 on a free loopback port, in a thread."""
    use_dummy_credentials()
    outage = WriteOutage(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, outage, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-write-outage", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", outage
    finally:
        outage.release.set()
        server.shutdown()
        thread.join(5)


@pytest.fixture
def outage(outage_s3: tuple[str, WriteOutage]) -> Iterator[WriteOutage]:
    outage_s3[1].reset()
    yield outage_s3[1]
    outage_s3[1].reset()


@pytest.fixture
def cfg(outage_s3: tuple[str, WriteOutage]) -> S3Config:
    # one attempt per call, so an injected failure is one request and fails at once
    return S3Config(bucket=f"readiness-{uuid.uuid4().hex[:12]}", prefix="svc/", endpoint_url=outage_s3[0],
                    create_bucket=True, max_attempts=1, connect_timeout_s=2, read_timeout_s=15,
                    canary_interval_s=INTERVAL_S, canary_timeout_s=TIMEOUT_S)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def storage_on(cfg: S3Config, clock: Clock) -> Storage:
    return Storage(cfg, write_health=WriteHealth(cfg.canary_interval_s, cfg.canary_timeout_s, clock))


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_readiness_follows_writes_through_a_put_outage(cfg: S3Config, outage: WriteOutage, clock: Clock) -> None:
    st = storage_on(cfg, clock)
    st.ensure_bucket()  # a write: the replica has just written
    st.put_json(st.key("jobs", "a.json"), {"id": "a"})
    assert st.write_problem(wait_s=5) is None
    assert outage.canaries() == []

    # 1. The outage: reads still pass (HeadBucket alone would say ready), the next real write fails.
    outage.failing = True
    st.check()
    assert st.get_json(st.key("jobs", "a.json")) == {"id": "a"}
    with pytest.raises(StorageError):
        st.put_json(st.key("jobs", "b.json"), {"id": "b"})
    reason = st.write_problem(wait_s=5)
    assert reason is not None and reason.startswith("writes failing") and "put: ServiceUnavailable" in reason
    assert cfg.bucket not in reason and "127.0.0.1" not in reason and "jobs" not in reason  # /readyz is public

    # 2. Probes inside the canary interval write nothing, however many there are.
    writes = len(outage.writes)
    for _ in range(29):
        clock.advance(1)
        assert st.write_problem(wait_s=5) is not None
    assert len(outage.writes) == writes

    # 3. Idle for the interval: one canary, which fails; the probes after it write nothing more.
    clock.advance(1)
    for _ in range(10):
        assert st.write_problem(wait_s=5) is not None
    assert outage.canaries() == [("PUT", f"/{cfg.bucket}/svc/{CANARY_KEY}")]
    assert len(outage.writes) == writes + 1
    assert "2 in a row" in st.write_problem(wait_s=5)

    # 4. The outage ends: the next canary, one interval after the last write, succeeds and readiness comes back.
    outage.failing = False
    clock.advance(INTERVAL_S - 1)
    assert st.write_problem(wait_s=5) is not None  # nothing was written since the failed canary
    clock.advance(1)
    assert st.write_problem(wait_s=5) is None
    assert len(outage.canaries()) == 2
    assert "written_at" in st.get_json(st.key(CANARY_KEY))


def test_a_successful_write_or_an_answer_from_s3_clears_the_failure(cfg: S3Config, outage: WriteOutage,
                                                                    clock: Clock) -> None:
    st = storage_on(cfg.model_copy(update={"multipart_threshold_bytes": 5 * 1024 * 1024}), clock)
    st.ensure_bucket()
    etag = st.put_if_absent(st.key("jobs", "c.json"), b"{}")

    outage.failing = True
    failed_writes: list[tuple[str, Callable[[], Any]]] = [
        ("conditional_put", lambda: st.put_if_match(st.key("jobs", "c.json"), b'{"a":1}', etag)),
        ("delete", lambda: st.delete(st.key("jobs", "c.json"))),
        ("delete", lambda: st.delete_many([st.key("jobs", "c.json")])),
        ("put", lambda: st.put_bytes(st.key("videos", "v.mp4"), b"\0" * (5 * 1024 * 1024), "video/mp4")),
    ]
    for operation, write in failed_writes:  # every kind of write feeds the verdict
        with pytest.raises(StorageError):
            write()
        assert f"{operation}: " in (st.write_problem(wait_s=5) or ""), operation
    assert f"{len(failed_writes)} in a row" in st.write_problem(wait_s=5)

    # a lost conditional write is S3 answering: the write path works again, no canary needed
    outage.failing = False
    with pytest.raises(PreconditionFailed):
        st.put_if_absent(st.key("jobs", "c.json"), b"{}")
    assert st.write_problem(wait_s=5) is None
    assert outage.canaries() == []

    # a failure again, then a real write that succeeds clears it at once
    outage.failing = True
    with pytest.raises(StorageError):
        st.put_json(st.key("jobs", "d.json"), {})
    outage.failing = False
    assert st.write_problem(wait_s=5) is not None
    st.put_json(st.key("jobs", "d.json"), {})
    assert st.write_problem(wait_s=5) is None


def test_a_missing_bucket_is_a_failure_not_an_answer(cfg: S3Config, outage: WriteOutage, clock: Clock) -> None:
    st = storage_on(cfg, clock)  # its bucket never created
    with pytest.raises(NotFound):  # the job store reads a 404 on a conditional write as "the record is gone"
        st.put_if_absent(st.key("jobs", "e.json"), b"{}")
    assert "conditional_put: NoSuchBucket" in (st.write_problem(wait_s=5) or "")


def test_the_first_probe_writes_a_canary_and_a_hanging_one_is_never_doubled(cfg: S3Config, outage: WriteOutage,
                                                                            clock: Clock) -> None:
    Storage(cfg).ensure_bucket()
    outage.writes.clear()
    st = storage_on(cfg, clock)  # this replica has written nothing yet

    outage.release.clear()  # S3 takes the canary's request and does not answer
    assert st.write_problem(wait_s=0.05) is None  # started, not answered, not yet overdue
    assert wait_until(lambda: len(outage.canaries()) == 1)
    clock.advance(TIMEOUT_S)
    assert st.write_problem(wait_s=0.05) == f"canary write unanswered for {TIMEOUT_S:.0f}s"
    for _ in range(10):  # past the interval too: the canary in flight is the only one
        clock.advance(INTERVAL_S)
        assert (st.write_problem(wait_s=0.05) or "").startswith("canary write unanswered")
    assert len(outage.writes) == 1

    outage.release.set()
    assert wait_until(lambda: st.write_problem(wait_s=0.05) is None)
    assert len(outage.canaries()) == 1
    assert "written_at" in st.get_json(st.key(CANARY_KEY))


def test_canary_settings_are_validated() -> None:
    defaults = S3Config()
    assert 0 < defaults.canary_timeout_s and 0 < defaults.canary_interval_s
    for field in ("canary_interval_s", "canary_timeout_s"):
        with pytest.raises(ValidationError, match=field):
            S3Config(**{field: 0})


def test_a_hung_canary_says_nothing_once_a_later_real_write_was_answered() -> None:
    now = [100.0]
    health = WriteHealth(canary_interval_s=30, canary_timeout_s=10, clock=lambda: now[0])
    assert health.claim_canary()  # nothing written yet: the canary starts, and hangs
    now[0] = 115.0
    assert (health.problem() or "").startswith("canary write unanswered")
    health.record("put", None)  # a real write succeeds meanwhile: S3 takes writes
    now[0] = 120.0
    assert health.problem() is None
    health.record("put", "ServiceUnavailable")  # and a later failure still counts
    assert (health.problem() or "").startswith("writes failing")
