"""Hostile input to the HTTP API: each gets a clear 4xx in the error envelope and creates no job.

Driven like tests/unit/test_routes.py (its `serving()`: the real app over a fake stage chain and the local moto S3).
Covers: lone surrogates, deep JSON, bytes that are not UTF-8, NUL and other control characters, duplicate keys,
strict media types and Content-Encoding, no slash redirect built from the Host header, header limits, the body size
limit (from Content-Length at once, or as a chunked body streams past it), and the framework's own errors in the
envelope; and that ordinary JSON, multipart and urlencoded bodies still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api import body as body_module
from serve.api.errors import error_response, install_error_handlers
from serve.api.hardening import MAX_BODY_BYTES, BodyLimit, HeaderLimits
from serve.storage import Storage
from tests.unit.test_routes import (
    AUTH,
    SMALL,
    Env,
    assert_error,
    multipart,
    run,
    serving,
    wait_status,
)

JSON_CT = {**AUTH, "Content-Type": "application/json"}
FORM_CT = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}


def assert_no_job(env: Env) -> None:
    """Nothing was created: no job record, no index entry for the tenant, nothing run."""
    assert env.storage.list_keys(env.storage.key("jobs", "")) == []
    assert env.store.list(tenant="default") == ([], False)
    assert env.pipeline.calls == 0


async def post_json_bytes(env: Env, raw: bytes, headers: dict[str, str] = JSON_CT) -> httpx.Response:
    return await env.client.post("/v1/videos", content=raw, headers=headers)


async def post_multipart(env: Env, fields: dict[str, str], raw_prompt: bytes | None = None) -> httpx.Response:
    """A multipart body; `raw_prompt` replaces the prompt part's bytes exactly (the helper only encodes text)."""
    marker = "PROMPT-PLACEHOLDER"
    form, ctype = multipart({"prompt": marker if raw_prompt is not None else fields.pop("prompt"), **fields})
    if raw_prompt is not None:
        form = form.replace(marker.encode(), raw_prompt)
    return await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})


def small_json(prompt_json: str, extra: str = "") -> bytes:
    """A create body whose prompt is the given JSON string literal text (escapes kept as written)."""
    return ('{"prompt": "' + prompt_json + '", "size": "64x48", "num_frames": 9, "num_inference_steps": 4'
            + extra + "}").encode()


# ---- lone surrogates ------------------------------------------------------------------------------------------


def test_lone_surrogates_are_400_naming_the_field(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for raw, param in ((small_json("a \\ud800 cat"), "prompt"),
                               (small_json("a cat \\udfff"), "prompt"),
                               (small_json("\\ude00\\ud83d"), "prompt"),  # a pair in the wrong order is two lone ones
                               (small_json("a cat", ', "negative_prompt": "\\ud800"'), "negative_prompt"),
                               # raw bytes: the UTF-8-style encoding of U+D800, which UTF-8 forbids
                               (small_json("a cat").replace(b"a cat", b"a \xed\xa0\x80 cat"), "prompt"),
                               (small_json("a cat").replace(b'"size"', b'"negative_prompt": "\xed\xbf\xbf", "size"'),
                                "negative_prompt")):
                r = await post_json_bytes(env, raw)
                err = assert_error(r, 400, "invalid_value", param)
                assert "UTF-8" in err["message"] and param in err["message"]
            r = await post_multipart(env, {}, raw_prompt=b"a \xed\xa0\x80 cat")
            assert_error(r, 400, "invalid_value", "prompt")
            r = await env.client.post("/v1/videos", content=b"prompt=a+%ED%A0%80+cat", headers=FORM_CT)
            assert_error(r, 400, "invalid_value", "prompt")
            # a lone surrogate in a field name: refused without echoing it as the param
            r = await post_json_bytes(env, b'{"prompt": "a cat", "\\ud800": 1}')
            err = assert_error(r, 400, "invalid_value", None)
            assert "field name" in err["message"]
            assert_no_job(env)

    run(main())


# ---- deep JSON ------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400_invalid_json(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            deep = 10_000
            for raw in (b"[" * deep + b"]" * deep,
                        b"{" * deep,
                        b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}",
                        b'{"prompt": "a", "x": ' + b'{"a": ' * deep + b"1" + b"}" * deep + b"}"):
                err = assert_error(await post_json_bytes(env, raw), 400, "invalid_json")
                assert "nested more than" in err["message"]
            # depth built without a long run of openers ([[],[[],[[],...): bounded while parsing (RecursionError)
            # and after it (a depth just over the limit parses fine and is refused by the walk over the values)
            for n in (5_000, body_module.MAX_JSON_DEPTH + 2):
                raw = b'{"prompt": ' + b"[[]," * n + b"[]" + b"]" * n + b"}"
                err = assert_error(await post_json_bytes(env, raw), 400, "invalid_json")
                assert "nested more than" in err["message"]
            # brackets inside strings do not count
            raw = small_json("[" * 100 + "{" * 100)
            r = await post_json_bytes(env, raw)
            assert r.status_code == 200, r.text
            assert r.json()["prompt"] == "[" * 100 + "{" * 100
            await wait_status(env, r.json()["id"], "completed")
            # shallow nesting reaches the schema, which names the field
            r = await post_json_bytes(env, b'{"prompt": [[["a cat"]]]}')
            assert_error(r, 400, "invalid_value", "prompt")

    run(main())


def test_deep_json_creates_no_job_and_long_runs_of_brackets_never_reach_the_parser(
        storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []

    def loads(text: str, **kwargs: Any) -> Any:
        parsed.append(len(text))
        return json.loads(text, **kwargs)

    monkeypatch.setattr(body_module, "json", SimpleNamespace(loads=loads, JSONDecodeError=json.JSONDecodeError))

    async def main() -> None:
        async with serving(storage) as env:
            for raw in (b"[" * 10_000 + b"]" * 10_000, b'{"prompt": "a", "x": ' + b'[1, {"a": ' * 5_000 + b"}"):
                assert_error(await post_json_bytes(env, raw), 400, "invalid_json")
            assert parsed == []  # refused by the pre-scan
            raw = b'{"prompt": ' + b"[[]," * 5_000 + b"[]" + b"]" * 5_000 + b"}"
            assert_error(await post_json_bytes(env, raw), 400, "invalid_json")
            assert parsed == [len(raw)]  # this shape is bounded while parsing
            assert_no_job(env)

    run(main())


# ---- bytes that are not UTF-8 ---------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_are_refused_in_every_body_type(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for raw in (b"a \xff\xfe cat", b"caf\xe9", b"\xc3"):  # latin-1, UTF-16 BOM, a truncated sequence
                r = await post_multipart(env, {**{k: str(v) for k, v in SMALL.items()}}, raw_prompt=raw)
                err = assert_error(r, 400, "invalid_value", "prompt")
                assert "not UTF-8" in err["message"]
                r = await post_json_bytes(env, small_json("x").replace(b'"x"', b'"' + raw + b'"'))
                assert_error(r, 400, "invalid_value", "prompt")
            for form in (b"prompt=caf%E9", b"prompt=caf\xe9", b"size=64x48&prompt=%FF"):
                r = await env.client.post("/v1/videos", content=form, headers=FORM_CT)
                assert_error(r, 400, "invalid_value", "prompt")
            # not UTF-8 outside any string: not JSON at all
            assert_error(await post_json_bytes(env, b'\xff{"prompt": "a cat"}'), 400, "invalid_json")
            # UTF-16 JSON (which json.loads would guess and accept) is not UTF-8 either
            r = await post_json_bytes(env, '{"prompt": "a cat"}'.encode("utf-16"))
            assert r.status_code == 400, r.text
            assert_no_job(env)

    run(main())


# ---- NUL and other control characters --------------------------------------------------------------------------


def test_nul_and_control_characters_are_refused(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for escape in ("\\u0000", "\\u0007", "\\u001b", "\\u000b", "\\u001f"):
                r = await post_json_bytes(env, small_json(f"a {escape} cat"))
                err = assert_error(r, 400, "invalid_value", "prompt")
                assert "control character" in err["message"]
            r = await post_json_bytes(env, small_json("a cat", ', "negative_prompt": "x\\u0000"'))
            assert_error(r, 400, "invalid_value", "negative_prompt")
            r = await post_json_bytes(env, small_json("a cat", ', "model": "cogvideox\\u0000"'))
            assert_error(r, 400, "invalid_value", "model")
            # an unescaped control character inside a JSON string is not JSON
            assert_error(await post_json_bytes(env, small_json("a \x01 cat")), 400, "invalid_json")
            r = await post_multipart(env, {}, raw_prompt=b"a \x00 cat")
            assert_error(r, 400, "invalid_value", "prompt")
            r = await env.client.post("/v1/videos", content=b"prompt=a%00cat", headers=FORM_CT)
            assert_error(r, 400, "invalid_value", "prompt")
            assert_no_job(env)

    run(main())


# ---- duplicate keys -------------------------------------------------------------------------------------------


def test_duplicate_keys_are_refused(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await post_json_bytes(env, b'{"prompt": "a cat", "prompt": "a dog"}')
            err = assert_error(r, 400, "invalid_json", "prompt")
            assert "more than once" in err["message"]
            r = await post_json_bytes(env, b'{"prompt": "a", "seed": 1, "size": "64x48", "seed": 2}')
            assert_error(r, 400, "invalid_json", "seed")
            r = await post_json_bytes(env, b'{"prompt": "a", "x": {"k": 1, "k": 2}}')  # nested objects too
            assert_error(r, 400, "invalid_json", "k")
            part = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
            r = await env.client.post("/v1/videos", content=part * 2 + b"--b--\r\n",
                                      headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"})
            assert_error(r, 400, "invalid_value", "prompt")
            r = await env.client.post("/v1/videos", content=b"prompt=a&prompt=b", headers=FORM_CT)
            assert_error(r, 400, "invalid_value", "prompt")
            assert_no_job(env)

    run(main())


# ---- media types and encodings --------------------------------------------------------------------------------


def test_only_the_three_media_types_are_parsed(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = json.dumps({"prompt": "a cat", **SMALL}).encode()
            for ctype in ("application/jsonx", "application/json-patch+json", "application/vnd.api+json",
                          "text/json", "text/plain", "application/json, text/plain", "multipart/mixed; boundary=x",
                          "application/x-www-form-urlencodedx", "application/json; charset=latin-1",
                          "application/json; charset=utf-16", "application/x-www-form-urlencoded; charset=iso-8859-1",
                          "", "*/*"):
                r = await post_json_bytes(env, body, {**AUTH, "Content-Type": ctype})
                err = assert_error(r, 415, "unsupported_media_type")
                assert "application/json" in err["message"] or "UTF-8" in err["message"], err
            # no Content-Type at all is not taken for JSON
            r = await env.client.post("/v1/videos", content=body, headers=AUTH)
            assert_error(r, 415, "unsupported_media_type")
            # two Content-Type headers: ambiguous
            r = await env.client.post("/v1/videos", content=body, headers=httpx.Headers(
                [*AUTH.items(), ("Content-Type", "application/json"), ("Content-Type", "text/plain")]))
            assert_error(r, 415, "unsupported_media_type")
            assert_no_job(env)

    run(main())


def test_a_content_encoding_the_server_does_not_apply_is_415(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = json.dumps({"prompt": "a cat", **SMALL}).encode()
            for coding, payload in (("gzip", gzip.compress(body)), ("br", body), ("deflate", body),
                                    ("gzip, identity", gzip.compress(body)), ("identity, gzip", body),
                                    ("x-custom", body)):
                r = await post_json_bytes(env, payload, {**JSON_CT, "Content-Encoding": coding})
                err = assert_error(r, 415, "unsupported_media_type")
                assert "not applied" in err["message"], err
                assert r.headers["accept-encoding"] == "identity"
            # a second header counts too
            r = await post_json_bytes(env, body, httpx.Headers(
                [*JSON_CT.items(), ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]))
            assert_error(r, 415, "unsupported_media_type")
            form, ctype = multipart({"prompt": "a cat"})
            r = await env.client.post("/v1/videos", content=gzip.compress(form),
                                      headers={**AUTH, "Content-Type": ctype, "Content-Encoding": "gzip"})
            assert_error(r, 415, "unsupported_media_type")
            assert_no_job(env)

    run(main())


# ---- no slash redirect built from Host ------------------------------------------------------------------------


def test_no_redirect_echoes_the_host_header(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            evil = {**AUTH, "Host": "evil.example"}
            for path in ("/v1/videos/%2e%2e%2f", "/v1/videos/", "/v1/usage/", "/healthz/", "/v1/videos/x/content/"):
                r = await env.client.get(path, headers=evil)
                assert_error(r, 404, "not_found")
                assert "location" not in r.headers and "evil.example" not in r.text
            r = await env.client.post("/v1/videos/", json={"prompt": "a cat", **SMALL}, headers=evil)
            assert_error(r, 404, "not_found")
            assert_no_job(env)

    run(main())


# ---- header limits --------------------------------------------------------------------------------------------


def test_oversized_headers_are_431_before_anything_runs(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = {"prompt": "a cat", **SMALL}
            for extra in ({"X-Big": "a" * 1_000_000},  # one 1 MB value
                          {f"X-H{i}": "1" for i in range(500)},  # 500 headers
                          {f"X-H{i}": "a" * 7_000 for i in range(6)}):  # each value fine, 42 KB in all
                for headers in ({**AUTH, **extra}, extra):  # refused before auth too
                    r = await env.client.post("/v1/videos", json=body, headers=headers)
                    err = assert_error(r, 431, "request_headers_too_large")
                    assert err["type"] == "invalid_request_error"
                r = await env.client.get("/v1/videos", headers={**AUTH, **extra})
                assert_error(r, 431, "request_headers_too_large")
            r = await env.client.post("/v1/videos", json=body,
                                      headers={**AUTH, "Idempotency-Key": "k" * 9_000})
            err = assert_error(r, 431, "request_headers_too_large")
            assert "idempotency-key" in err["message"]
            assert_no_job(env)
            # ordinary headers, even many of them, still work
            r = await env.client.get("/v1/videos", headers={**AUTH, **{f"X-H{i}": "v" * 100 for i in range(80)}})
            assert r.status_code == 200, r.text

    run(main())


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_header_limits_are_constructor_arguments() -> None:
    async def call(app: HeaderLimits, headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/", headers=headers)

    async def main() -> None:
        # httpx adds host, accept, accept-encoding, connection and user-agent: 5 headers, ~100 bytes
        app = HeaderLimits(echo_app, max_headers=8, max_header_bytes=500, max_value_bytes=200)  # type: ignore[arg-type]
        assert (await call(app, {"a": "1", "b": "2", "c": "3"})).status_code == 200  # exactly 8
        assert_error(await call(app, {"a": "1", "b": "2", "c": "3", "d": "4"}), 431, "request_headers_too_large")
        assert (await call(app, {"a": "v" * 200})).status_code == 200
        assert_error(await call(app, {"a": "v" * 201}), 431, "request_headers_too_large")
        r = await call(app, {"a": "v" * 200, "b": "v" * 200, "c": "v" * 200})  # 8 headers, each fine, 600+ bytes
        err = assert_error(r, 431, "request_headers_too_large")
        assert "in all" in err["message"]
        defaults = HeaderLimits(echo_app)  # type: ignore[arg-type]
        assert (defaults.max_headers, defaults.max_header_bytes, defaults.max_value_bytes) == (100, 32768, 8192)
        with pytest.raises(ValueError):
            HeaderLimits(echo_app, max_headers=0)  # type: ignore[arg-type]

    run(main())


# ---- body size limit ------------------------------------------------------------------------------------------


class Chunks:
    """A request body streamed in chunks (`first`, then `fill` bytes up to `total` in all); counts what was
    pulled from it, which is what the server read."""

    def __init__(self, first: bytes, total: int, size: int = 1024 * 1024) -> None:
        self.first, self.total, self.size = first, total, size
        self.sent = 0
        self.last = 0

    async def __aiter__(self) -> Any:
        chunk = self.first
        while self.sent < self.total:
            chunk = chunk[:self.total - self.sent]
            self.sent += len(chunk)
            self.last = len(chunk)
            yield chunk
            chunk = b" " * self.size


def padded_json(total: int) -> bytes:
    """A valid create body of exactly `total` bytes (JSON allows whitespace after the object)."""
    body = json.dumps({"prompt": "a cat", **SMALL}).encode()
    return body + b" " * (total - len(body))


def test_a_body_whose_content_length_is_over_the_cap_is_413_before_it_is_read(storage: Storage) -> None:
    cap = MAX_BODY_BYTES
    first = json.dumps({"prompt": "a cat", **SMALL}).encode()

    async def main() -> None:
        async with serving(storage) as env:
            for headers in (JSON_CT, {"Content-Type": "application/json"}):  # before auth too
                body = Chunks(first, cap + 1)
                r = await env.client.post("/v1/videos", content=body,
                                          headers={**headers, "Content-Length": str(cap + 1)})
                err = assert_error(r, 413, "request_too_large")
                assert err["type"] == "invalid_request_error" and str(cap) in err["message"], err
                assert r.headers["connection"] == "close"
                assert body.sent == 0  # refused from the header: not one byte read
            # an ordinary (not streamed) body one byte over: the same
            r = await post_json_bytes(env, padded_json(cap + 1))
            assert_error(r, 413, "request_too_large")
            # a huge declared length on a route that reads no body is refused as well
            r = await env.client.request("GET", "/v1/videos", content=b"", headers={**AUTH, "Content-Length": "9" * 30})
            assert_error(r, 413, "request_too_large")
            # the header check runs first
            r = await post_json_bytes(env, padded_json(cap + 1), {**JSON_CT, "X-Big": "a" * 100_000})
            assert_error(r, 431, "request_headers_too_large")
            assert_no_job(env)

    run(main())


def test_a_chunked_body_is_413_as_soon_as_it_passes_the_cap(storage: Storage) -> None:
    cap = MAX_BODY_BYTES
    first = json.dumps({"prompt": "a cat", **SMALL}).encode()

    async def main() -> None:
        async with serving(storage) as env:
            # valid JSON all along (a create body and then whitespace): only the size is wrong
            body = Chunks(first, cap + 20 * 1024 * 1024)
            r = await env.client.post("/v1/videos", content=body, headers=JSON_CT)  # no length: chunked
            assert "content-length" not in r.request.headers
            err = assert_error(r, 413, "request_too_large")
            assert str(cap) in err["message"] and r.headers["connection"] == "close"
            # refused on the chunk that passed the cap, the rest never read
            assert body.sent - body.last <= cap < body.sent < body.total, (body.sent, body.last)
            # a body longer than its Content-Length said is counted too (an ASGI server would cut it; a
            # middleware in front of this one might not)
            body = Chunks(first, cap + 5 * 1024 * 1024)
            r = await env.client.post("/v1/videos", content=body, headers={**JSON_CT, "Content-Length": "100"})
            assert_error(r, 413, "request_too_large")
            assert body.sent < body.total
            assert_no_job(env)

    run(main())


def test_a_body_of_exactly_the_cap_is_accepted(storage: Storage) -> None:
    cap = MAX_BODY_BYTES

    async def main() -> None:
        async with serving(storage) as env:
            r = await post_json_bytes(env, padded_json(cap))
            assert r.status_code == 200, r.text
            first = json.dumps({"prompt": "a dog", **SMALL}).encode()
            chunked = Chunks(first, cap)
            r2 = await env.client.post("/v1/videos", content=chunked, headers=JSON_CT)
            assert r2.status_code == 200, r2.text
            assert chunked.sent == cap
            for video in (r.json(), r2.json()):
                await wait_status(env, video["id"], "completed")

    run(main())


async def read_body_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def _post(app: Any, content: Any, headers: dict[str, str] | None = None,
                raise_app_exceptions: bool = True) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post("/", content=content, headers=headers)


async def _parts(*parts: bytes) -> Any:
    for part in parts:
        yield part


def test_body_limit_is_a_constructor_argument_and_counts_every_chunk() -> None:
    async def main() -> None:
        app = BodyLimit(read_body_app, max_body_bytes=10)  # type: ignore[arg-type]
        r = await _post(app, b"x" * 10)
        assert (r.status_code, r.text) == (200, "10")
        assert_error(await _post(app, b"x" * 11), 413, "request_too_large")
        r = await _post(app, _parts(b"x" * 5, b"", b"x" * 5))
        assert (r.status_code, r.text) == (200, "10")
        assert_error(await _post(app, _parts(b"x" * 5, b"x" * 5, b"x")), 413, "request_too_large")
        # a Content-Length that is not a number is the server's to refuse; the count still holds
        assert_error(await _post(app, _parts(b"x" * 11), {"Content-Length": "eleven"}), 413, "request_too_large")
        assert BodyLimit(read_body_app).max_body_bytes == MAX_BODY_BYTES == 25 * 1024 * 1024  # type: ignore[arg-type]
        assert (await _post(BodyLimit(read_body_app, max_body_bytes=0), b"")).status_code == 200  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            BodyLimit(read_body_app, max_body_bytes=-1)  # type: ignore[arg-type]

    run(main())


def test_body_limit_replaces_the_apps_own_answer_to_the_refused_body() -> None:
    # FastAPI turns any error while it reads a body parameter into its own 400 ("error parsing the body"):
    # the client must still see the 413
    inner = FastAPI()
    install_error_handlers(inner)

    @inner.post("/")
    async def echo(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    async def swallows(scope: dict[str, Any], receive: Any, send: Any) -> None:
        with contextlib.suppress(Exception):  # an app that hides the error and answers on its own
            while (await receive()).get("more_body"):
                pass
        await error_response(400, "bad body", code="invalid_value")(scope, receive, send)

    async def main() -> None:
        assert (await _post(inner, b'{"a": "' + b"x" * 100 + b'"}', {"Content-Type": "application/json"})
                ).status_code == 200
        for app in (inner, swallows):
            limited = BodyLimit(app, max_body_bytes=50)  # type: ignore[arg-type]
            r = await _post(limited, _parts(b'{"a": "', b"x" * 100, b'"}'), {"Content-Type": "application/json"})
            assert_error(r, 413, "request_too_large")

        # an app that answered before it read the body cannot be answered for: the error ends the response
        async def answers_first(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await receive()
            await send({"type": "http.response.body", "body": b"late"})

        with pytest.raises(Exception) as caught:
            await _post(BodyLimit(answers_first, max_body_bytes=5), _parts(b"x" * 6))  # type: ignore[arg-type]
        assert type(caught.value).__name__ == "_BodyTooLarge"

    run(main())


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data  # the server closed the connection
        data += chunk


def test_body_limit_on_a_real_server_answers_mid_upload_and_closes() -> None:
    import uvicorn  # installed with ray[serve]

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(BodyLimit(read_body_app, max_body_bytes=1000),  # type: ignore[arg-type]
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[listener]),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = listener.getsockname()[1]
    try:
        # a chunked upload: the 413 arrives while the client is still sending (no terminating chunk sent)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                sock.sendall(b"190\r\n" + b"x" * 400 + b"\r\n")  # 1200 bytes in all
            response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        assert b"connection: close" in response.lower()
        assert json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"
        # a declared length over the cap: answered from the headers, no body sent at all
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
            response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        # under the cap: read and answered
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
                         + b"x" * 1000)
            response = _read_response(sock)
        assert response.startswith(b"HTTP/1.1 200 ") and b"\r\n1000\r\n" in response, response[:300]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


# ---- the framework's own errors and multipart errors use the envelope -----------------------------------------


def test_framework_and_multipart_errors_use_the_envelope(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            assert_error(await env.client.put("/v1/videos", headers=AUTH), 405, "method_not_allowed")
            assert_error(await env.client.get("/v1/nothing", headers=AUTH), 404, "not_found")
            assert_error(await env.client.get("/v1/videos", params={"limit": "ten"}, headers=AUTH), 422,
                         "invalid_value", "limit")
            for ctype, raw in (("multipart/form-data", b"--x\r\n"),  # no boundary parameter
                               ("multipart/form-data; boundary=b", b"this is not multipart"),
                               ("multipart/form-data; boundary=b",  # ends before the closing boundary
                                b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat'),
                               ("multipart/form-data; boundary=b",  # a part without a name
                                b"--b\r\nContent-Disposition: form-data\r\n\r\na cat\r\n--b--\r\n"),
                               ("multipart/form-data; boundary=b",
                                b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n'
                                + b"X-Header: " + b"h" * 20_000 + b"\r\n\r\na cat\r\n--b--\r\n")):
                r = await env.client.post("/v1/videos", content=raw, headers={**AUTH, "Content-Type": ctype})
                assert_error(r, 400, "invalid_multipart")
            form, ctype = multipart({"prompt": "a cat"}, files={"seed": ("seed.txt", b"7", "text/plain")})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            assert_error(r, 400, "invalid_value", "seed")  # a file part where only input_reference may be one
            # a part declared in another charset, or transfer-encoded, is refused naming it
            for head in (b"Content-Type: text/plain; charset=iso-8859-1\r\n", b"Content-Transfer-Encoding: base64\r\n"):
                raw = (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n' + head
                       + b"\r\nYSBjYXQ=\r\n--b--\r\n")
                r = await env.client.post("/v1/videos", content=raw,
                                          headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"})
                assert_error(r, 400, "invalid_value", "prompt")
            # a JSON body that is not an object, or not JSON, keeps its code
            for raw in (b"", b"[1, 2]", b"{not json", b'{"prompt": NaN}', b'{"prompt": "a", "seed": Infinity}'):
                assert_error(await post_json_bytes(env, raw), 400, "invalid_json")
            assert_no_job(env)

    run(main())


def test_http_exceptions_the_framework_raises_get_an_envelope_code() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{status}")
    async def raise_(status: int) -> None:
        raise StarletteHTTPException(status, "refused")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for status, code in ((400, "invalid_request"), (413, "request_too_large"), (415, "unsupported_media_type"),
                                 (422, "invalid_value"), (431, "request_headers_too_large"), (418, "invalid_request"),
                                 (502, "internal_error")):
                assert_error(await client.get(f"/raise/{status}"), status, code)

    run(main())
    # an error that quotes a lone surrogate still renders (escaped), rather than failing as a 500
    r = error_response(400, "bad \ud800 input", param="\udcff", code="invalid_value")
    assert json.loads(r.body)["error"] == {"message": "bad \\ud800 input", "type": "invalid_request_error",
                                           "param": "\\udcff", "code": "invalid_value"}


# ---- what must keep working -----------------------------------------------------------------------------------


PROMPT = "a café cat 🐈 on a skateboard,\tat dusk\r\nin 東京"


def test_ordinary_bodies_still_work(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            made = []
            fields = {"prompt": PROMPT, **SMALL, "negative_prompt": "blurry\nlow quality"}
            r = await env.client.post("/v1/videos", json=fields, headers=AUTH)  # httpx: application/json
            made.append(r)
            for ctype in ("application/json; charset=utf-8", 'application/json; charset="UTF-8"',
                          "Application/JSON;charset=utf8", "application/json; version=1"):
                r = await post_json_bytes(env, json.dumps(fields, ensure_ascii=False).encode(),
                                          {**AUTH, "Content-Type": ctype})
                made.append(r)
            # escapes, a surrogate pair among them, are fine
            r = await post_json_bytes(env, json.dumps(fields).encode(),
                                      {**JSON_CT, "Content-Encoding": "identity"})
            made.append(r)
            form_fields = {k: str(v) for k, v in fields.items()}
            made.append(await post_multipart(env, dict(form_fields)))
            made.append(await env.client.post("/v1/videos", data=form_fields, headers=AUTH))  # urlencoded
            made.append(await env.client.post("/v1/videos", content=b"prompt=" + PROMPT.encode() + b"&size=64x48"
                                              b"&num_frames=9&num_inference_steps=4&negative_prompt=blurry%0Alow"
                                              b"+quality", headers=FORM_CT))  # raw UTF-8, not escaped
            for r in made:
                assert r.status_code == 200, r.text
                video = r.json()
                assert video["prompt"] == PROMPT and video["negative_prompt"] == "blurry\nlow quality", video
                assert video["size"] == "64x48" and video["num_frames"] == 9
            assert len(env.storage.list_keys(env.storage.key("jobs", ""))) == len(made)
            for r in made:
                done = (await wait_status(env, r.json()["id"], "completed")).json()
                assert done["prompt"] == PROMPT  # as stored, read back
            r = await post_json_bytes(env, small_json("\\ud83d\\ude00 cat"))
            assert r.status_code == 200 and r.json()["prompt"] == "😀 cat", r.text
            await wait_status(env, r.json()["id"], "completed")

    run(main())
