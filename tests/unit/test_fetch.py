"""Remote input images (serve/media/fetch.py): the SSRF guard, pinning, no redirects, byte cap and deadline, against
a real HTTP server on 127.0.0.1.

Network: the server is an `http.server` on 127.0.0.1 started here; host names are answered by an injected resolver,
and an autouse guard fails any test that reaches the system's DNS. Tests are plain functions around `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from serve.config.app import ImagesConfig
from serve.errors import ServiceError
from serve.media.fetch import fetch_image
from serve.media.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # 2,056 bytes; fetch_image does not decode
CAP = 4096
PUBLIC4 = "93.184.216.34"
HOLD_S = 5.0  # how long a stalling handler holds its connection at most


@pytest.fixture(autouse=True)
def no_system_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any lookup of a name (not an IP literal) through the system resolver fails the test."""
    real = socket.getaddrinfo
    names: list[Any] = []

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
        except (ValueError, TypeError):
            names.append(host)
            raise OSError(f"test guard: system DNS lookup of {host!r} refused") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert names == [], f"system DNS was asked for {names}"


class FakeResolver:
    """getaddrinfo-shaped; answers[i] is the i-th call's answer (the last repeats): name -> addresses."""

    def __init__(self, *answers: dict[str, list[str]]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        addrs = self.answers[min(len(self.calls), len(self.answers)) - 1].get(host)
        if addrs is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addrs]


class ImageServer:
    """HTTP/1.1 on 127.0.0.1; the path picks the behaviour. Records every request and how many body bytes it sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sent: dict[str, int] = {}
        self.release = threading.Event()
        self.redirect_to = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                outer.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                getattr(self, "_" + path.strip("/").replace("-", "_"), self._not_found)()

            def _img(self) -> None:
                self._answer(200, PNG, {"content-type": "image/png"})

            def _redirect(self) -> None:
                self._answer(302, b"", {"location": outer.redirect_to})

            def _declared_big(self) -> None:  # headers only, then silence: reading the body would hang
                self.send_response(200)
                self.send_header("content-length", str(CAP + 1))
                self.end_headers()
                self.wfile.flush()
                outer.release.wait(HOLD_S)

            def _chunked(self) -> None:  # no Content-Length; 64 KiB in 1 KiB chunks, far past CAP
                self.send_response(200)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                sent = 0
                try:
                    for _ in range(64):
                        self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                        self.wfile.flush()
                        sent += 1024
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                outer.sent["chunked"] = sent

            def _stall(self) -> None:  # half the body, then nothing
                self.send_response(200)
                self.send_header("content-length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG[:100])
                self.wfile.flush()
                outer.release.wait(HOLD_S)

            def _trickle(self) -> None:  # a byte every 50 ms: no single read ever waits long
                self.send_response(200)
                self.send_header("content-length", str(len(PNG)))
                self.end_headers()
                try:
                    for i in range(len(PNG)):
                        if outer.release.wait(0.05):
                            return
                        self.wfile.write(PNG[i:i + 1])
                        self.wfile.flush()
                except OSError:
                    pass

            def _not_found(self) -> None:
                self._answer(404, b"no such image", {})

            def _answer(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def paths(self) -> list[str]:
        return [r["path"].split("?")[0] for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    s = ImageServer()
    yield s
    s.close()


@pytest.fixture
def other() -> Iterator[ImageServer]:
    s = ImageServer()
    yield s
    s.close()


def cfg_for(*servers: ImageServer, **overrides: Any) -> ImagesConfig:
    fields: dict[str, Any] = {"remote_fetch": True, "allow_http": True, "allow_hosts": [s.host for s in servers],
                              "max_bytes": CAP, "fetch_timeout_s": 5.0}
    return ImagesConfig(**{**fields, **overrides})


def fetch(url: str, cfg: ImagesConfig, **kwargs: Any) -> bytes:
    return asyncio.run(fetch_image(url, cfg, param="input_reference", **kwargs))


def refused(url: str, cfg: ImagesConfig, **kwargs: Any) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        fetch(url, cfg, **kwargs)
    assert e.value.status == 400 and e.value.param == "input_reference"
    return e.value


# ---- config -------------------------------------------------------------------------------------------------------


def test_config_defaults_match_the_decoder_and_refuse_nonsense():
    d = ImagesConfig()
    assert (d.remote_fetch, d.allow_http, d.allow_hosts, d.fetch_timeout_s) == (False, False, [], 10.0)
    assert (d.max_bytes, d.max_pixels) == (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)  # written out in the config leaf
    assert ImagesConfig(allow_hosts=["Images.Example:8080", "[::1]:80"]).allow_hosts == ["images.example:8080",
                                                                                         "[::1]:80"]
    for bad in ({"fetch_timeout_s": 0}, {"fetch_timeout_s": 61}, {"max_bytes": 0}, {"allow_hosts": ["a b"]},
                {"remote_fetchh": True}):
        with pytest.raises(ValidationError):
            ImagesConfig(**bad)


# ---- fetching -----------------------------------------------------------------------------------------------------


def test_fetches_the_bytes_from_an_allow_listed_host(server: ImageServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="serve.media.fetch")
    assert fetch(server.url("/img?X-Amz-Signature=sekrit"), cfg_for(server)) == PNG
    assert server.paths() == ["/img"]
    headers = server.requests[0]["headers"]
    assert headers["host"] == server.host and headers["accept-encoding"] == "identity"
    assert "fetched http://127.0.0.1" in caplog.text and "sekrit" not in caplog.text


def test_refused_unless_the_operator_enables_remote_fetch(server: ImageServer):
    e = refused(server.url("/img"), cfg_for(server, remote_fetch=False))
    assert e.code == "remote_fetch_disabled" and "images.remote_fetch" in e.message
    assert server.requests == []


@pytest.mark.parametrize("allow", [False, True])
def test_loopback_and_private_addresses_are_refused_unless_allow_listed(server: ImageServer, allow: bool):
    e = refused(server.url("/img"), cfg_for(allow_hosts=[]))
    assert e.code == "invalid_image_url" and "loopback" in e.message
    assert "input_reference" in e.message and "webhook" not in e.message
    resolver = FakeResolver({"images.corp": ["10.0.0.7"]})
    e = refused("http://images.corp/a.png", cfg_for(allow_hosts=["images.corp:81"] if allow else []),
                resolver=resolver)  # allow-listing another port does not open this one
    assert e.code == "invalid_image_url" and "resolves to 10.0.0.7" in e.message and "private" in e.message
    assert server.requests == []


def test_plain_http_only_where_allowed(server: ImageServer):
    e = refused(server.url("/img"), cfg_for(server, allow_http=False))
    assert e.code == "invalid_image_url" and "must use https" in e.message
    assert server.requests == []


def test_a_redirect_is_refused_and_its_target_never_contacted(server: ImageServer, other: ImageServer):
    server.redirect_to = other.url("/img?token=sekrit")
    e = refused(server.url("/redirect"), cfg_for(server, other))
    assert e.code == "image_fetch_failed" and "redirect (302)" in e.message and "not followed" in e.message
    assert f"to http://{other.host}/…" in e.message and "sekrit" not in e.message
    assert server.paths() == ["/redirect"] and other.requests == []


def test_content_length_over_the_cap_is_refused_before_reading(server: ImageServer):
    t0 = time.monotonic()
    e = refused(server.url("/declared-big"), cfg_for(server))
    assert e.code == "image_too_large" and f"{CAP + 1:,} bytes (Content-Length)" in e.message
    assert time.monotonic() - t0 < 2.0  # reading the body would have waited for the deadline (5 s)


def test_a_body_streaming_past_the_cap_is_cut_off(server: ImageServer):
    e = refused(server.url("/chunked"), cfg_for(server))
    assert e.code == "image_too_large" and "runs past the limit" in e.message and f"{CAP:,}" in e.message


def test_a_stalling_server_is_given_up_after_the_timeout(server: ImageServer):
    t0 = time.monotonic()
    e = refused(server.url("/stall"), cfg_for(server, fetch_timeout_s=0.3))
    took = time.monotonic() - t0
    assert e.code == "image_fetch_failed" and "within 0.3 s" in e.message
    assert 0.25 < took < 2.0


def test_a_relative_redirect_names_its_target_on_the_same_host(server: ImageServer):
    server.redirect_to = "/img?token=sekrit"
    e = refused(server.url("/redirect"), cfg_for(server))
    assert f"redirect (302) to http://{server.host}/…" in e.message and "sekrit" not in e.message
    assert server.paths() == ["/redirect"]


def test_the_deadline_covers_the_whole_fetch_not_each_read(server: ImageServer):
    t0 = time.monotonic()
    e = refused(server.url("/trickle"), cfg_for(server, fetch_timeout_s=0.5))
    assert e.code == "image_fetch_failed" and "within 0.5 s" in e.message
    assert time.monotonic() - t0 < 2.0  # the whole body would take 100 s


def test_a_non_2xx_answer_names_the_status_but_not_the_query(server: ImageServer):
    e = refused(server.url("/missing.png?sig=sekrit"), cfg_for(server))
    assert e.code == "image_fetch_failed" and "HTTP 404" in e.message
    assert f"http://{server.host}/…" in e.message and "sekrit" not in e.message


def test_a_refused_connection_is_the_clients_url_problem(server: ImageServer):
    port = server.port
    server.close()  # nothing listens there any more
    e = refused(f"http://127.0.0.1:{port}/img", cfg_for(allow_hosts=[f"127.0.0.1:{port}"]))
    assert e.code == "image_fetch_failed" and "connection failed" in e.message


def test_connects_to_the_checked_address_without_a_second_lookup(server: ImageServer):
    """DNS rebinding: the name is checked once (127.0.0.1, allow-listed); a second lookup would give another
    address. The fetch reaches the server through the checked address with the original Host header."""
    name = f"images.test:{server.port}"
    resolver = FakeResolver({"images.test": ["127.0.0.1"]}, {"images.test": ["10.66.66.66"]})
    assert fetch(f"http://{name}/img", cfg_for(allow_hosts=[name]), resolver=resolver) == PNG
    assert resolver.calls == ["images.test"]  # and the autouse guard: httpx never resolved the name itself
    assert server.requests[0]["headers"]["host"] == name


def test_https_goes_to_the_checked_public_address_with_the_name_for_tls():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG)

    resolver = FakeResolver({"cdn.example": [PUBLIC4]})
    got = fetch("https://cdn.example/a.png?sig=x", ImagesConfig(remote_fetch=True), resolver=resolver,
                transport=httpx.MockTransport(answer))
    assert got == PNG and resolver.calls == ["cdn.example"]
    (req,) = seen
    assert str(req.url) == f"https://{PUBLIC4}/a.png?sig=x"  # the default port, normalised away
    assert req.headers["host"] == "cdn.example" and req.extensions["sni_hostname"] == "cdn.example"
