"""The `videogen` CLI and `VideogenClient` against the documented `/v1` contract.

Most tests run `main([...], transport=...)` against `FakeApi`, an in-memory implementation of the endpoints'
shapes served through `httpx.MockTransport`: a job advances one stage (or one denoising step) per GET, errors
come in the `{"error": {...}}` envelope, and 429/503 answers carry `Retry-After`. One test points `main` at the
real FastAPI app (`create_app` over moto S3, fake stage chain) served by uvicorn on a local socket.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from io import StringIO
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from videogen_client.api import (
    MAX_IMAGE_BYTES,
    ClientError,
    ServerUnreachable,
    Video,
    VideogenClient,
    image_media_type,
)
from videogen_client.cli import ProgressView, main

KEY = "sk-cli-test"
BASE = "http://videogen.test/v1"
CONN = ["--base-url", BASE, "--api-key", KEY]


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> httpx.Response:
    types = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
    body = {"error": {"message": message, "type": types.get(status, "api_error"), "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def _multipart(request: httpx.Request) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    """A multipart/form-data body as (text fields, file parts as (filename, bytes, content type)), parsed by hand
    so that the bytes are the bytes on the wire."""
    boundary = request.headers["content-type"].split("boundary=", 1)[1].encode()
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes, str]] = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, value = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        disposition = headers["Content-Disposition"]
        name = re.search(r'name="([^"]*)"', disposition).group(1)  # type: ignore[union-attr]
        filename = re.search(r'filename="([^"]*)"', disposition)
        if filename is None:
            fields[name] = value.decode()
        else:
            files[name] = (filename.group(1), value, headers.get("Content-Type", ""))
    return fields, files


class FakeApi:
    """In-memory `/v1`: each GET of a running job moves it one stage or one denoising step forward. A create with
    an image comes as multipart/form-data (the image the file part `input_reference`); one that is not PNG, JPEG or
    WebP is refused 400 the way the server does."""

    def __init__(self, *, fail_at: str | None = None, interrupt_on_get: int | None = None) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.timeline: dict[str, list[tuple[str, str | None, int]]] = {}
        self.by_key: dict[str, str] = {}
        self.posts: list[httpx.Request] = []
        self.images: list[tuple[str, bytes, str] | None] = []  # the input_reference of each multipart create
        self.requests: list[httpx.Request] = []
        self.refuse_posts = 0  # answer the next POSTs 503 Retry-After: 0
        self.limit_gets = 0  # answer the next GETs 429 Retry-After: 0
        self.fail_at = fail_at
        self.interrupt_on_get = interrupt_on_get
        self.gets = 0
        self.transport = httpx.MockTransport(self.handle)

    # one entry per poll: (status, stage, step)
    def _timeline(self, steps: int) -> list[tuple[str, str | None, int]]:
        t: list[tuple[str, str | None, int]] = [("queued", None, 0), ("in_progress", "encoding", 0)]
        t += [("in_progress", "denoising", i) for i in range(steps + 1)]
        t += [("in_progress", "decoding", steps), ("in_progress", "uploading", steps), ("completed", None, steps)]
        return t

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _error(401, "invalid API key", "invalid_api_key")
        path = request.url.path.removeprefix("/v1")
        parts = path.strip("/").split("/")
        if request.method == "GET":
            self.gets += 1
            if self.interrupt_on_get is not None and self.gets >= self.interrupt_on_get:
                raise KeyboardInterrupt
            if self.limit_gets:
                self.limit_gets -= 1
                return _error(429, "too many requests", "rate_limited", headers={"Retry-After": "0"})
        if request.method == "POST" and parts == ["videos"]:
            return self._create(request)
        if request.method == "GET" and parts == ["videos"]:
            return self._list(request)
        if request.method == "GET" and parts == ["usage"]:
            q = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
            return httpx.Response(200, json={"object": "usage", "start": q.get("start"), "end": q.get("end"),
                                             "videos": len(self.jobs), "video_seconds": 2.0 * len(self.jobs)})
        if parts[0] != "videos" or len(parts) < 2:
            return _error(404, "Not Found", "not_found")
        job = self.jobs.get(parts[1])
        if job is None:
            return _error(404, f"no video with id {parts[1]!r}", "not_found", "video_id")
        if request.method == "GET" and len(parts) == 2:
            self._advance(job)
            headers = {"openai-poll-after-ms": "1"} if job["status"] in ("queued", "in_progress") else {}
            return httpx.Response(200, json=job, headers=headers)
        if request.method == "GET" and parts[2:] == ["content"]:
            if job["status"] != "completed":
                return _error(409, f"video {job['id']} is {job['status']}", "video_not_ready", "video_id")
            variant = request.url.params.get("variant", "video")
            return httpx.Response(200, content=f"{variant}:{job['id']}".encode() * 1000)
        if request.method == "POST" and parts[2:] == ["cancel"]:
            if job["status"] in ("completed", "failed", "cancelled"):
                return _error(409, f"video {job['id']} already ended", "invalid_state", "video_id")
            job.update(status="cancelled", stage=None, error={"code": "cancelled", "message": "the job was cancelled"})
            return httpx.Response(200, json=job)
        if request.method == "DELETE" and len(parts) == 2:
            del self.jobs[job["id"]]
            return httpx.Response(200, json={"id": job["id"], "object": "video.deleted", "deleted": True})
        return _error(405, "Method Not Allowed", "method_not_allowed")

    def _create(self, request: httpx.Request) -> httpx.Response:
        self.posts.append(request)
        multipart = request.headers["content-type"].startswith("multipart/form-data")
        if multipart:
            fields, files = _multipart(request)
            self.images.append(files.get("input_reference"))
        if self.refuse_posts:
            self.refuse_posts -= 1
            return _error(503, "the object store is unavailable; retry later", "storage_unavailable",
                          headers={"Retry-After": "0"})
        if multipart:
            body = {k: int(v) if k in ("num_inference_steps", "num_frames", "seed") else v for k, v in fields.items()}
            if files.get("input_reference", ("", b"", ""))[2] not in ("image/png", "image/jpeg", "image/webp"):
                return _error(400, "input_reference must be a PNG, JPEG or WebP image", "invalid_image",
                              "input_reference")
        else:
            body = json.loads(request.content)
        if "prompt" not in body:
            return _error(400, "prompt is required", "invalid_value", "prompt")
        if body.get("size", "96x64") == "33x10":
            return _error(400, "size: width and height must be multiples of 16, got '33x10'", "invalid_value",
                          "size")
        key = request.headers.get("idempotency-key")
        if key in self.by_key:
            return httpx.Response(200, json=self.jobs[self.by_key[key]])
        steps = body.get("num_inference_steps", 4)
        job_id = f"video_{len(self.jobs) + 1:028x}"
        self.jobs[job_id] = {
            "id": job_id, "object": "video", "created_at": 1_700_000_000 + len(self.jobs), "status": "queued",
            "progress": 0, "model": "cogvideox-tiny-2b", "prompt": body["prompt"], "seconds": "2",
            "size": body.get("size", "96x64"), "error": None, "stage": None, "step": 0, "total_steps": steps,
            "num_frames": body.get("num_frames", 17), "fps": 8, "seed": body.get("seed", 1234),
            "num_inference_steps": steps, "guidance_scale": 6.0, "use_dynamic_cfg": False,
        }
        self.timeline[job_id] = self._timeline(steps)
        if key:
            self.by_key[key] = job_id
        return httpx.Response(200, json=self.jobs[job_id], headers={"openai-poll-after-ms": "1"})

    def _advance(self, job: dict[str, Any]) -> None:
        if job["status"] in ("completed", "failed", "cancelled"):
            return
        status, stage, step = self.timeline[job["id"]].pop(0)
        if stage is not None and stage == self.fail_at:
            job.update(status="failed", stage=None,
                       error={"code": "internal_error", "message": "a pipeline stage failed"})
            return
        bands = {"encoding": (0, 5), "denoising": (5, 90), "decoding": (90, 97), "uploading": (97, 99)}
        lo, hi = bands.get(stage or "", (0, 0))
        progress = 100 if status == "completed" else int(lo + (hi - lo) * step / job["total_steps"])
        job.update(status=status, stage=stage, step=step, progress=progress)
        if status == "completed":
            job.update(completed_at=job["created_at"] + 5, video_url=f"https://s3.test/{job['id']}.mp4")

    def _list(self, request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params.get("limit", 20))
        after = request.url.params.get("after")
        ids = sorted(self.jobs, reverse=True)
        if after:
            ids = ids[ids.index(after) + 1:]
        page = [self.jobs[i] for i in ids[:limit]]
        return httpx.Response(200, json={"object": "list", "data": page, "has_more": len(ids) > limit,
                                         "first_id": page[0]["id"] if page else None,
                                         "last_id": page[-1]["id"] if page else None})


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDEOGEN_BASE_URL", raising=False)
    monkeypatch.delenv("VIDEOGEN_API_KEY", raising=False)


def run(api: FakeApi, *argv: str) -> int:
    return main([*argv, *CONN], transport=api.transport)


def submit(api: FakeApi, prompt: str = "a fox") -> str:
    return VideogenClient(BASE, KEY, transport=api.transport).create(prompt).id


# -- generate ----------------------------------------------------------------------------------------

def test_generate_shows_each_stage_and_step_then_saves_the_video(api, tmp_path, capsys):
    out = tmp_path / "clips" / "fox.mp4"
    rc = run(api, "generate", "a red fox in the snow", "--out", str(out), "--steps", "4", "--seed", "7",
             "--size", "96x64", "--frames", "17", "--guidance", "6", "--negative", "blurry")
    err = capsys.readouterr()
    assert rc == 0, err
    (job_id,) = api.jobs
    body = json.loads(api.posts[0].content)
    assert body == {"prompt": "a red fox in the snow", "size": "96x64", "num_frames": 17, "num_inference_steps": 4,
                    "guidance_scale": 6.0, "seed": 7, "negative_prompt": "blurry"}
    progress = err.err
    assert "\r" not in progress  # stderr is not a terminal here: plain lines
    for text in ("queued", "encoding", "denoising", "step 0/4", "step 3/4", "step 4/4", "decoding", "uploading",
                 "done"):
        assert text in progress, (text, progress)
    assert progress.index("encoding") < progress.index("step 3/4") < progress.index("decoding")
    assert out.read_bytes() == f"video:{job_id}".encode() * 1000
    assert [p.name for p in out.parent.iterdir()] == ["fox.mp4"]  # no temp file left
    assert str(out) in err.out and job_id in err.out


def test_generate_json_prints_the_final_job(api, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    assert run(api, "generate", "a fox", "--seconds", "2", "--json", "-q", "--out", str(out)) == 0
    captured = capsys.readouterr()
    job = json.loads(captured.out)
    assert job["status"] == "completed" and job["output_path"] == str(out) and job["progress"] == 100
    assert json.loads(api.posts[0].content)["seconds"] == "2"  # the wire field is a string
    assert captured.err.strip() == ""  # --quiet


def test_generate_no_wait_prints_only_the_id(api, capsys):
    assert run(api, "generate", "a fox", "--no-wait", "--webhook-url", "https://hooks.test/v") == 0
    captured = capsys.readouterr()
    (job_id,) = api.jobs
    assert captured.out.strip() == job_id
    assert json.loads(api.posts[0].content)["webhook_url"] == "https://hooks.test/v"
    assert api.gets == 0


def test_a_failed_job_prints_its_error_and_exits_1(tmp_path, capsys):
    api = FakeApi(fail_at="decoding")
    out = tmp_path / "x.mp4"
    assert run(api, "generate", "a fox", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "failed: a pipeline stage failed (internal_error)" in err
    assert not out.exists()


def test_ctrl_c_while_waiting_exits_130_and_says_how_to_cancel(capsys):
    api = FakeApi(interrupt_on_get=4)
    assert run(api, "generate", "a fox") == 130
    err = capsys.readouterr().err
    (job_id,) = api.jobs
    assert "keeps running" in err and f"videogen jobs cancel {job_id}" in err


# -- retries and errors ------------------------------------------------------------------------------

def test_a_retried_create_sends_the_same_idempotency_key_and_makes_one_job(api, capsys):
    api.refuse_posts = 1  # 503 with Retry-After: 0
    assert run(api, "generate", "a fox", "--no-wait") == 0
    keys = [p.headers.get("idempotency-key") for p in api.posts]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    assert len(api.jobs) == 1
    # a new create is a new job: a new key
    client = VideogenClient(BASE, KEY, transport=api.transport)
    client.create("another fox")
    assert api.posts[-1].headers["idempotency-key"] != keys[0]
    client.create("same again", idempotency_key="mine-1")
    client.create("same again", idempotency_key="mine-1")
    assert len(api.jobs) == 3  # the explicit key, sent twice, made one job


def test_429_is_retried_after_retry_after_and_given_up_when_retries_run_out(api, capsys):
    job_id = submit(api)
    api.limit_gets = 2
    assert run(api, "jobs", "show", job_id) == 0
    api.limit_gets = 1
    assert run(api, "jobs", "show", job_id, "--retries", "0") == 1
    assert "error: too many requests (rate_limited)" in capsys.readouterr().err


def test_retry_waits_are_bounded_and_connection_failures_retried():
    slept: list[float] = []
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if calls["n"] == 2:
            return _error(503, "busy", "overloaded", headers={"Retry-After": "2"})
        if calls["n"] == 3:
            return _error(429, "slow down", "rate_limited", headers={"Retry-After": "3600"})
        return httpx.Response(200, json={"id": "v", "status": "queued"})

    client = VideogenClient(BASE, KEY, transport=httpx.MockTransport(flaky), sleep=slept.append,
                            max_retry_wait_s=30)
    with pytest.raises(ClientError) as exc:
        client.get("v")
    assert exc.value.status == 429 and exc.value.retry_after == 3600  # an hour: say so rather than hang
    assert slept == [0.25, 2.0]
    assert client.get("v").status == "queued"


def test_every_create_sends_an_idempotency_key_the_same_on_each_of_its_retries():
    """A create whose connection drops after the request went out (it may have been applied) is retried with the
    key it was first sent with, so the server answers the job it already made; each create has its own key."""
    posts: list[httpx.Request] = []
    failures = [httpx.ReadError("connection reset", request=None),  # type: ignore[arg-type]
                httpx.RemoteProtocolError("server disconnected", request=None),  # type: ignore[arg-type]
                None]

    def drops_twice(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        failure = failures[(len(posts) - 1) % len(failures)]
        if failure is not None:
            raise failure
        return httpx.Response(200, json={"id": f"video_{len(posts)}", "status": "queued"})

    slept: list[float] = []
    client = VideogenClient(BASE, KEY, transport=httpx.MockTransport(drops_twice), sleep=slept.append)
    first = client.create("a fox")
    second = client.create("a fox")  # the same body: still a new job, so a new key
    assert (first.id, second.id, len(posts), len(slept)) == ("video_3", "video_6", 6, 4)
    keys = [p.headers.get("idempotency-key") for p in posts]
    assert all(keys) and keys[0] == keys[1] == keys[2] and keys[3] == keys[4] == keys[5] and keys[0] != keys[3]
    for key in (keys[0], keys[3]):
        assert key.startswith("videogen-") and uuid.UUID(key.removeprefix("videogen-")).version == 4
    # the caller's own key is sent as given, on every retry too
    posts.clear()
    client.create("a fox", idempotency_key="order-42")
    assert [p.headers["idempotency-key"] for p in posts] == ["order-42"] * 3


def test_a_dropped_connection_is_not_retried_for_a_non_idempotent_call():
    calls = {"n": 0}

    def drops(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        raise httpx.ReadError("connection reset", request=request)

    client = VideogenClient(BASE, KEY, transport=httpx.MockTransport(drops), sleep=lambda _s: None)
    with pytest.raises(ServerUnreachable):
        client._request("POST", "/videos", json={}, idempotent=False)
    assert calls["n"] == 1
    with pytest.raises(ServerUnreachable):
        client.get("v")
    assert calls["n"] == 1 + 4  # GET: first try + 3 retries


def test_http_errors_print_message_code_and_param(api, capsys):
    assert run(api, "generate", "a fox", "--size", "33x10") == 1
    assert ("error: size: width and height must be multiples of 16, got '33x10' (invalid_value, param size)"
            in capsys.readouterr().err)
    assert run(api, "jobs", "show", "video_nope") == 1
    assert "error: no video with id 'video_nope' (not_found, param video_id)" in capsys.readouterr().err
    assert run(api, "generate", "a fox", "--size", "wide") == 2  # argparse refuses it before any request
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_wrong_key_says_which_setting_to_check(api, capsys):
    assert main(["jobs", "list", "--base-url", BASE, "--api-key", "sk-wrong"], transport=api.transport) == 1
    err = capsys.readouterr().err
    assert "error: invalid API key (invalid_api_key)" in err and "VIDEOGEN_API_KEY" in err


def test_missing_key_is_a_usage_error(api, capsys):
    assert main(["jobs", "list", "--base-url", BASE], transport=api.transport) == 2
    assert "no API key" in capsys.readouterr().err and api.requests == []


def test_config_from_the_environment(api, monkeypatch, capsys):
    monkeypatch.setenv("VIDEOGEN_BASE_URL", "http://env-host.test:9999")  # no /v1: the client adds it
    monkeypatch.setenv("VIDEOGEN_API_KEY", KEY)
    assert main(["jobs", "list", "--json"], transport=api.transport) == 0
    assert str(api.requests[-1].url) == "http://env-host.test:9999/v1/videos?limit=20"
    assert json.loads(capsys.readouterr().out)["object"] == "list"


def test_connection_refused_says_the_server_is_not_running(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    assert main(["jobs", "list", "--base-url", url, "--api-key", KEY, "--retries", "0"]) == 1
    assert f"cannot reach {url}: is the server running?" in capsys.readouterr().err



def test_a_server_that_is_not_the_api_gets_a_clear_error(capsys):
    html = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>dashboard</html>"))
    assert main(["jobs", "show", "video_x", *CONN], transport=html) == 1
    assert "is the base URL the videogen API (ending in /v1)?" in capsys.readouterr().err


# -- image to video (--image) ------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"\r\n--\r\n"  # CRLFs and a dash pair inside, on purpose


def test_generate_with_image_sends_multipart_with_the_file_part_and_the_text_fields(api, tmp_path, capsys):
    image = tmp_path / "fox start.png"
    image.write_bytes(PNG)
    assert run(api, "generate", "the fox starts running", "--image", str(image), "--model",
               "cogvideox-tiny-5b-i2v", "--steps", "2", "--seed", "7", "--seconds", "2", "--guidance", "6",
               "--dynamic-cfg", "--webhook-url", "https://hooks.test/v", "--no-wait") == 0
    capsys.readouterr()
    (post,) = api.posts
    assert post.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert post.headers["idempotency-key"].startswith("videogen-")
    fields, files = _multipart(post)
    assert files == {"input_reference": ("fox start.png", PNG, "image/png")}
    assert fields == {"prompt": "the fox starts running", "model": "cogvideox-tiny-5b-i2v", "seconds": "2",
                      "num_inference_steps": "2", "guidance_scale": "6.0", "seed": "7", "use_dynamic_cfg": "true",
                      "webhook_url": "https://hooks.test/v"}
    assert len(api.jobs) == 1

    # without --image the create is JSON, as before, with no image field
    assert run(api, "generate", "a fox", "--no-wait", "--no-dynamic-cfg") == 0
    assert api.posts[-1].headers["content-type"] == "application/json"
    assert json.loads(api.posts[-1].content) == {"prompt": "a fox", "use_dynamic_cfg": False}


def test_the_image_type_comes_from_its_bytes_not_its_name(api, tmp_path, capsys):
    jpeg, webp = b"\xff\xd8\xff\xe0" + b"\0" * 64, b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 64
    assert (image_media_type(PNG), image_media_type(jpeg), image_media_type(webp)) == \
        ("image/png", "image/jpeg", "image/webp")
    assert image_media_type(b"GIF89a" + b"\0" * 16) == image_media_type(b"RIFF\0\0\0\0WAVE") == \
        image_media_type(b"") == "application/octet-stream"
    misnamed = tmp_path / "photo.png"
    misnamed.write_bytes(jpeg)
    assert run(api, "generate", "a fox", "--image", str(misnamed), "--no-wait") == 0
    assert api.images[-1] == ("photo.png", jpeg, "image/jpeg")
    # not an image the client knows: sent as application/octet-stream, and the server's 400 is printed as usual
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a" + b"\0" * 16)
    assert run(api, "generate", "a fox", "--image", str(gif), "--no-wait") == 1
    assert api.images[-1] == ("anim.gif", b"GIF89a" + b"\0" * 16, "application/octet-stream")
    assert ("error: input_reference must be a PNG, JPEG or WebP image (invalid_image, param input_reference)"
            in capsys.readouterr().err)


def test_a_retried_image_create_resends_the_same_image_with_the_same_key(api, tmp_path, capsys):
    image = tmp_path / "fox.png"
    image.write_bytes(PNG)
    api.refuse_posts = 1  # 503 with Retry-After: 0
    assert run(api, "generate", "a fox", "--image", str(image), "--no-wait") == 0
    assert api.images == [("fox.png", PNG, "image/png")] * 2
    keys = [p.headers["idempotency-key"] for p in api.posts]
    assert len(keys) == 2 and keys[0] == keys[1] and len(api.jobs) == 1

    # a connection lost after the request went out: retried with the same bytes too (image given as bytes)
    posts: list[httpx.Request] = []

    def drops_once(request: httpx.Request) -> httpx.Response:
        request.read()
        posts.append(request)
        if len(posts) == 1:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json={"id": "video_1", "status": "queued"})

    client = VideogenClient(BASE, KEY, transport=httpx.MockTransport(drops_once), sleep=lambda _s: None)
    assert client.create("a fox", image=("start.webp", b"RIFF\0\0\0\0WEBP" + PNG)).id == "video_1"
    parts = [_multipart(p)[1]["input_reference"] for p in posts]
    assert parts == [("start.webp", b"RIFF\0\0\0\0WEBP" + PNG, "image/webp")] * 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    # a path works as well, read once
    posts.clear()
    client.create("a fox", image=image)
    assert _multipart(posts[-1])[1]["input_reference"] == ("fox.png", PNG, "image/png")


def test_image_that_is_missing_a_directory_or_too_large_is_a_usage_error_and_sends_nothing(api, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert run(api, "generate", "a fox", "--image", str(missing)) == 2
    assert f"error: --image {missing}: no such file" in capsys.readouterr().err

    assert run(api, "generate", "a fox", "--image", str(tmp_path)) == 2
    assert f"error: --image {tmp_path}: is a directory" in capsys.readouterr().err

    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.write(PNG)
        f.truncate(MAX_IMAGE_BYTES + 1)
    assert run(api, "generate", "a fox", "--image", str(big)) == 2
    err = capsys.readouterr().err
    assert f"error: --image {big}: {MAX_IMAGE_BYTES + 1} bytes is over the 10 MiB limit" in err
    assert "the server may have its own" in err

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert run(api, "generate", "a fox", "--image", str(empty)) == 2
    assert f"error: --image {empty}: the file is empty" in capsys.readouterr().err
    assert api.requests == []

    # exactly at the limit is sent
    with big.open("r+b") as f:
        f.truncate(MAX_IMAGE_BYTES)
    assert run(api, "generate", "a fox", "--image", str(big), "--no-wait") == 0
    assert len(api.images[-1][1]) == MAX_IMAGE_BYTES  # type: ignore[index]


def test_image_help_says_it_needs_an_image_to_video_model(capsys):
    assert main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--image PATH" in help_text and "image-to-video" in help_text
    assert "cogvideox-tiny-5b-i2v" in help_text and "/v1/models" in help_text


# -- jobs and usage ----------------------------------------------------------------------------------

def test_jobs_list_show_cancel_delete(api, capsys):
    first, second = submit(api, "first"), submit(api, "second\nline")
    assert run(api, "jobs", "list") == 0
    out = capsys.readouterr().out
    assert out.index(second) < out.index(first) and "second line" in out
    assert run(api, "jobs", "list", "--limit", "1", "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert [v["id"] for v in page["data"]] == [second] and page["has_more"]
    assert run(api, "jobs", "list", "--limit", "1") == 0
    assert f"--after {second}" in capsys.readouterr().out

    assert run(api, "jobs", "show", first, "--json") == 0
    assert json.loads(capsys.readouterr().out)["id"] == first
    assert run(api, "jobs", "show", first) == 0
    assert "status:" in capsys.readouterr().out

    assert run(api, "jobs", "cancel", first) == 0
    assert f"cancelled {first}" in capsys.readouterr().out
    assert api.requests[-1].method == "POST" and api.requests[-1].url.path == f"/v1/videos/{first}/cancel"
    assert run(api, "jobs", "cancel", first) == 1
    assert "(invalid_state, param video_id)" in capsys.readouterr().err

    assert run(api, "jobs", "delete", second) == 0
    assert second not in api.jobs and f"deleted {second}" in capsys.readouterr().out


def test_jobs_download_video_and_thumbnail(api, tmp_path, capsys):
    job_id = submit(api)
    out = tmp_path / "early.mp4"
    assert run(api, "jobs", "download", job_id, "--out", str(out)) == 1  # not completed yet: 409
    assert "video_not_ready" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file
    client = VideogenClient(BASE, KEY, transport=api.transport, sleep=lambda _s: None)
    assert list(client.poll(job_id))[-1].status == "completed"
    assert run(api, "jobs", "download", job_id, "--out", str(tmp_path / "v.mp4")) == 0
    assert run(api, "jobs", "download", job_id, "--out", str(tmp_path / "c.jpg"), "--thumbnail") == 0
    assert (tmp_path / "v.mp4").read_bytes().startswith(b"video:")
    assert (tmp_path / "c.jpg").read_bytes().startswith(b"thumbnail:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jpg", "v.mp4"]


def test_usage_defaults_to_this_month_so_far(api, capsys):
    submit(api)
    assert run(api, "usage", "--json") == 0
    today = date.today()
    report = json.loads(capsys.readouterr().out)
    assert report["start"] == today.replace(day=1).isoformat() and report["end"] == today.isoformat()
    assert run(api, "usage", "--start", "2025-01-01", "--end", "2025-01-31") == 0
    out = capsys.readouterr().out
    assert "usage 2025-01-01 .. 2025-01-31" in out and "videos: 1" in out
    assert api.requests[-1].url.params["start"] == "2025-01-01"
    assert run(api, "usage", "--start", "2025-02-01", "--end", "2025-01-01") == 2
    assert run(api, "usage", "--start", "January") == 2


# -- progress line -----------------------------------------------------------------------------------

def _video(status: str, stage: str | None = None, step: int = 0, total: int = 50) -> Video:
    return Video(id="video_x", status=status, stage=stage, step=step, total_steps=total, progress=step)


def test_progress_on_a_terminal_redraws_one_line():
    stream = StringIO()
    view = ProgressView(stream, tty=True, clock=lambda: 0.0, bar_width=10)
    view.update(_video("queued"))
    view.update(_video("in_progress", "denoising", 3, 4))
    view.update(_video("completed"))
    view.end()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "denoising [########--] step 3/4" in text


def test_progress_in_a_log_prints_about_every_tenth_step():
    stream = StringIO()
    view = ProgressView(stream, tty=False)
    view.update(_video("in_progress", "encoding"))
    for step in range(51):
        view.update(_video("in_progress", "denoising", step))
        view.update(_video("in_progress", "denoising", step))  # a poll that saw no new step
    view.update(_video("in_progress", "decoding", 50))
    lines = stream.getvalue().splitlines()
    steps = [line.split("step ")[1].split()[0] for line in lines if "step " in line]
    assert steps == [f"{i}/50" for i in range(0, 51, 5)]
    assert lines[0].startswith("encoding") and lines[-1].startswith("decoding")


# -- against the real app ----------------------------------------------------------------------------

@pytest.fixture
def real_server(storage) -> Iterator[str]:
    """The real `create_app` (moto S3, a fake stage chain) served by uvicorn on a local port."""
    import uvicorn  # installed with ray[serve]

    from serve.api.routes import create_app
    from serve.config import ApiConfig, AppConfig, JobsConfig
    from serve.jobs.record import ChainResult, JobResult
    from serve.jobs.service import video_keys
    from serve.jobs.wiring import build_ingress

    class Chain:
        async def run(self, job: Any) -> dict[str, Any]:
            keys = video_keys(storage, job.id)
            await asyncio.to_thread(storage.put_bytes, keys["video_key"], b"mp4:" + job.id.encode(), "video/mp4")
            await asyncio.to_thread(storage.put_bytes, keys["cover_key"], b"jpg:" + job.id.encode(), "image/jpeg")
            await asyncio.to_thread(storage.put_json, keys["metadata_key"], {"job_id": job.id})
            return ChainResult(JobResult(**keys), {})

    async def ready() -> dict[str, Any]:
        return {"s3": True}

    jobs = JobsConfig(max_attempts=1, lease_s=5, heartbeat_s=0.5, reclaim_interval_s=1, retry_backoff_s=0)
    config = AppConfig(s3=storage.cfg, jobs=jobs, api=ApiConfig(api_keys=[KEY]), keys={"legacy_plan": "enterprise"})
    graph = build_ingress(config, storage=storage, pipeline=Chain(), owner="ingress-cli-test")
    runner = graph.runner
    app = create_app(graph, ready)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            await runner.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    _wait_until(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_against_the_real_app(real_server, tmp_path, capsys):
    conn = ["--base-url", real_server, "--api-key", KEY]
    out = tmp_path / "real.mp4"
    assert main(["generate", "a fox", "--size", "64x48", "--frames", "9", "--steps", "2", "--out", str(out),
                 "--json", *conn]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "completed" and out.read_bytes() == b"mp4:" + job["id"].encode()
    assert main(["jobs", "list", "--json", *conn]) == 0
    assert [v["id"] for v in json.loads(capsys.readouterr().out)["data"]] == [job["id"]]
    assert main(["jobs", "download", job["id"], "--thumbnail", "--out", str(tmp_path / "c.jpg"), *conn]) == 0
    assert (tmp_path / "c.jpg").read_bytes() == b"jpg:" + job["id"].encode()
    assert main(["generate", "a fox", "--size", "33x10", *conn]) == 1
    assert "(invalid_value, param size)" in capsys.readouterr().err
    assert main(["jobs", "delete", job["id"], *conn]) == 0
    assert main(["jobs", "show", job["id"], *conn]) == 1
    assert "(not_found, param video_id)" in capsys.readouterr().err
    assert main(["jobs", "list", *conn, "--api-key", "sk-wrong"]) == 1
    assert "invalid API key (invalid_api_key)" in capsys.readouterr().err
