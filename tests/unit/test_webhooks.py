"""Webhooks: Standard Webhooks signing, SSRF refusal, and delivery to real HTTP receivers on 127.0.0.1.

Network: receivers are `http.server` instances on 127.0.0.1 started here; every host name is answered by an injected
resolver, and an autouse guard fails any test that reaches the system's DNS. Tests are plain functions around
`asyncio.run` and wait for conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from serve.config.webhooks import WebhookConfig
from serve.errors import ServiceError
from serve.jobs.record import new_job_id
from serve.webhooks.events import WebhookEvent
from serve.webhooks.sender import DeliveryResult, WebhookSender
from serve.webhooks.signing import (
    WebhookSecrets,
    decode_secret,
    generate_secret,
    sign,
    signature_header,
)
from serve.webhooks.urlguard import validate_webhook_url

TIMEOUT_S = 10.0
SECRET = generate_secret()
PUBLIC4 = "93.184.216.34"
PUBLIC6 = "2606:2800:220:1:248:1893:25c8:1946"


# ---- helpers ------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_system_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Any lookup of a name (not an IP literal) through the system resolver fails the test: no DNS traffic."""
    real = socket.getaddrinfo
    names: list[Any] = []

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else host
        try:
            ipaddress.ip_address(text)
        except (ValueError, TypeError):
            names.append(host)
            raise OSError(f"test guard: system DNS lookup of {host!r} refused")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield names
    assert names == [], f"system DNS was asked for {names}"


class FakeResolver:
    """getaddrinfo-shaped; answers[i] is the i-th call's answer (the last repeats); a dict maps name -> addresses."""

    def __init__(self, *answers: dict[str, list[str]] | list[str] | Exception) -> None:
        self.answers = list(answers) or [{}]
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        addrs = answer.get(host) if isinstance(answer, dict) else answer
        if addrs is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addrs]


class Receiver:
    """An HTTP server on 127.0.0.1 recording every request and answering from a script (then 200)."""

    def __init__(self, script: Sequence[int | tuple[int, dict[str, str]]] = (),
                 hold: threading.Event | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self._script = list(script)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer._lock:
                    outer.requests.append({"method": self.command, "path": self.path, "body": body,
                                           "headers": {k.lower(): v for k, v in self.headers.items()}})
                    step = outer._script.pop(0) if outer._script else 200
                if hold is not None:
                    hold.wait(TIMEOUT_S)
                code, headers = step if isinstance(step, tuple) else (step, {})
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []
    holds: list[threading.Event] = []

    def make(*script: int | tuple[int, dict[str, str]], hold: threading.Event | None = None,
             tls: ssl.SSLContext | None = None) -> Receiver:
        r = Receiver(script, hold, tls)
        made.append(r)
        if hold is not None:
            holds.append(hold)
        return r

    yield make
    for h in holds:
        h.set()
    for r in made:
        r.close()


def config(*receivers: Receiver, **overrides: Any) -> WebhookConfig:
    fields: dict[str, Any] = {"enabled": True, "require_https": False, "base_backoff_s": 0.01,
                              "max_backoff_s": 0.05, "timeout_s": 5.0, "max_attempts": 4,
                              "allow_hosts": [r.host for r in receivers]}
    return WebhookConfig(**{**fields, **overrides})


def secrets() -> WebhookSecrets:
    return WebhookSecrets(default=[decode_secret(SECRET)])


def event(url: str, status: str = "completed", request_id: str | None = None, **data: Any) -> WebhookEvent:
    job_id = new_job_id()
    return WebhookEvent.for_status(status, job_id=job_id, tenant="acme", url=url, occurred_at=time.time(),
                                   data={"id": job_id, "object": "video", "status": status, **data},
                                   request_id=request_id)


def verify(req: dict[str, Any], secret: str = SECRET) -> Any:
    return Webhook(secret).verify(req["body"], req["headers"])


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Sleeps:
    """Injected `sleep` that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def deliver(sender: WebhookSender, ev: WebhookEvent) -> DeliveryResult:
    async def main() -> DeliveryResult:
        try:
            return await sender.deliver(ev)
        finally:
            await sender.aclose()

    return asyncio.run(main())


# ---- signing and secrets ------------------------------------------------------------------------------------------


def test_signature_verifies_with_standardwebhooks_and_rotation_keeps_both_secrets_valid():
    body = b'{"type":"video.completed","data":{"id":"video_1","prompt":"caf\xc3\xa9"}}'
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
               "webhook-signature": sign(decode_secret(SECRET), "msg_1", ts, body)}
    assert Webhook(SECRET).verify(body, headers)["data"]["id"] == "video_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"video_1", b"video_2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)

    old, new = generate_secret(), generate_secret()
    rotated = dict(headers, **{"webhook-signature": signature_header(
        [decode_secret(new), decode_secret(old)], "msg_1", ts, body)})
    assert rotated["webhook-signature"].count("v1,") == 2
    for s in (old, new):
        Webhook(s).verify(body, rotated)


def test_secrets_per_tenant_from_file_with_env_default(tmp_path):
    a, b, default = generate_secret(), generate_secret(), generate_secret()
    path = tmp_path / "webhook-secrets.yaml"
    path.write_text(f"acme: {a}\nglobex: [{b}, {a}]\n")
    cfg = WebhookConfig(enabled=True, secrets_file=str(path), secret_env="TEST_WH_SECRET")
    loaded = WebhookSecrets.from_config(cfg, environ={"TEST_WH_SECRET": default})
    assert loaded.for_tenant("acme") == [decode_secret(a)]
    assert loaded.for_tenant("globex") == [decode_secret(b), decode_secret(a)]
    assert loaded.for_tenant("other") == [decode_secret(default)]
    assert WebhookSecrets.from_config(WebhookConfig(), environ={}).for_tenant("acme") == []

    with pytest.raises(ValueError, match="no secret is configured"):
        WebhookSecrets.from_config(WebhookConfig(enabled=True), environ={})
    bad = "whsec_not*base64"
    with pytest.raises(ValueError, match="base64") as info:
        WebhookSecrets.from_config(WebhookConfig(secret_env="X"), environ={"X": bad})
    assert bad not in str(info.value)
    with pytest.raises(ValueError, match="start with"):
        decode_secret("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0")


def test_config_normalises_allow_hosts_and_checks_backoff_order():
    assert WebhookConfig(allow_hosts=[" Hooks.Example.COM.:8080 "]).allow_hosts == ["hooks.example.com:8080"]
    with pytest.raises(ValidationError, match="allow_hosts"):
        WebhookConfig(allow_hosts=["http://hooks.example.com/"])
    with pytest.raises(ValidationError, match="max_backoff_s"):
        WebhookConfig(base_backoff_s=10, max_backoff_s=1)
    with pytest.raises(ValidationError, match="tenant_urls"):
        WebhookConfig(tenant_urls={"acme": "ftp://hooks.example.com/"})


def test_event_types_and_stable_message_ids():
    ev = event("https://hooks.example.com/", "cancelled")
    assert ev.type == "video.cancelled"
    assert ev.msg_id == f"msg_{ev.job_id}_cancelled"
    assert event("https://hooks.example.com/", "failed").type == "video.failed"
    with pytest.raises(ValueError, match="in_progress"):
        event("https://hooks.example.com/", "in_progress")


# ---- URL checks (no network: literal addresses, or names answered by FakeResolver) ------------------------------

REFUSED: list[tuple[str, dict[str, list[str]], str]] = [
    ("ftp://hooks.example.com/x", {}, "scheme"),
    ("javascript:alert(1)", {}, "scheme"),
    ("http://hooks.example.com/x", {"hooks.example.com": [PUBLIC4]}, "must use https"),
    ("https://user:pw@hooks.example.com/", {"hooks.example.com": [PUBLIC4]}, "credentials"),
    ("https://hooks.example.com:0/", {"hooks.example.com": [PUBLIC4]}, "port"),
    ("https://hooks.example.com:99999/", {"hooks.example.com": [PUBLIC4]}, "port"),
    ("https://hooks.example.com:abc/", {"hooks.example.com": [PUBLIC4]}, "port"),
    ("https:///x", {}, "no host"),
    ("https://hooks example.com/", {}, "whitespace"),
    ("https://" + "a" * 3000 + ".com/", {}, "characters long"),
    ("https://-bad-.example/", {}, "not a valid host name"),
    ("https://127.0.0.1/", {}, "loopback"),
    ("https://127.255.255.254:8443/", {}, "loopback"),
    ("https://[::1]/", {}, "loopback"),
    ("https://10.0.0.1/", {}, "private"),
    ("https://172.16.5.4/", {}, "private"),
    ("https://172.31.255.255/", {}, "private"),
    ("https://192.168.0.1/", {}, "private"),
    ("https://[fc00::1]/", {}, "private"),
    ("https://[fd12:3456::1]/", {}, "private"),
    ("https://169.254.169.254/latest/meta-data/", {}, "metadata"),
    ("https://169.254.1.1/", {}, "link-local"),
    ("https://[fe80::1]/", {}, "link-local"),
    ("https://[fd00:ec2::254]/", {}, "metadata"),
    ("https://168.63.129.16/", {}, "metadata"),
    ("https://100.64.0.1/", {}, "CGNAT"),
    ("https://100.127.255.254/", {}, "CGNAT"),
    ("https://224.0.0.1/", {}, "multicast"),
    ("https://[ff02::1]/", {}, "multicast"),
    ("https://0.0.0.0/", {}, "unspecified"),
    ("https://[::]/", {}, "unspecified"),
    ("https://240.0.0.1/", {}, "reserved"),
    ("https://192.0.0.170/", {}, "private"),
    ("https://[::ffff:127.0.0.1]/", {}, "IPv4-mapped"),
    ("https://[::ffff:7f00:1]/", {}, "IPv4-mapped"),
    ("https://[::ffff:169.254.169.254]/", {}, "metadata"),
    ("https://[::127.0.0.1]/", {}, "IPv4-compatible"),
    ("https://[64:ff9b::10.0.0.1]/", {}, "NAT64"),
    ("https://[64:ff9b::a9fe:a9fe]/", {}, "NAT64"),
    ("https://[2002:7f00:1::]/", {}, "6to4"),
    ("https://[2002:c0a8:101::1]/", {}, "6to4"),
    ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", {}, "Teredo"),
    ("https://2130706433/", {}, "loopback"),
    ("https://0x7f000001/", {}, "loopback"),
    ("https://0x7f.1/", {}, "loopback"),
    ("https://0177.0.0.1/", {}, "loopback"),
    ("https://017700000001/", {}, "loopback"),
    ("https://127.1/", {}, "loopback"),
    ("https://0xa9.0xfe.0xa9.0xfe/", {}, "metadata"),
    ("https://1.2.3.4.5/", {}, "neither a host name"),
    ("https://256.1.1.1/", {}, "out of the IPv4 range"),
    ("https://09.1.1.1/", {}, "octal"),
    ("https://metadata.google.internal/computeMetadata/v1/", {}, "metadata name"),
    ("https://localhost:8443/", {}, "internal"),
    ("https://app.localhost/", {}, "internal"),
    ("https://hooks.example.com/", {"hooks.example.com": ["10.1.2.3"]}, "resolves to 10.1.2.3"),
    ("https://hooks.example.com/", {"hooks.example.com": [PUBLIC4, "127.0.0.1"]}, "resolves to 127.0.0.1"),
    ("https://hooks.example.com/", {"hooks.example.com": [PUBLIC6, "::ffff:10.0.0.1"]}, "IPv4-mapped"),
    ("https://hooks.example.com/", {"hooks.example.com": ["169.254.169.254"]}, "metadata"),
    ("https://nowhere.example.com/", {}, "does not resolve"),
]


@pytest.mark.parametrize(("url", "dns", "why"), REFUSED, ids=[u[:60] + "|" + w for u, _, w in REFUSED])
def test_non_public_or_malformed_urls_are_refused(url, dns, why):
    with pytest.raises(ServiceError) as info:
        validate_webhook_url(url, WebhookConfig(enabled=True), resolver=FakeResolver(dns))
    err = info.value
    assert (err.status, err.param, err.code) == (400, "webhook_url", "invalid_webhook_url")
    assert why in err.message, err.message


@pytest.mark.parametrize(("url", "resolved_as"), [
    ("https://hooks.example.com/path?token=abc", "hooks.example.com"),
    ("https://HOOKS.Example.com./x", "hooks.example.com"),
    ("https://bücher.example/x", "xn--bcher-kva.example"),
    (f"https://{PUBLIC4}:8443/x", None),
    ("https://[2606:4700:4700::1111]/x", None),
])
def test_public_urls_are_accepted(url, resolved_as):
    resolver = FakeResolver({"hooks.example.com": [PUBLIC4, PUBLIC6], "xn--bcher-kva.example": [PUBLIC4]})
    validate_webhook_url(url, WebhookConfig(enabled=True), resolver=resolver)
    assert resolver.calls == ([resolved_as] if resolved_as else [])


@pytest.mark.parametrize(("url", "ok"), [
    ("http://127.0.0.1:8080/x", True),
    ("http://internal.corp:1234/", True),
    ("http://[::1]:9000/", True),
    ("http://127.0.0.1:8081/", False),
    ("http://127.0.0.2:8080/", False),
    ("http://localhost:8080/", False),
    ("http://internal.corp.evil.example/", False),
    ("http://[::1]:9001/", False),
])
def test_allow_list_bypasses_address_checks_only_for_exact_hosts(url, ok):
    cfg = WebhookConfig(enabled=True, require_https=False,
                        allow_hosts=["127.0.0.1:8080", "internal.corp", "[::1]:9000"])
    resolver = FakeResolver({"internal.corp": ["10.0.0.7"], "internal.corp.evil.example": ["10.0.0.7"]})
    if ok:
        validate_webhook_url(url, cfg, resolver=resolver)
    else:
        with pytest.raises(ServiceError):
            validate_webhook_url(url, cfg, resolver=resolver)


def test_allowed_ports_and_https_requirement_hold_for_allow_listed_hosts_too():
    cfg = WebhookConfig(enabled=True, allow_hosts=["127.0.0.1"], allowed_ports=[443])
    with pytest.raises(ServiceError, match="https"):
        validate_webhook_url("http://127.0.0.1/", cfg, resolver=FakeResolver())
    with pytest.raises(ServiceError, match="port 8443"):
        validate_webhook_url("https://127.0.0.1:8443/", cfg, resolver=FakeResolver())
    validate_webhook_url("https://127.0.0.1/", cfg, resolver=FakeResolver())


def test_registration_needs_webhooks_enabled_and_a_tenant_secret():
    async def main() -> None:
        off = WebhookSender(WebhookConfig(), secrets(), resolver=FakeResolver())
        with pytest.raises(ServiceError) as info:
            await off.validate_registration(f"https://{PUBLIC4}/", "acme")
        assert info.value.code == "webhooks_disabled"
        no_secret = WebhookSender(WebhookConfig(enabled=True), WebhookSecrets(), resolver=FakeResolver())
        with pytest.raises(ServiceError) as info:
            await no_secret.validate_registration(f"https://{PUBLIC4}/", "acme")
        assert info.value.code == "webhook_secret_missing"
        on = WebhookSender(WebhookConfig(enabled=True, tenant_urls={"acme": f"https://{PUBLIC4}/t"}), secrets(),
                           resolver=FakeResolver())
        await on.validate_registration(f"https://{PUBLIC4}/", "acme")
        with pytest.raises(ServiceError, match="loopback"):
            await on.validate_registration("https://127.0.0.1/", "acme")
        assert on.url_for("acme", None) == f"https://{PUBLIC4}/t"
        assert on.url_for("acme", "https://job.example/") == "https://job.example/"
        assert on.url_for("other", None) is None

    asyncio.run(main())


# ---- delivery to local receivers ----------------------------------------------------------------------------------


def test_delivered_event_is_signed_per_standard_webhooks(receiver):
    r = receiver(200)
    ev = event(r.url("/hook?source=videogen"), prompt="a cat")
    result = deliver(WebhookSender(config(r), secrets(), resolver=FakeResolver()), ev)
    assert (result.outcome, result.attempts, result.status_code) == ("delivered", 1, 200)
    [req] = r.requests
    assert req["method"] == "POST" and req["path"] == "/hook?source=videogen"
    payload = verify(req)
    assert payload["type"] == "video.completed"
    assert payload["data"] == dict(ev.data)
    assert payload["timestamp"].endswith("Z")
    assert req["headers"]["webhook-id"] == ev.msg_id
    assert abs(int(req["headers"]["webhook-timestamp"]) - time.time()) < 60
    assert req["headers"]["content-type"] == "application/json"


def test_the_jobs_request_id_goes_with_every_attempt_and_the_signature_still_verifies(receiver):
    r = receiver(503, 200)
    ev = event(r.url(), request_id="client-7f3a", prompt="a cat")
    result = deliver(WebhookSender(config(r), secrets(), resolver=FakeResolver(), sleep=Sleeps()), ev)
    assert (result.outcome, result.attempts) == ("delivered", 2)
    assert [req["headers"]["x-request-id"] for req in r.requests] == ["client-7f3a", "client-7f3a"]
    assert verify(r.requests[-1])["data"] == dict(ev.data)  # the body (what is signed) is unchanged


@pytest.mark.parametrize("request_id", [None, "two words", "crlf\r\nx-evil: 1", "x" * 129])
def test_no_request_id_or_an_unusable_one_sends_no_header(receiver, request_id):
    r = receiver(200)
    ev = event(r.url(), request_id=request_id)
    result = deliver(WebhookSender(config(r), secrets(), resolver=FakeResolver()), ev)
    assert result.outcome == "delivered"  # a stored value a header cannot carry never breaks the delivery
    [req] = r.requests
    assert "x-request-id" not in req["headers"] and "x-evil" not in req["headers"]
    verify(req)


def test_retries_after_5xx_then_success_share_one_webhook_id(receiver):
    r = receiver(500, 503, 200)
    result = deliver(WebhookSender(config(r), secrets(), resolver=FakeResolver()), event(r.url(), "failed"))
    assert (result.outcome, result.attempts) == ("delivered", 3)
    assert len(r.requests) == 3
    assert {q["headers"]["webhook-id"] for q in r.requests} == {result.msg_id}
    assert len({q["body"] for q in r.requests}) == 1  # the same signed bytes every attempt
    for q in r.requests:
        assert verify(q)["type"] == "video.failed"


def test_permanent_4xx_stops_retrying(receiver):
    r = receiver(410, 200)
    result = deliver(WebhookSender(config(r, max_attempts=5), secrets(), resolver=FakeResolver()),
                     event(r.url()))
    assert (result.outcome, result.attempts, result.status_code) == ("failed", 1, 410)
    assert len(r.requests) == 1


def test_redirect_is_never_followed(receiver):
    target = receiver(200)
    redirector = receiver((302, {"Location": target.url("/elsewhere")}), 200)
    result = deliver(WebhookSender(config(target, redirector), secrets(), resolver=FakeResolver()),
                     event(redirector.url()))
    assert (result.outcome, result.status_code) == ("failed", 302)
    assert "redirect" in (result.error or "")
    assert len(redirector.requests) == 1
    assert target.requests == []


def test_retry_after_is_honoured_up_to_max_backoff(receiver):
    r = receiver((429, {"Retry-After": "7"}), (503, {"Retry-After": "100000"}), 200)
    sleeps = Sleeps()
    sender = WebhookSender(config(r, base_backoff_s=0.5, max_backoff_s=30), secrets(), resolver=FakeResolver(),
                           sleep=sleeps, rng=lambda: 0.0)
    result = deliver(sender, event(r.url()))
    assert (result.outcome, result.attempts) == ("delivered", 3)
    assert sleeps.delays == [7.0, 30.0]


def test_connection_errors_retry_with_capped_exponential_backoff():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    cfg = WebhookConfig(enabled=True, require_https=False, allow_hosts=[f"127.0.0.1:{port}"], max_attempts=5,
                        base_backoff_s=1.0, max_backoff_s=3.0)
    result = deliver(WebhookSender(cfg, secrets(), resolver=FakeResolver(), sleep=sleeps, rng=lambda: 1.0),
                     event(f"http://127.0.0.1:{port}/"))
    assert (result.outcome, result.attempts, result.status_code) == ("failed", 5, None)
    assert "ConnectError" in (result.error or "")
    assert sleeps.delays == [1.0, 2.0, 3.0, 3.0]


def test_a_receiver_slower_than_the_timeout_is_retried_then_given_up(receiver):
    hold = threading.Event()
    r = receiver(hold=hold)
    result = deliver(WebhookSender(config(r, timeout_s=0.3, max_attempts=2), secrets(), resolver=FakeResolver()),
                     event(r.url()))
    assert (result.outcome, result.attempts) == ("failed", 2)
    assert "no response within" in (result.error or "")


def test_schedule_returns_at_once_while_a_slow_receiver_holds_the_delivery(receiver):
    hold = threading.Event()
    r = receiver(hold=hold)
    results: list[DeliveryResult] = []

    async def main() -> None:
        sender = WebhookSender(config(r), secrets(), resolver=FakeResolver(), on_result=results.append)
        t0 = time.perf_counter()
        assert sender.schedule(event(r.url())) is True
        assert time.perf_counter() - t0 < 0.5  # the receiver answers only once `hold` is set below
        await wait_until(lambda: len(r.requests) == 1, "the receiver to get the request")
        assert results == [] and sender.pending == 1
        hold.set()
        await wait_until(lambda: len(results) == 1, "the delivery result")
        assert results[0].outcome == "delivered"
        await wait_until(lambda: sender.pending == 0, "the task to end")
        await sender.aclose()

    asyncio.run(main())


def test_schedule_is_a_no_op_when_disabled(receiver):
    r = receiver(200)

    async def main() -> None:
        sender = WebhookSender(config(r, enabled=False), secrets(), resolver=FakeResolver())
        assert sender.schedule(event(r.url())) is False
        assert sender.pending == 0
        await sender.aclose()

    asyncio.run(main())
    assert r.requests == []


def test_async_on_result_hook_errors_never_reach_the_caller(receiver):
    r = receiver(200)

    async def broken(_: DeliveryResult) -> None:
        raise RuntimeError("hook bug")

    result = deliver(WebhookSender(config(r), secrets(), resolver=FakeResolver(), on_result=broken), event(r.url()))
    assert result.outcome == "delivered"


def test_connection_goes_to_the_checked_address_with_the_name_in_host(receiver):
    r = receiver(200)
    resolver = FakeResolver({"hooks.test": ["127.0.0.1"]})
    cfg = config(allow_hosts=[f"hooks.test:{r.port}"])
    result = deliver(WebhookSender(cfg, secrets(), resolver=resolver), event(f"http://hooks.test:{r.port}/x"))
    assert result.outcome == "delivered"
    assert r.requests[0]["headers"]["host"] == f"hooks.test:{r.port}"
    assert resolver.calls == ["hooks.test"]  # the autouse guard checks the system resolver was never asked


@pytest.mark.parametrize("rebound", [["127.0.0.1"], [PUBLIC4, "127.0.0.1"], ["::ffff:127.0.0.1"]])
def test_dns_rebinding_after_registration_is_refused_at_send_time(receiver, rebound):
    r = receiver(200)
    url = f"http://rebind.example:{r.port}/"
    resolver = FakeResolver([PUBLIC4], rebound)
    cfg = config(max_attempts=3)
    validate_webhook_url(url, cfg, resolver=resolver)  # public at registration
    result = deliver(WebhookSender(cfg, secrets(), resolver=resolver), event(url))
    assert (result.outcome, result.attempts) == ("refused", 0)
    assert "127.0.0.1" in (result.error or "")
    assert resolver.calls == ["rebind.example", "rebind.example"]
    assert r.requests == []


def test_a_dns_failure_is_retried_and_re_resolved(receiver):
    r = receiver(200)
    resolver = FakeResolver(socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), {"hooks.test": ["127.0.0.1"]})
    result = deliver(WebhookSender(config(allow_hosts=[f"hooks.test:{r.port}"]), secrets(), resolver=resolver),
                     event(f"http://hooks.test:{r.port}/"))
    assert (result.outcome, result.attempts) == ("delivered", 1)
    assert resolver.calls == ["hooks.test", "hooks.test"]


def test_no_secret_for_the_tenant_sends_nothing(receiver):
    r = receiver(200)
    result = deliver(WebhookSender(config(r), WebhookSecrets(), resolver=FakeResolver()), event(r.url()))
    assert (result.outcome, result.attempts) == ("failed", 0)
    assert r.requests == []


def test_an_oversized_event_is_sent_thin(receiver):
    r = receiver(200)
    ev = event(r.url(), prompt="x" * 5000)
    result = deliver(WebhookSender(config(r, max_payload_bytes=1024), secrets(), resolver=FakeResolver()), ev)
    assert result.outcome == "delivered"
    assert len(r.requests[0]["body"]) <= 1024
    assert verify(r.requests[0])["data"] == {"id": ev.job_id, "object": "video", "status": "completed"}


def self_signed(tmp_path: Any, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only this certificate) for a certificate naming `name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=pem.decode())
    return server, client


@pytest.mark.parametrize(("cert_name", "outcome"), [("hooks.test", "delivered"), ("other.test", "failed")])
def test_https_to_a_pinned_address_checks_the_certificate_against_the_name(receiver, tmp_path, cert_name, outcome):
    server_tls, client_tls = self_signed(tmp_path, cert_name)
    r = receiver(200, tls=server_tls)
    cfg = config(allow_hosts=[f"hooks.test:{r.port}"], require_https=True, max_attempts=1)
    sender = WebhookSender(cfg, secrets(), resolver=FakeResolver({"hooks.test": ["127.0.0.1"]}),
                           transport=httpx.AsyncHTTPTransport(verify=client_tls))
    result = deliver(sender, event(f"https://hooks.test:{r.port}/tls"))
    assert result.outcome == outcome, result.error
    if outcome == "delivered":
        verify(r.requests[0])
    else:
        assert "certificate" in (result.error or "").lower() and r.requests == []


def test_a_jobs_end_hands_its_request_id_to_the_webhook():
    from serve.config import AppConfig
    from serve.jobs.hooks import JobEnd
    from serve.jobs.record import JobRecord
    from tests.params import example_params

    class Limiter:
        async def release(self, tenant: str, job_id: str) -> None:
            pass

    class Notifier:
        def __init__(self) -> None:
            self.events: list[WebhookEvent] = []

        def url_for(self, tenant: str, job_url: str | None) -> str | None:
            return job_url

        def schedule(self, event: WebhookEvent, on_done=None) -> bool:
            self.events.append(event)
            return True

    class Video:
        def model_dump(self, mode: str, exclude: set[str] | None = None) -> dict[str, Any]:
            return {"id": job.id, "object": "video", "status": "failed"}

    job = JobRecord(id=new_job_id(), tenant="acme", status="failed", created_at=1, completed_at=2, model="m",
                    prompt="p", params=example_params(), webhook_url="https://hooks.test/h", request_id="client-7f3a")
    notifier = Notifier()
    asyncio.run(JobEnd(AppConfig(), Limiter(), None, notifier, lambda _job: Video())(job))  # type: ignore[arg-type]
    [ev] = notifier.events
    assert (ev.type, ev.job_id, ev.request_id) == ("video.failed", job.id, "client-7f3a")
