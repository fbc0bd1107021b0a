"""The HTTP API (`create_app`) over a real VideoService, JobStore and JobRunner on the local moto S3.

The stage chain is a fake injected through the runner's constructor: it writes real bytes where the VaeDecoder
would upload the video, cover and metadata. The app is driven through `httpx.ASGITransport` inside `asyncio.run`,
so the runner's tasks live in the same event loop as the requests (no Ray, no server socket).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from serve.api.routes import create_app
from serve.config import ApiConfig, AppConfig, JobsConfig, S3Config
from serve.errors import ServiceError
from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
from serve.jobs.runner import JobRunner
from serve.jobs.service import video_keys
from serve.jobs.store import JobStore
from serve.jobs.wiring import build_ingress
from serve.stages.stage import StageFailed
from serve.storage import Storage

API_KEY = "sk-unit-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 20.0  # generous: another process may be loading the CPUs
MODEL = "cogvideox-tiny-2b"
SMALL = {"size": "64x48", "num_frames": 9, "num_inference_steps": 4}


def video_bytes(job_id: str) -> bytes:
    return b"\x00\x00\x00\x18ftypisom" + job_id.encode()


def cover_bytes(job_id: str) -> bytes:
    return b"\xff\xd8\xff\xe0JFIF" + job_id.encode()


class WritesVideo:
    """The fake stage chain: uploads real bytes at the job's keys, like the VaeDecoder; optionally held at a gate."""

    def __init__(self, storage: Storage, fail: bool = False) -> None:
        self.storage = storage
        self.fail = fail
        self.calls = 0
        self.cancelled = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise StageFailed("VaeDecoder", "OutOfMemoryError")  # what a replica leaves of "CUDA error ... on 10.0.0.7"
        keys = video_keys(self.storage, job.id)
        await asyncio.to_thread(self.storage.put_bytes, keys["video_key"], video_bytes(job.id), "video/mp4")
        await asyncio.to_thread(self.storage.put_bytes, keys["cover_key"], cover_bytes(job.id), "image/jpeg")
        await asyncio.to_thread(self.storage.put_json, keys["metadata_key"], {"job_id": job.id})
        return ChainResult(JobResult(**keys), {"text_encoder_s": 0.01, "denoiser_s": 0.02, "vae_decoder_s": 0.01})


async def all_ready() -> dict[str, Any]:
    return {"s3": True, "TextEncoder": True, "Denoiser": True, "VaeDecoder": True}


@dataclass
class Env:
    client: httpx.AsyncClient
    storage: Storage
    store: JobStore
    pipeline: WritesVideo
    runner: JobRunner

    def all_keys(self) -> list[str]:
        return self.storage.list_keys(self.storage.key(""))


@asynccontextmanager
async def serving(storage: Storage, *, fail: bool = False, max_concurrent: int = 64,
                  readiness: Callable[[], Awaitable[dict[str, Any]]] = all_ready,
                  raise_app_exceptions: bool = True, page_limit: int = 20,
                  content_redirect: bool = False, docs: str = "public") -> AsyncIterator[Env]:
    jobs = JobsConfig(max_attempts=2, lease_s=5, heartbeat_s=0.5, reclaim_interval_s=1, retry_backoff_s=0,
                      max_concurrent_per_replica=max_concurrent)
    config = AppConfig(s3=storage.cfg, jobs=jobs, api=ApiConfig(api_keys=[API_KEY], default_page_limit=page_limit,
                                                             content_redirect=content_redirect, docs=docs),
                       keys={"legacy_plan": "enterprise"})
    pipeline = WritesVideo(storage, fail=fail)
    graph = build_ingress(config, storage=storage, pipeline=pipeline, owner="ingress-unit")
    store, runner = graph.store, graph.runner
    app = create_app(graph, readiness)
    # raise_app_exceptions=False shows what a client gets from a 500 (Starlette re-raises it after answering)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            yield Env(client, storage, store, pipeline, runner)
    finally:
        await runner.stop()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def create(env: Env, **fields: Any) -> dict[str, Any]:
    r = await env.client.post("/v1/videos", json={"prompt": "a cat on a skateboard", **SMALL, **fields}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_status(env: Env, video_id: str, *statuses: str) -> httpx.Response:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        r = await env.client.get(f"/v1/videos/{video_id}", headers=AUTH)
        assert r.status_code == 200, r.text
        if r.json()["status"] in statuses:
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"{video_id} still {r.json()['status']} after {TIMEOUT_S} s, wanted {statuses}")
        await asyncio.sleep(0.02)


def assert_error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == code and err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body as the OpenAI SDK sends it: every field a string part."""
    boundary = f"videogen-{uuid.uuid4().hex}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    for name, (filename, data, ctype) in (files or {}).items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# ---- auth and probes ------------------------------------------------------------------------------------------


def test_requests_without_a_valid_key_get_401_and_change_nothing(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            some_id = new_job_id()
            calls = [("POST", "/v1/videos", {"prompt": "a cat"}), ("GET", "/v1/videos", None),
                     ("GET", f"/v1/videos/{some_id}", None), ("DELETE", f"/v1/videos/{some_id}", None),
                     ("GET", f"/v1/videos/{some_id}/content", None)]
            for headers, code in (({}, "missing_api_key"),
                                  ({"Authorization": "Basic c2stdW5pdC10ZXN0"}, "missing_api_key"),
                                  ({"Authorization": "Bearer "}, "missing_api_key"),
                                  ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
                                  ({"Authorization": f"Bearer {API_KEY}x"}, "invalid_api_key")):
                for method, path, body in calls:
                    r = await env.client.request(method, path, json=body, headers=headers)
                    err = assert_error(r, 401, code)
                    assert err["type"] == "authentication_error"
                    assert r.headers["www-authenticate"] == "Bearer"
            assert env.all_keys() == [] and env.pipeline.calls == 0
            # the scheme is case-insensitive, as in RFC 7235
            r = await env.client.get("/v1/videos", headers={"Authorization": f"bearer {API_KEY}"})
            assert r.status_code == 200

    run(main())


def test_health_and_readiness(storage: Storage) -> None:
    checks: dict[str, Any] = {"s3": True, "TextEncoder": True, "Denoiser": "not ready (UPDATING)",
                              "VaeDecoder": True}

    async def readiness() -> dict[str, Any]:
        return dict(checks)

    async def main() -> None:
        async with serving(storage, readiness=readiness) as env:
            r = await env.client.get("/healthz")  # probes need no key
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = await env.client.get("/readyz")
            assert r.status_code == 503
            assert r.json() == {"status": "not_ready", "checks": checks}
            checks["Denoiser"] = True
            r = await env.client.get("/readyz")
            assert r.status_code == 200 and r.json() == {"status": "ready", "checks": checks}

    run(main())


def test_models_lists_the_served_models_with_what_each_accepts(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            assert (await env.client.get("/v1/models")).status_code == 401
            r = await env.client.get("/v1/models", headers=AUTH)
            assert r.status_code == 200, r.text
            [model] = r.json()["data"]
            assert r.json()["object"] == "list" and model["object"] == "model" and model["default"] is True
            assert model["id"] == "cogvideox-tiny-2b" and model["family"] == "cogvideox-2b"
            # the default AppConfig's model: the 2b preset (720x480, 49 frames at 8 fps, 8N+1 frames)
            assert (model["width"], model["height"], model["num_frames"], model["fps"]) == (720, 480, 49, 8)
            assert model["frame_rule"] == "8N+1" and model["max_frames"] >= 49

    run(main())


def test_models_follow_the_settings_of_each_model(storage: Storage) -> None:
    config = AppConfig.model_validate({
        "s3": storage.cfg.model_dump(),
        "model": {"name": "a", "family": "cogvideox-2b", "defaults": {"width": 96, "height": 64, "fps": 12}},
        "models": [{"name": "b", "family": "cogvideox1.5-5b", "aliases": ["b15"]}]})
    graph = build_ingress(config, storage=storage, pipeline=WritesVideo(storage), owner="ingress-unit")
    a, b = graph.service.models().data
    assert (a.id, a.default, a.width, a.height, a.fps) == ("a", True, 96, 64, 12)
    assert (b.id, b.default, b.aliases, b.frame_rule, b.width) == ("b", False, ["b15"], "16N+1", 1360)


# ---- create and read ------------------------------------------------------------------------------------------


def test_create_json_returns_a_queued_video_that_completes(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            before = int(time.time())
            r = await env.client.post("/v1/videos", headers=AUTH, json={
                "prompt": "a cat on a skateboard", "model": MODEL, "size": "64x48", "seconds": "1",
                "num_inference_steps": 4, "seed": 7, "negative_prompt": "blurry"})
            assert r.status_code == 200, r.text
            assert r.headers["openai-poll-after-ms"] == "1000"
            video = r.json()
            assert video["id"].startswith("video_") and video["object"] == "video"
            assert before <= video["created_at"] <= int(time.time())
            assert video["status"] == "queued" and video["progress"] == 0
            assert video["model"] == MODEL and video["seconds"] == "1" and video["size"] == "64x48"
            assert video["prompt"] == "a cat on a skateboard" and video["negative_prompt"] == "blurry"
            assert video["num_frames"] == 9 and video["fps"] == 8 and video["seed"] == 7
            assert video["num_inference_steps"] == 4 and video["error"] is None and video["video_url"] is None

            r = await wait_status(env, video["id"], "completed", "failed")
            done = r.json()
            assert done["status"] == "completed", done
            assert done["progress"] == 100 and done["attempts"] == 1 and done["completed_at"] is not None
            assert "openai-poll-after-ms" not in r.headers
            assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in done["video_url"]
            assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in done["thumbnail_url"]
            assert done["url_expires_at"] >= int(time.time()) + storage.cfg.presign_expires_s - 5
            # minted per read, never stored with the job
            record = storage.get_bytes(env.store.record_key(video["id"]))
            assert b"X-Amz" not in record
            # the URL really serves the uploaded bytes from the (local) S3
            got = await asyncio.to_thread(httpx.get, done["video_url"], timeout=10)
            assert got.status_code == 200 and got.content == video_bytes(video["id"])
            assert env.pipeline.calls == 1

    run(main())


def test_create_accepts_multipart_form_like_the_openai_sdk(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body, ctype = multipart({"prompt": "a cat", "model": MODEL, "size": "64x48", "num_frames": "9",
                                     "use_dynamic_cfg": "true", "seed": "42", "guidance_scale": "4.5",
                                     "num_inference_steps": "4"})
            r = await env.client.post("/v1/videos", content=body, headers={**AUTH, "Content-Type": ctype})
            assert r.status_code == 200, r.text
            video = r.json()
            assert video["num_frames"] == 9 and video["use_dynamic_cfg"] is True and video["seed"] == 42
            assert video["guidance_scale"] == 4.5 and video["num_inference_steps"] == 4
            assert video["seconds"] == "1" and video["size"] == "64x48"
            # so is a urlencoded form
            r = await env.client.post("/v1/videos", headers=AUTH, data={
                "prompt": "a dog", "size": "64x48", "num_frames": "17", "use_dynamic_cfg": "false"})
            assert r.status_code == 200, r.text
            assert r.json()["num_frames"] == 17 and r.json()["use_dynamic_cfg"] is False
            await wait_status(env, video["id"], "completed")

    run(main())


BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": "a cat", "num_frames": 10}, "num_frames", "invalid_value"),
    ({"prompt": "a cat", "seconds": "100"}, "seconds", "invalid_value"),
    ({"prompt": "a cat", "seconds": "soon"}, "seconds", "invalid_value"),
    ({"prompt": "a cat", "size": "65x48"}, "size", "invalid_value"),
    ({"prompt": "a cat", "size": "big"}, "size", "invalid_value"),
    ({"prompt": "a cat", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "a cat", "fps": 0}, "fps", "invalid_value"),
    ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
    ({"prompt": "a cat", "num_inference_steps": "many"}, "num_inference_steps", "invalid_value"),
    ({"prompt": "a cat", "guidance_scale": 99}, "guidance_scale", "invalid_value"),
    # the served model is text-to-video: an image is refused, naming the models that take one
    ({"prompt": "a cat", "input_reference": "https://example.com/cat.png"}, "input_reference",
     "image_not_supported"),
    ({"prompt": "a cat", "model": "sora-2"}, "model", "model_not_found"),
    ({"prompt": "   "}, "prompt", "invalid_value"),
    ({"prompt": "x" * 2001}, "prompt", "invalid_value"),
    ({"size": "64x48"}, "prompt", "invalid_value"),
    ({"prompt": "a cat", "duration": 5}, "duration", "invalid_value"),  # unknown field
]


def test_bad_requests_get_400_naming_the_field_and_write_nothing(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for body, param, code in BAD_REQUESTS:
                r = await env.client.post("/v1/videos", json=body, headers=AUTH)
                err = assert_error(r, 400, code, param)
                assert err["type"] == "invalid_request_error"
            r = await env.client.post("/v1/videos", json={"prompt": "a cat", "duration": 5}, headers=AUTH)
            assert "unknown field 'duration'" in r.json()["error"]["message"]
            r = await env.client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 10}, headers=AUTH)
            assert "10" in r.json()["error"]["message"]  # says what was given

            form, ctype = multipart({"prompt": "a cat", "num_frames": "nine"})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            assert_error(r, 400, "invalid_value", "num_frames")
            form, ctype = multipart({"prompt": "a cat"},
                                    files={"input_reference": ("cat.png", b"\x89PNG", "image/png")})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            assert_error(r, 400, "image_not_supported", "input_reference")
            form, ctype = multipart({"prompt": "a cat"}, files={"negative_prompt": ("n.txt", b"x", "text/plain")})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            assert_error(r, 400, "invalid_value", "negative_prompt")  # only input_reference may be a file

            for content in (b"{not json", b"", b"[1, 2]", b'"a cat"'):
                r = await env.client.post("/v1/videos", content=content,
                                          headers={**AUTH, "Content-Type": "application/json"})
                assert_error(r, 400, "invalid_json")
            r = await env.client.post("/v1/videos", content=b"a cat", headers={**AUTH, "Content-Type": "text/plain"})
            err = assert_error(r, 415, "unsupported_media_type")
            assert err["type"] == "invalid_request_error"

            assert storage.list_keys(storage.key("jobs", "")) == []
            assert env.all_keys() == [] and env.pipeline.calls == 0

    run(main())


def test_running_and_queued_videos_ask_to_poll_and_have_no_content(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, max_concurrent=1) as env:
            env.pipeline.gate.clear()
            running = await create(env)
            r = await wait_status(env, running["id"], "in_progress")
            assert r.headers["openai-poll-after-ms"] == "1000"
            video = r.json()
            assert video["stage"] == "encoding" and 0 <= video["progress"] < 100 and video["attempts"] == 1
            assert video["video_url"] is None

            queued = await create(env)  # the one slot is taken: stays queued
            r = await env.client.get(f"/v1/videos/{queued['id']}", headers=AUTH)
            assert r.json()["status"] == "queued" and r.headers["openai-poll-after-ms"] == "1000"

            for vid, status in ((queued["id"], "queued"), (running["id"], "in_progress")):
                r = await env.client.get(f"/v1/videos/{vid}/content", headers=AUTH)
                err = assert_error(r, 409, "video_not_ready", "video_id")
                assert err["type"] == "conflict_error" and status in err["message"]

            env.pipeline.gate.set()
            for vid in (running["id"], queued["id"]):
                await wait_status(env, vid, "completed")

    run(main())


def test_content_of_a_completed_video_is_the_uploaded_bytes(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            vid = (await create(env))["id"]
            await wait_status(env, vid, "completed")
            r = await env.client.get(f"/v1/videos/{vid}/content", headers=AUTH)
            assert r.status_code == 200 and r.content == video_bytes(vid)
            assert r.headers["content-type"] == "video/mp4"
            assert r.headers["content-disposition"] == f'attachment; filename="{vid}.mp4"'
            r = await env.client.get(f"/v1/videos/{vid}/content", params={"variant": "thumbnail"}, headers=AUTH)
            assert r.status_code == 200 and r.content == cover_bytes(vid)
            assert r.headers["content-type"] == "image/jpeg"
            r = await env.client.get(f"/v1/videos/{vid}/content", params={"variant": "spritesheet"}, headers=AUTH)
            assert_error(r, 400, "invalid_value", "variant")

    run(main())


def test_failed_video_shows_a_client_safe_error(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, fail=True) as env:
            vid = (await create(env))["id"]
            r = await wait_status(env, vid, "failed")
            video = r.json()
            assert video["error"]["code"] == "stage_error" and "VaeDecoder" in video["error"]["message"]
            assert "10.0.0.7" not in video["error"]["message"] and "2 attempts" in video["error"]["message"]
            assert video["attempts"] == 2 and video["progress"] == 0 and video["video_url"] is None
            assert "openai-poll-after-ms" not in r.headers
            r = await env.client.get(f"/v1/videos/{vid}/content", headers=AUTH)
            assert_error(r, 409, "video_not_ready", "video_id")

    run(main())


# ---- list -----------------------------------------------------------------------------------------------------


def test_list_is_newest_first_and_paginates(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, page_limit=3) as env:
            ids = []
            for n in range(3):
                ids.append((await create(env, prompt=f"clip {n}"))["id"])
                await asyncio.sleep(0.005)  # distinct creation milliseconds, so "newest" is well defined
            newest_first = ids[::-1]

            r = await env.client.get("/v1/videos", headers=AUTH)
            assert r.status_code == 200
            page = r.json()
            assert page["object"] == "list" and [v["id"] for v in page["data"]] == newest_first
            assert page["has_more"] is False
            assert page["first_id"] == newest_first[0] and page["last_id"] == newest_first[-1]
            assert all(v["object"] == "video" for v in page["data"])

            ids.append((await create(env, prompt="clip 3"))["id"])  # one more than the configured page of 3
            newest_first = ids[::-1]
            r = await env.client.get("/v1/videos", headers=AUTH)
            assert [v["id"] for v in r.json()["data"]] == newest_first[:3] and r.json()["has_more"] is True

            r = await env.client.get("/v1/videos", params={"limit": 2}, headers=AUTH)
            page = r.json()
            assert [v["id"] for v in page["data"]] == newest_first[:2] and page["has_more"] is True
            assert page["last_id"] == newest_first[1]
            r = await env.client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}, headers=AUTH)
            page = r.json()
            assert [v["id"] for v in page["data"]] == newest_first[2:] and page["has_more"] is False
            r = await env.client.get("/v1/videos", params={"after": newest_first[-1]}, headers=AUTH)
            assert r.json() == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}

            r = await env.client.get("/v1/videos", params={"order": "asc"}, headers=AUTH)
            assert [v["id"] for v in r.json()["data"]] == ids[:3] and r.json()["has_more"] is True
            r = await env.client.get("/v1/videos", params={"order": "sideways"}, headers=AUTH)
            assert_error(r, 422, "invalid_value", "order")
            for limit in (0, 101):
                r = await env.client.get("/v1/videos", params={"limit": limit}, headers=AUTH)
                assert_error(r, 400, "invalid_value", "limit")
            r = await env.client.get("/v1/videos", params={"limit": "ten"}, headers=AUTH)
            assert_error(r, 422, "invalid_value", "limit")
            r = await env.client.get("/v1/videos", params={"after": "../jobs"}, headers=AUTH)
            assert_error(r, 400, "invalid_value", "after")
            for vid in ids:
                await wait_status(env, vid, "completed")

    run(main())


def test_list_oldest_first_pages_with_after_and_reverses_newest_first(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, page_limit=2) as env:
            ids = []
            for n in range(5):
                ids.append((await create(env, prompt=f"clip {n}"))["id"])
                await asyncio.sleep(0.005)  # distinct creation milliseconds: oldest first is the creation order
            for vid in ids:
                await wait_status(env, vid, "completed")

            async def pages(order: str, limit: int) -> list[dict[str, Any]]:
                got, params = [], {"order": order, "limit": limit}
                while len(got) < 10:
                    r = await env.client.get("/v1/videos", params=params, headers=AUTH)
                    assert r.status_code == 200, r.text
                    got.append(r.json())
                    if not got[-1]["has_more"]:
                        return got
                    params = {**params, "after": got[-1]["last_id"]}
                raise AssertionError(f"no last page: {got}")

            asc = await pages("asc", 2)
            assert [[v["id"] for v in p["data"]] for p in asc] == [ids[0:2], ids[2:4], ids[4:]]
            assert [p["has_more"] for p in asc] == [True, True, False]
            assert [(p["first_id"], p["last_id"]) for p in asc] == [(ids[0], ids[1]), (ids[2], ids[3]),
                                                                    (ids[4], ids[4])]
            desc = await pages("desc", 100)
            assert [v["id"] for v in desc[0]["data"]] == ids[::-1]
            r = await env.client.get("/v1/videos", params={"order": "asc", "after": ids[-1]}, headers=AUTH)
            assert r.json() == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}

            r = await env.client.delete(f"/v1/videos/{ids[2]}", headers=AUTH)
            assert r.status_code == 200, r.text
            left = [ids[0], ids[1], ids[3], ids[4]]
            assert [[v["id"] for v in p["data"]] for p in await pages("asc", 2)] == [left[:2], left[2:]]
            assert [v["id"] for v in (await pages("desc", 100))[0]["data"]] == left[::-1]
            # the deleted id still works as a cursor (the marker key is derived from the id)
            r = await env.client.get("/v1/videos", params={"order": "asc", "after": ids[2]}, headers=AUTH)
            assert [v["id"] for v in r.json()["data"]] == left[2:]

    run(main())


def test_service_list_refuses_an_order_other_than_asc_or_desc(storage: Storage) -> None:
    # the route's Literal answers 422 first; the service (used by tools and tests too) says what it accepts
    async def main() -> None:
        graph = build_ingress(AppConfig(s3=storage.cfg), storage=storage, pipeline=WritesVideo(storage),
                              owner="ingress-unit")
        try:
            for order in ("sideways", "ASC", ""):
                with pytest.raises(ServiceError) as info:
                    await graph.service.list(None, 10, order, tenant="default")
                err = info.value
                assert (err.status, err.code, err.param) == (400, "invalid_value", "order")
                assert "'asc'" in err.message and "'desc'" in err.message and repr(order) in err.message
            assert (await graph.service.list(None, 10, "asc", tenant="default")).data == []
        finally:
            await graph.runner.stop()

    run(main())


# ---- not found and delete -------------------------------------------------------------------------------------


def test_unknown_or_malformed_ids_are_404(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for vid in (new_job_id(), "nope", "video_XYZ", "video_..", new_job_id().upper()):
                for method, path in (("GET", f"/v1/videos/{vid}"), ("DELETE", f"/v1/videos/{vid}"),
                                     ("GET", f"/v1/videos/{vid}/content")):
                    r = await env.client.request(method, path, headers=AUTH)
                    err = assert_error(r, 404, "not_found", "video_id")
                    assert err["type"] == "not_found_error"
            # an encoded '/' is decoded before routing: no video route matches, the envelope still does
            for path in ("/v1/videos/video_..%2F..%2Fjobs", "/v1/nothing"):
                assert_error(await env.client.get(path, headers=AUTH), 404, "not_found")
            assert env.all_keys() == []

    run(main())


def test_delete_removes_the_job_and_its_video(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            vid = (await create(env))["id"]
            await wait_status(env, vid, "completed")
            assert all(storage.exists(k) for k in video_keys(storage, vid).values())
            r = await env.client.delete(f"/v1/videos/{vid}", headers=AUTH)
            assert r.status_code == 200 and r.json() == {"id": vid, "object": "video.deleted", "deleted": True}
            for path in (f"/v1/videos/{vid}", f"/v1/videos/{vid}/content"):
                assert_error(await env.client.get(path, headers=AUTH), 404, "not_found", "video_id")
            assert_error(await env.client.delete(f"/v1/videos/{vid}", headers=AUTH), 404, "not_found", "video_id")
            r = await env.client.get("/v1/videos", headers=AUTH)
            assert r.json()["data"] == []
            # billing history stays: usage records outlive the deleted video
            assert [k for k in env.all_keys() if not k.startswith("usage/")] == []

    run(main())


def test_delete_of_a_running_video_cancels_its_chain(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            env.pipeline.gate.clear()
            vid = (await create(env))["id"]
            await wait_status(env, vid, "in_progress")
            r = await env.client.delete(f"/v1/videos/{vid}", headers=AUTH)
            assert r.status_code == 200 and r.json()["deleted"] is True
            deadline = time.monotonic() + TIMEOUT_S
            while vid in env.runner.running:
                assert time.monotonic() < deadline, "the runner kept the deleted job"
                await asyncio.sleep(0.02)
            assert env.pipeline.calls == 1 and env.pipeline.cancelled == 1
            assert_error(await env.client.get(f"/v1/videos/{vid}", headers=AUTH), 404, "not_found", "video_id")
            assert env.all_keys() == []

    run(main())


@pytest.mark.parametrize(("docs", "anonymous", "with_key", "page"), [
    ("public", 200, 200, 200), ("authenticated", 401, 200, 404), ("off", 404, 404, 404)])
def test_the_api_document_can_be_put_behind_a_key_or_switched_off(storage: Storage, docs, anonymous, with_key,
                                                                    page) -> None:
    async def main() -> None:
        async with serving(storage, docs=docs) as env:
            assert (await env.client.get("/openapi.json")).status_code == anonymous
            r = await env.client.get("/openapi.json", headers=AUTH)
            assert r.status_code == with_key
            if with_key == 200:
                assert "/v1/videos" in r.json()["paths"]
            else:
                assert_error(r, 404, "not_found", None)
            assert (await env.client.get("/docs", headers=AUTH)).status_code == page

    run(main())


def test_openapi_declares_the_error_envelope(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            spec = (await env.client.get("/openapi.json")).json()
            responses = spec["paths"]["/v1/videos"]["post"]["responses"]
            assert {"400", "401", "404", "409", "503"} <= set(responses)
            ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorEnvelope")
            json.dumps(spec)  # serializable as served

    run(main())


# ---- storage trouble ------------------------------------------------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_is_a_503_in_the_envelope(s3_config: S3Config) -> None:
    # StorageError documents "maps to HTTP 503 at the API"; the routes declare 503 for it
    down = s3_config.model_copy(update={"endpoint_url": f"http://127.0.0.1:{closed_port()}", "max_attempts": 1,
                                        "connect_timeout_s": 1.0, "read_timeout_s": 1.0})
    storage = Storage.from_config(down)

    async def main() -> None:
        async with serving(storage, raise_app_exceptions=False) as env:
            for method, path, body in (("GET", f"/v1/videos/{new_job_id()}", None), ("GET", "/v1/videos", None),
                                       ("POST", "/v1/videos", {"prompt": "a cat", **SMALL})):
                r = await env.client.request(method, path, json=body, headers=AUTH)
                err = assert_error(r, 503, "storage_unavailable")
                assert err["type"] == "service_unavailable_error" and r.headers["retry-after"] == "1"
                assert "127.0.0.1" not in err["message"] and storage.bucket not in err["message"]

    run(main())


def test_content_whose_object_is_gone_is_404_not_500(storage: Storage) -> None:
    # e.g. an S3 lifecycle rule removed the mp4 after `expires_at`, while the record is still listed
    async def main() -> None:
        async with serving(storage, raise_app_exceptions=False) as env:
            vid = (await create(env))["id"]
            await wait_status(env, vid, "completed")
            storage.delete(video_keys(storage, vid)["video_key"])
            r = await env.client.get(f"/v1/videos/{vid}/content", headers=AUTH)
            err = assert_error(r, 404, "not_found", "video_id")
            assert storage.bucket not in err["message"]

    run(main())
