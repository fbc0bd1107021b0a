"""Zhipu's open-platform API (`/api/paas/v4`, serve/api/zhipu.py) over the same service as `/v1/videos`.

The bodies are the ones the official `zai-sdk` really sends: `sdk_body` runs its `videos.generations` against an
`httpx.MockTransport` and keeps the request, so the explicit `null`s it sends for every unset parameter are the
SDK's own. (tests/integration/test_api_e2e.py runs the SDK end to end against the local cluster.)
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from serve.api import zhipu
from serve.storage import Storage
from tests.unit.test_routes import AUTH, MODEL, run, serving, wait_status

zai = pytest.importorskip("zai", reason="the zai-sdk test extra (pyproject [dev])")

CREATE = "/api/paas/v4/videos/generations"
SMALL = {"size": "64x48", "duration": 1, "fps": 8}  # 9 frames: the tiny fake chain is instant either way


def sdk_body(**kwargs: Any) -> dict[str, Any]:
    """The JSON body `ZhipuAiClient.videos.generations(**kwargs)` sends."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"id": "x", "model": "m", "request_id": "r", "task_status": "PROCESSING",
                                         "video_result": []})

    client = zai.ZhipuAiClient(api_key="sk-x", base_url="http://ingress/api/paas/v4", max_retries=0,
                               http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    client.videos.generations(**kwargs)
    (request,) = sent
    assert request.url.path == CREATE
    return json.loads(request.content)


def assert_zhipu_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "param", "videogen_code"}, err
    assert err["code"] == code and err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_the_sdk_sends_every_parameter_as_explicit_null():
    body = sdk_body(model=MODEL, prompt="a cat")
    assert body["model"] == MODEL and body["prompt"] == "a cat"
    nulls = {k for k, v in body.items() if v is None}
    assert {"style", "aspect_ratio", "off_peak", "movement_amplitude", "with_audio", "image_url",
            "request_id", "user_id", "size", "duration", "fps", "quality"} <= nulls, body


def test_create_poll_and_fetch_the_result_urls(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = sdk_body(model=MODEL, prompt="a red fox in snow", quality="speed", request_id="order-17",
                            user_id="end-user-9", **SMALL)
            r = await env.client.post(CREATE, json=body, headers=AUTH)
            assert r.status_code == 200, r.text
            task = r.json()
            assert set(task) == {"id", "model", "request_id", "task_status"}
            assert task["model"] == MODEL and task["request_id"] == "order-17"
            assert task["task_status"] == "PROCESSING"
            await wait_status(env, task["id"], "completed")
            r = await env.client.get(f"/api/paas/v4/async-result/{task['id']}", headers=AUTH)
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["task_status"] == "SUCCESS" and result["request_id"] == "order-17"
            (item,) = result["video_result"]
            # fresh presigned URLs of the stored objects
            async with httpx.AsyncClient() as s3:
                assert (await s3.get(item["url"])).content.startswith(b"\x00\x00\x00\x18ftyp")
                assert (await s3.get(item["cover_image_url"])).content.startswith(b"\xff\xd8")
            # the same job as /v1/videos sees it, with what the request asked for
            video = (await env.client.get(f"/v1/videos/{task['id']}", headers=AUTH)).json()
            assert video["quality"] == "speed" and video["size"] == "64x48" and video["fps"] == 8
            assert video["num_frames"] == 9
            record = env.store.get(task["id"])
            assert record is not None and record.request_id == "order-17" and record.user_id == "end-user-9"

    run(main())


def test_request_id_is_the_idempotency_key(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = sdk_body(model=MODEL, prompt="waves at dusk", request_id="retry-me", **SMALL)
            first = (await env.client.post(CREATE, json=body, headers=AUTH)).json()
            again = await env.client.post(CREATE, json=body, headers=AUTH)
            assert again.status_code == 200 and again.json()["id"] == first["id"]
            assert again.headers["idempotent-replayed"] == "true"
            assert env.pipeline.calls <= 1
            # the same request_id with another body is refused, naming request_id
            other = dict(body, prompt="a different video")
            err = assert_zhipu_error(await env.client.post(CREATE, json=other, headers=AUTH), 422, "1214",
                                     "request_id")
            assert "request_id" in err["message"] and "Idempotency-Key" not in err["message"]
            # an Idempotency-Key of the same text on /v1/videos is another key
            r = await env.client.post("/v1/videos", headers={**AUTH, "Idempotency-Key": "retry-me"},
                                      json={"prompt": "something else", "size": "64x48", "num_frames": 9})
            assert r.status_code == 200 and r.json()["id"] != first["id"]

    run(main())


@pytest.mark.parametrize(("fields", "param"), [
    ({"with_audio": True}, "with_audio"),
    ({"image_url": "https://example.com/cat.png"}, "image_url"),
    ({"style": "anime"}, "style"),
    ({"off_peak": True}, "off_peak"),
    ({"movement_amplitude": "large"}, "movement_amplitude"),
    ({"aspect_ratio": "16:9"}, "aspect_ratio"),  # the native 720x480 is 3:2
    ({"watermark_enabled": True}, "watermark_enabled"),
    ({"sensitive_word_check": {"type": "ALL", "status": "DISABLE"}}, "sensitive_word_check"),
    ({"duration": 60}, "duration"),
    ({"size": "1000x1000"}, "size"),
    ({"duration": True}, "duration"),  # not 1 second
])
def test_what_cannot_be_done_is_a_400_naming_the_field_and_creates_nothing(storage: Storage, fields, param) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = sdk_body(model=MODEL, prompt="a lighthouse", **fields)
            r = await env.client.post(CREATE, json=body, headers=AUTH)
            assert_zhipu_error(r, 400, "1214", param)
            assert env.all_keys() == [] and env.pipeline.calls == 0

    run(main())


def test_honoured_and_ignored_values_are_accepted(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            body = sdk_body(model=MODEL, prompt="a lighthouse", style="general", with_audio=False, off_peak=False,
                            movement_amplitude="auto", aspect_ratio="4:3", watermark_enabled=False,
                            sensitive_word_check={"type": "ALL", "status": "ENABLE"}, **SMALL)
            r = await env.client.post(CREATE, json=body, headers=AUTH)
            assert r.status_code == 200, r.text
            body = sdk_body(model=MODEL, prompt="a harbour", sensitive_word_check={"type": "ALL", "status": None},
                            **SMALL)  # null is absent, inside an object too
            r = await env.client.post(CREATE, json=body, headers=AUTH)
            assert r.status_code == 200, r.text

    run(main())


def test_errors_use_zhipus_envelope_and_codes(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await env.client.post(CREATE, json={"model": MODEL, "prompt": "x"})
            assert_zhipu_error(r, 401, "1001")
            r = await env.client.post(CREATE, json={"model": MODEL, "prompt": "x"},
                                      headers={"Authorization": "Bearer sk-wrong"})
            assert_zhipu_error(r, 401, "1002")
            r = await env.client.post(CREATE, json={"model": "cogvideox-9", "prompt": "x"}, headers=AUTH)
            assert_zhipu_error(r, 400, "1211", "model")
            r = await env.client.post(CREATE, json={"model": MODEL, "prompt": None}, headers=AUTH)
            assert_zhipu_error(r, 400, "1213", "prompt")
            r = await env.client.post(CREATE, json={"model": MODEL, "prompt": "x", "colour": "red"}, headers=AUTH)
            assert_zhipu_error(r, 400, "1214", "colour")
            r = await env.client.post(CREATE, content=b'{"model": "m", "model": "n"}',
                                      headers={**AUTH, "Content-Type": "application/json"})
            assert_zhipu_error(r, 400, "1214", "model")
            r = await env.client.get("/api/paas/v4/async-result/video_000000000000aaaaaaaaaaaaaaaa", headers=AUTH)
            assert_zhipu_error(r, 404, "1222", "video_id")
            r = await env.client.put(CREATE, headers=AUTH)
            assert_zhipu_error(r, 405, "1214")
            # the OpenAI routes keep their own envelope
            r = await env.client.post("/v1/videos", json={"prompt": "x", "colour": "red"}, headers=AUTH)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert env.all_keys() == []

    run(main())


def test_a_failed_task_is_fail_with_its_reason(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, fail=True) as env:
            r = await env.client.post(CREATE, json=sdk_body(model=MODEL, prompt="x", **SMALL), headers=AUTH)
            task = r.json()
            await wait_status(env, task["id"], "failed")
            result = (await env.client.get(f"/api/paas/v4/async-result/{task['id']}", headers=AUTH)).json()
            assert result["task_status"] == "FAIL" and result["video_result"] == []
            assert result["error"]["code"] == "stage_error"

    run(main())


def test_status_mapping_covers_every_video_status():
    from typing import get_args

    from serve.api.wire import Video

    statuses = get_args(Video.model_fields["status"].annotation)
    assert {s: zhipu._STATUS[s] for s in statuses} == {
        "queued": "PROCESSING", "in_progress": "PROCESSING", "completed": "SUCCESS", "failed": "FAIL",
        "cancelled": "FAIL"}



def test_the_middlewares_refusals_use_zhipus_envelope_on_its_routes(storage: Storage) -> None:
    from serve.api.hardening import MAX_BODY_BYTES

    async def main() -> None:
        async with serving(storage) as env:
            r = await env.client.post(CREATE, json={"model": MODEL, "prompt": "x"},
                                      headers={**AUTH, "X-Big": "a" * 20_000})
            assert_zhipu_error(r, 431, "1214")
            r = await env.client.post(CREATE, content=b"{" + b" " * MAX_BODY_BYTES + b"}",
                                      headers={**AUTH, "Content-Type": "application/json"})
            assert_zhipu_error(r, 413, "1214")
            assert env.all_keys() == []

    run(main())
