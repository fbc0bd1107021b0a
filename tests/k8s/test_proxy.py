"""The front proxy (k8s/base/proxy.yaml, proxy-nginx.conf): the manifests wire it in front of KubeRay's Serve
Service, its nginx.conf holds the limits the app relies on (the directives, read from the shipped file), and a real
nginx running that file (addresses, paths and the three timeouts rewritten for a local run) enforces them: headers
trickled in are cut after client_header_timeout, a stalled body after client_body_timeout, an idle keep-alive
after keepalive_timeout; an oversized header is a 431, a long request line a 414, an oversized body a 413, all in
the API's error envelope; a body is read whole before the upstream sees it; Ray Serve's per-request controls and
the client's Host never reach the upstream, X-Request-ID does.

Not tested here (no cluster): that the CNI enforces the NetworkPolicies, that the image tag exists and runs this
file as uid 101 on a read-only root, that KubeRay's Service resolves; nor send_timeout (a client that stops reading
a long reply), which needs a reply larger than the socket buffers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serve.api.hardening import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_VALUE_BYTES,
)
from serve.config import AppConfig
from tests.k8s.kube import K8S
from tests.k8s.nginx import Config, Directive, parse, seconds, size_bytes

CONF = K8S / "base" / "proxy-nginx.conf"
HTTP_PORT, HEALTH_PORT = 8080, 8081  # what the shipped file listens on (the manifests' container ports: tested)
LOCAL_TIMEOUT_S = 1.0  # the three client timeouts, shortened for the live run (the shipped values are tested apart)


def shipped() -> Config:
    return parse(CONF.read_text())


def _named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def _api_server() -> Directive:
    return shipped().server_listening(HTTP_PORT)


def _proxied() -> Directive:
    (location,) = [d for d in _api_server().find("location") if d.args == ["/"]]
    return location


def _set_headers(location: Directive) -> dict[str, str]:
    return {d.args[0].lower(): d.args[1] for d in location.find("proxy_set_header")}


# ---- the manifests ---------------------------------------------------------------------------------------------


def test_the_proxy_runs_the_shipped_file_in_front_of_kuberays_serve_service(objects: tuple[dict[str, Any], ...],
                                                                           rayservice: dict[str, Any],
                                                                           serve_config: dict[str, Any]) -> None:
    deployment = _named(objects, "Deployment", "videogen-proxy")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "health": HEALTH_PORT}
    # the generated ConfigMap (hash-suffixed name) holds the file byte for byte, mounted as nginx's main config
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_mount = mounts["/etc/nginx/nginx.conf"]
    config_map = _named(objects, "ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    assert config_map["metadata"]["name"].startswith("videogen-proxy-nginx-"), "kustomize's content hash"
    assert config_map["data"][config_mount["subPath"]] == CONF.read_text()
    # non-root on a read-only root filesystem: everything nginx writes is under the /tmp emptyDir
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    conf = shipped()
    writes = [conf.main().one("pid").args[0]] + [d.args[0] for d in conf.http().block or []
                                                 if d.name.endswith("_temp_path")]
    assert len(writes) == 6 and all(w.startswith("/tmp/") for w in writes), writes
    # probes hit the health server: liveness nginx itself, readiness the app's /readyz through it
    assert (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]) == (
        "/healthz", "/readyz")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
        health = conf.server_listening(HEALTH_PORT)
        assert container[probe]["httpGet"]["path"] in [d.args[-1] for d in health.find("location")]
    # the Service sends to these pods' http port
    service = _named(objects, "Service", "videogen-proxy")
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # the upstream is KubeRay's Serve Service of this RayService (<name>-serve-svc) on the Serve port
    (server,) = conf.http().one("upstream").find("server")
    expected = f"{rayservice['metadata']['name']}-serve-svc:{serve_config['http_options']['port']}"
    assert server.args == [expected]
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True  # that Service reaches the workers only


# ---- the shipped directives ------------------------------------------------------------------------------------


def test_the_body_cap_is_the_apps() -> None:
    http = shipped().http()
    assert size_bytes(http.one("client_max_body_size").args[0]) == MAX_BODY_BYTES
    assert http.one("client_max_body_size").args[0] == "25m"
    message = json.loads(_error_page(413)[1])["error"]["message"]
    assert str(MAX_BODY_BYTES) in message


def test_header_buffers_are_bounded_and_looser_than_the_apps_limits() -> None:
    http = shipped().http()
    count, size = http.one("large_client_header_buffers").args
    line, total = size_bytes(size), int(count) * size_bytes(size)
    # one header line is name + ": " + value: the app's longest value with a long name still fits, and all of
    # the app's headers together; so the app's 431 is what an ordinary client over its limits sees
    assert line >= MAX_VALUE_BYTES + 256, line
    assert total >= MAX_HEADER_BYTES + MAX_HEADERS * 4, total  # ": " and CRLF per header
    assert total <= 256 * 1024, "bounded: nginx holds these buffers per connection"
    assert size_bytes(http.one("client_header_buffer_size").args[0]) <= 4096


def test_client_timeouts_are_short_and_the_upstreams_long_enough() -> None:
    http = shipped().http()
    limits = {"client_header_timeout": 15, "client_body_timeout": 60, "send_timeout": 120, "keepalive_timeout": 75}
    for name, most in limits.items():
        (value,) = http.one(name).args
        assert 0 < seconds(value) <= most, f"{name} {value}: at most {most}s"
    assert http.one("reset_timedout_connection").args == ["on"]
    location = _proxied()
    assert location.one("proxy_request_buffering").args == ["on"], "the body is read here, whole, before Serve"
    assert seconds(location.one("proxy_connect_timeout").args[0]) <= 10


def test_the_upstream_read_timeout_outlasts_the_longest_wait(app_config: AppConfig,
                                                             serve_config: dict[str, Any]) -> None:
    read = seconds(_proxied().one("proxy_read_timeout").args[0])
    # POST /v1/videos/sync answers nothing until its wait ends
    assert read > app_config.api.sync_max_wait_s, (read, app_config.api.sync_max_wait_s)
    # Serve's timeout cancels the request in the replica: it must come after the longest wait and before nginx's
    serve_timeout = serve_config["http_options"]["request_timeout_s"]
    assert app_config.api.sync_max_wait_s < serve_timeout < read, (app_config.api.sync_max_wait_s, serve_timeout,
                                                                   read)


def test_upstream_keepalive_ends_before_serves(serve_config: dict[str, Any]) -> None:
    from ray.serve.config import HTTPOptions

    serve_keepalive = serve_config["http_options"].get("keep_alive_timeout_s",
                                                       HTTPOptions().keep_alive_timeout_s)
    upstream = shipped().http().one("upstream")
    assert seconds(upstream.one("keepalive_timeout").args[0]) < serve_keepalive, \
        "nginx would reuse a connection Serve's proxy is closing (a 502)"
    assert int(upstream.one("keepalive").args[0]) >= 1
    location = _proxied()
    assert location.one("proxy_http_version").args == ["1.1"]
    assert _set_headers(location)["connection"] == "", "keep-alive to the upstream needs Connection cleared"


def test_serves_per_request_controls_and_the_clients_host_are_not_passed() -> None:
    from ray.serve._private import constants

    headers = _set_headers(_proxied())
    for name in (constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER, constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER):
        assert headers.get(name.lower()) == "", f"{name} from a client would reach Serve's proxy"
    assert headers["host"] == "$proxy_host", "never the client's Host"
    assert headers[constants.SERVE_HTTP_REQUEST_ID_HEADER] == "$http_x_request_id", "X-Request-ID as sent"
    assert shipped().http().one("server_tokens").args == ["off"]


def _error_page(status: int) -> tuple[Directive, str]:
    """The location an error_page of `status` goes to, and the body it returns."""
    server = _api_server()
    pages = {code: d.args[-1] for d in server.find("error_page") for code in d.args[:-1] if code.isdigit()}
    target = [d for d in server.find("location") if d.args == ["=", pages[str(status)]]]
    assert len(target) == 1, f"error_page {status}: no location {pages[str(status)]}"
    (ret,) = target[0].find("return")
    return target[0], ret.args[1]


@pytest.mark.parametrize("status, shown, code", [(400, 400, "invalid_request"), (413, 413, "request_too_large"),
                                                 (414, 414, "request_uri_too_long"),
                                                 (494, 431, "request_headers_too_large"),
                                                 (502, 502, "service_unavailable"), (504, 504, "upstream_timeout")])
def test_nginxs_own_refusals_are_the_apis_error_envelope(status: int, shown: int, code: str) -> None:
    location, body = _error_page(status)
    assert location.find("internal"), "an error page is not a route of its own"
    (ret,) = location.find("return")
    assert int(ret.args[0]) == shown
    assert location.one("default_type").args == ["application/json"]
    envelope = json.loads(body)
    assert set(envelope) == {"error"} and set(envelope["error"]) == {"message", "type", "param", "code"}
    assert envelope["error"]["code"] == code and envelope["error"]["message"]
    page = next(d for d in _api_server().find("error_page") if str(status) in d.args)
    assert (f"={shown}" in page.args) == (status != shown)



@pytest.mark.parametrize("status, shown, code", [(400, 400, "invalid_request"), (413, 413, "request_too_large"),
                                                 (414, 414, "request_uri_too_long"),
                                                 (494, 431, "request_headers_too_large"),
                                                 (502, 502, "service_unavailable"), (504, 504, "upstream_timeout")])
def test_on_zhipus_routes_the_refusals_are_zhipus_envelope(status: int, shown: int, code: str) -> None:
    from serve.api import zhipu

    location, body = _error_page(status)
    (branch,) = location.find("if")
    assert branch.args == ["($zhipu_route)"]
    (ret,) = branch.find("return")
    assert int(ret.args[0]) == shown
    message = json.loads(body)["error"]["message"]
    assert json.loads(ret.args[1]) == zhipu.error_body(shown, message, None, code)
    (routes,) = shipped().http().find("map")
    assert routes.args == ["$request_uri", "$zhipu_route"]
    assert [d.name for d in routes.block or []] == [f"~^{zhipu.PREFIX}/", "default"]


def test_the_readiness_probe_asks_the_app() -> None:
    location = shipped().server_listening(HEALTH_PORT)
    (readyz,) = [d for d in location.find("location") if d.args == ["=", "/readyz"]]
    assert readyz.one("proxy_pass").args == ["http://serve/readyz"]
    assert seconds(readyz.one("proxy_read_timeout").args[0]) > 7  # a HEAD (5 s) and a canary wait (2 s)


# ---- a real nginx running the shipped file ---------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int


@dataclass
class Upstream:
    """A tiny HTTP/1.1 server standing in for Serve: answers JSON and records what reached it."""

    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def start(self) -> Upstream:
        record = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                # recorded as the headers arrive: a body still on its way shows as a request already seen
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, 0)
                record.append(seen)
                remaining = int(self.headers.get("content-length") or 0)
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 20))
                    if not data:
                        return
                    remaining -= len(data)
                    seen.body_bytes += len(data)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Request-ID", self.headers.get("x-request-id") or "made-by-upstream")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config(upstream_port: int, port: int, health_port: int, workdir: Path) -> str:
    """The shipped file with its addresses, paths and client timeouts rewritten for a local run; every other
    directive as shipped."""
    conf = shipped()
    main, http = conf.main(), conf.http()
    main.one("pid").raw = [str(workdir / "nginx.pid")]
    main.one("error_log").raw = [str(workdir / "error.log"), "info"]
    for d in http.block or []:
        if d.name.endswith("_temp_path"):
            d.raw = [str(workdir / Path(d.args[0]).name)]
    http.one("access_log").raw = [str(workdir / "access.log"), "api"]
    for name in ("client_header_timeout", "client_body_timeout", "keepalive_timeout"):
        http.one(name).raw = [f"{int(LOCAL_TIMEOUT_S * 1000)}ms"]
    http.one("upstream").one("server").raw = [f"127.0.0.1:{upstream_port}"]
    conf.server_listening(HTTP_PORT).one("listen").raw = [f"127.0.0.1:{port}", "default_server"]
    conf.server_listening(HEALTH_PORT).one("listen").raw = [f"127.0.0.1:{health_port}"]
    return conf.text()


@dataclass
class Nginx:
    port: int
    health_port: int
    upstream: Upstream
    workdir: Path

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""


def _nginx_binary() -> str:
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                         if Path(p).is_file()), None)
    if exe is None:
        # fail, not skip (as tests/k8s/kube.py does for kubectl): README's test command installs it
        pytest.fail("nginx is not installed: run scripts/setup.sh --test-tools (installs Debian's nginx)",
                    pytrace=False)
    return exe


@contextlib.contextmanager
def _run_nginx(upstream: Upstream) -> Iterator[Nginx]:
    exe = _nginx_binary()
    # not pytest's tmp_path: run as root, nginx's workers are `nobody` and must reach the temp paths
    workdir = Path(tempfile.mkdtemp(prefix="videogen-nginx-"))
    workdir.chmod(0o755)
    port, health_port = _free_port(), _free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(local_config(upstream.port, port, health_port, workdir))
    check = subprocess.run([exe, "-t", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([exe, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "nginx exited"
            try:
                socket.create_connection(("127.0.0.1", health_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.02)
        yield Nginx(port, health_port, upstream, workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def nginx() -> Iterator[Nginx]:
    upstream = Upstream().start()
    try:
        with _run_nginx(upstream) as running:
            yield running
    finally:
        upstream.stop()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _send(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with _connect(port) as sock:
        sock.sendall(raw)
        return _response(sock)


def _assert_envelope(body: bytes, code: str) -> dict[str, Any]:
    envelope = json.loads(body)
    assert envelope["error"]["code"] == code, envelope
    return envelope["error"]


def _closed_after(sock: socket.socket, trickle: bytes | None, limit_s: float) -> float:
    """Seconds until the server closes `sock` (EOF or reset), sending one byte of `trickle` every 0.1 s meanwhile;
    fails if it is still open after `limit_s`."""
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < limit_s:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - start
            assert data == b"", f"the server answered instead of closing: {data[:200]!r}"
            return time.monotonic() - start
        if trickle is not None and sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
            sent += 1
    pytest.fail(f"the connection was still open after {limit_s}s")


def test_an_ordinary_request_is_proxied_with_its_request_id_and_without_serves_controls(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    status, headers, body = _send(nginx.port, b"GET /v1/videos HTTP/1.1\r\nHost: evil.example\r\n"
                                              b"X-Request-ID: req-123\r\nX-Request-Timeout-Seconds: 0\r\n"
                                              b"X-Request-Disconnect-Disabled: ?1\r\nConnection: close\r\n\r\n")
    assert (status, json.loads(body)) == (200, {"ok": True})
    assert headers["x-request-id"] == "req-123" and headers["server"] == "nginx", headers  # no version
    (seen,) = nginx.upstream.seen[before:]
    assert seen.path == "/v1/videos" and seen.headers["x-request-id"] == "req-123"
    assert seen.headers["host"] == "serve" and "evil.example" not in json.dumps(seen.headers)
    assert "x-request-timeout-seconds" not in seen.headers and "x-request-disconnect-disabled" not in seen.headers
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    # without one, none is made up here: Serve's proxy makes its own
    _send(nginx.port, b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert "x-request-id" not in nginx.upstream.seen[-1].headers


def test_trickled_headers_are_cut_after_client_header_timeout(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    with _connect(nginx.port) as sock:
        sock.sendall(b"GET /v1/videos HTTP/1.1\r\nHost: x\r\n")
        # a byte every 0.1 s: each read is quick, the header as a whole never completes
        elapsed = _closed_after(sock, b"X-Slow: " + b"a" * 200, limit_s=LOCAL_TIMEOUT_S + 3)
    assert LOCAL_TIMEOUT_S * 0.9 <= elapsed <= LOCAL_TIMEOUT_S + 2, elapsed
    assert len(nginx.upstream.seen) == before, "nothing reached the upstream"


def test_a_stalled_body_is_cut_after_client_body_timeout_and_never_reaches_the_upstream(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    with _connect(nginx.port) as sock:
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b" " * 100)
        time.sleep(0.3)
        assert len(nginx.upstream.seen) == before, "the body is read whole before the upstream sees the request"
        elapsed = _closed_after(sock, None, limit_s=LOCAL_TIMEOUT_S + 3)
    assert elapsed <= LOCAL_TIMEOUT_S + 2, elapsed
    assert len(nginx.upstream.seen) == before


def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(nginx: Nginx) -> None:
    with _connect(nginx.port) as sock:
        sock.sendall(b"GET /v1/videos HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = _response(sock)
        assert status == 200 and headers.get("connection") == "keep-alive"
        elapsed = _closed_after(sock, None, limit_s=LOCAL_TIMEOUT_S + 3)
    assert elapsed <= LOCAL_TIMEOUT_S + 2


def test_oversized_headers_and_request_lines_are_refused_in_the_envelope(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    status, headers, body = _send(nginx.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
                                  + b"\r\nConnection: close\r\n\r\n")
    assert status == 431 and headers["content-type"] == "application/json"
    _assert_envelope(body, "request_headers_too_large")
    # each header within one buffer, all of them past the buffers together
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 8_000) for i in range(12))
    status, _, body = _send(nginx.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"Connection: close\r\n\r\n")
    assert status == 431
    _assert_envelope(body, "request_headers_too_large")
    status, _, body = _send(nginx.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 414
    _assert_envelope(body, "request_uri_too_long")
    status, _, body = _send(nginx.port, b"NOT HTTP\r\n\r\n")
    assert status == 400
    _assert_envelope(body, "invalid_request")
    assert len(nginx.upstream.seen) == before
    # what the app refuses itself (a value over its 8 KiB) gets through, so the client sees the app's 431
    status, _, _ = _send(nginx.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_VALUE_BYTES + 1)
                         + b"\r\nConnection: close\r\n\r\n")
    assert status == 200 and nginx.upstream.seen[-1].headers["x-big"] == "a" * (MAX_VALUE_BYTES + 1)


def test_an_oversized_body_is_413_and_a_body_within_the_cap_reaches_the_upstream_whole(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # declared too large: answered from the headers, before any of the body is sent
    with _connect(nginx.port) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        status, headers, body = _response(sock)
    assert status == 413 and headers["connection"] == "close"
    assert str(MAX_BODY_BYTES) in _assert_envelope(body, "request_too_large")["message"]
    # chunked, passing the cap while it streams
    with _connect(nginx.port) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = 1024 * 1024
        try:
            for _ in range(MAX_BODY_BYTES // chunk + 2):
                sock.sendall(b"%x\r\n" % chunk + b" " * chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # nginx may close before the last chunks
        status, _, body = _response(sock)
    assert status == 413
    _assert_envelope(body, "request_too_large")
    assert len(nginx.upstream.seen) == before, "neither reached the upstream"
    # exactly the cap, chunked: read whole, then sent on with a Content-Length (Serve never sees chunked)
    with _connect(nginx.port) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for _ in range(MAX_BODY_BYTES // chunk):
            sock.sendall(b"%x\r\n" % chunk + b" " * chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, _, _ = _response(sock)
    assert status == 200
    (seen,) = nginx.upstream.seen[before:]
    assert seen.body_bytes == MAX_BODY_BYTES and int(seen.headers["content-length"]) == MAX_BODY_BYTES
    assert "transfer-encoding" not in seen.headers


def test_the_health_port_answers_itself(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    status, _, body = _send(nginx.health_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (status, body) == (200, b"ok\n")
    status, _, _ = _send(nginx.health_port, b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and len(nginx.upstream.seen) == before


def test_readyz_on_the_health_port_is_the_apps_answer(nginx: Nginx) -> None:
    before = len(nginx.upstream.seen)
    status, _, body = _send(nginx.health_port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (status, json.loads(body)) == (200, {"ok": True})
    (seen,) = nginx.upstream.seen[before:]
    assert seen.path == "/readyz"


def test_a_zhipu_route_gets_zhipus_envelope_from_nginx(nginx: Nginx) -> None:
    status, _, body = _send(nginx.port, b"POST /api/paas/v4/videos/generations HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (MAX_BODY_BYTES + 1))
    assert status == 413
    error = json.loads(body)["error"]
    assert (error["code"], error["videogen_code"]) == ("1214", "request_too_large")


def test_an_unreachable_upstream_is_502_in_the_envelope() -> None:
    down = Upstream().start()
    down.stop()  # its port is free again: nothing listens there
    with _run_nginx(down) as running:
        status, headers, body = _send(running.port, b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 502 and headers["retry-after"] == "1"
        _assert_envelope(body, "service_unavailable")
