"""The whole service on one local Ray cluster with moto's S3 server, through the official OpenAI SDK."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from PIL import Image

from serve.media.encoding import probe_mp4
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

TERMINAL = ("completed", "failed", "cancelled")


def api(cluster) -> httpx.Client:
    return httpx.Client(base_url=cluster.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def wait_for(http: httpx.Client, job_id: str, predicate, timeout_s: float = 120, interval_s: float = 0.05) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        r = http.get(f"/v1/videos/{job_id}")
        if r.status_code == 200 and predicate(r.json()):
            return r.json()
        time.sleep(interval_s)
    raise AssertionError(f"job {job_id} never matched; last: {r.status_code} {r.text}")


def job_objects(cluster) -> list[str]:
    return cluster.storage.list_keys(cluster.storage.key("jobs/"))


def test_sdk_create_and_poll_then_download(cluster, client):
    # OpenAI shut its Videos API down on 2026-09-24; the SDK says so on every call. A release that changes the
    # notice (or drops `videos`) must be noticed here, not silenced.
    with pytest.warns(DeprecationWarning, match="Sora API is scheduled to permanently shut down on September 24, 2026"):
        video = client.videos.create_and_poll(
            prompt="a red fox jumping over a snowy log", size="48x32", poll_interval_ms=200,
            extra_body={"num_frames": 9, "fps": 8, "seed": 1234, "num_inference_steps": 4,
                        "negative_prompt": "blurry"},
        )
    assert video.status == "completed", video.error
    assert video.progress == 100 and video.completed_at >= video.created_at and video.expires_at > video.completed_at
    assert video.size == "48x32" and video.seconds == "1"
    extra = video.model_extra or {}
    assert extra["seed"] == 1234 and extra["num_frames"] == 9
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in extra["video_url"]

    content = client.videos.download_content(video.id)
    mp4 = content.read()
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"], probe["fps"]) == (9, 48, 32, 8)
    assert "AI-generated" in probe["metadata"].get("comment", "") and video.id in probe["metadata"]["comment"]
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(thumb)).size == (48, 32)

    # the presigned URL is fresh, SigV4 and fetches the very same bytes from S3
    assert httpx.get(extra["video_url"]).content == mp4

    storage = cluster.storage
    cover = Image.open(io.BytesIO(storage.get_bytes(storage.key("videos", f"{video.id}.jpg"))))
    assert cover.format == "JPEG" and cover.size == (48, 32)
    meta = json.loads(storage.get_bytes(storage.key("videos", f"{video.id}.json")))
    assert meta["prompt"] == "a red fox jumping over a snowy log" and meta["seed"] == 1234
    assert meta["model"] == "cogvideox-tiny-2b" and meta["parameters"]["num_frames"] == 9
    assert {"text_encoder_s", "denoiser_s", "vae_decoder_s", "upload_s"} <= set(meta["timings_s"])
    assert meta["computed_with"] == {
        "denoiser": {"attention_backend": "sdpa", "compile": "off", "compiled": None, "fp8": False, "cache": "none",
                     "dtype": "float32", "device": "cpu"},
        "vae_decoder": {"tiled": False}}


def test_json_body_and_list_newest_first(cluster):
    with api(cluster) as http:
        ids = []
        for seed in (1, 2):
            r = http.post("/v1/videos", json={"prompt": f"waves {seed}", "seed": seed})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] in ("queued", "in_progress") and body["object"] == "video"
            ids.append(body["id"])
        page = http.get("/v1/videos", params={"limit": 1}).json()
        assert page["data"][0]["id"] == ids[1] and page["has_more"] is True
        nxt = http.get("/v1/videos", params={"limit": 1, "after": page["last_id"]}).json()
        assert nxt["data"][0]["id"] == ids[0]
        for job_id in ids:
            done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL)
            assert done["status"] == "completed", done


@pytest.mark.parametrize("body,param,status", [
    ({"prompt": "x", "num_frames": 10}, "num_frames", 400),
    ({"prompt": "x", "size": "50x32"}, "size", 400),
    ({"prompt": "x", "model": "sora-2"}, "model", 400),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", 400),
    ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale", 400),
    ({"prompt": "x", "frames": 9}, "frames", 400),
    ({"size": "48x32"}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
])
def test_bad_inputs_get_4xx_naming_the_field_and_create_no_job(cluster, body, param, status):
    before = job_objects(cluster)
    with api(cluster) as http:
        r = http.post("/v1/videos", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert job_objects(cluster) == before


def test_auth_and_malformed_bodies(cluster):
    before = job_objects(cluster)
    r = httpx.post(f"{cluster.base}/v1/videos", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(f"{cluster.base}/v1/videos", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with api(cluster) as http:
        r = http.post("/v1/videos", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/videos", content=b"x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = http.post("/v1/videos", files={"input_reference": ("a.png", b"123", "image/png")},
                      data={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
    assert job_objects(cluster) == before


def test_unknown_id_is_404_everywhere(cluster):
    with api(cluster) as http:
        for method, path in [("GET", "/v1/videos/video_00000000000000000000000000000"),
                             ("GET", "/v1/videos/nope/content"),
                             ("DELETE", "/v1/videos/video_0123456789ab0123456789abcdef")]:
            r = http.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"


def test_sdk_lists_the_served_models(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"cogvideox-tiny-2b", "cogvideox-tiny-5b", "cogvideox-tiny-5b-i2v"}
    tiny = models["cogvideox-tiny-2b"].model_extra or {}
    assert tiny["default"] is True and tiny["frame_rule"] == "8N+1" and tiny["width"] == 48
    assert tiny["inputs"] == ["text"] and models["cogvideox-tiny-5b-i2v"].model_extra["inputs"] == ["text", "image"]


def test_health_and_readiness(cluster):
    assert httpx.get(f"{cluster.base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{cluster.base}/readyz").json()
    assert ready["status"] == "ready"
    models = ("cogvideox-tiny-2b", "cogvideox-tiny-5b", "cogvideox-tiny-5b-i2v")
    assert ready["checks"] == {"s3": True, **{f"model-{model}/{stage}": True for model in models
                                              for stage in ("TextEncoder", "Denoiser", "VaeDecoder")},
                               "model-cogvideox-tiny-5b/Enhancer": True}  # the model with `enhance` has one


def test_a_request_names_its_model_and_runs_on_that_models_stages(cluster):
    with api(cluster) as http:
        r = http.post("/v1/videos", json={"prompt": "a lighthouse at dusk", "model": "cogvideox-tiny-5b",
                                          "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cogvideox-tiny-5b" and body["use_dynamic_cfg"] is True  # the 5b preset
        done = wait_for(http, body["id"], lambda v: v["status"] in TERMINAL)
        assert done["status"] == "completed", done
    storage = cluster.storage
    meta = json.loads(storage.get_bytes(storage.key("videos", f"{body['id']}.json")))
    assert meta["model"] == "cogvideox-tiny-5b"
    with api(cluster) as http:
        bad = http.post("/v1/videos", json={"prompt": "x", "model": "cogvideox-tiny-9b"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_not_found"
    assert "cogvideox-tiny-5b" in bad.json()["error"]["message"]


def test_quality_speed_uses_the_models_step_cache_and_the_record_says_so(cluster):
    """`quality: speed` engages the model's configured cache for that request only; each video's metadata
    says what computed it. A model without a cache serves a speed request exactly (nothing to trade)."""
    runs = {}
    with api(cluster) as http:
        for model, quality in (("cogvideox-tiny-5b", "speed"), ("cogvideox-tiny-5b", "quality"),
                               ("cogvideox-tiny-2b", "speed")):
            r = http.post("/v1/videos", json={"prompt": "a lighthouse at dusk", "model": model, "quality": quality,
                                              "seed": 5})
            assert r.status_code == 200, r.text
            runs[(model, quality)] = r.json()["id"]
        for job_id in runs.values():
            assert wait_for(http, job_id, lambda v: v["status"] in TERMINAL)["status"] == "completed"
        bad = http.post("/v1/videos", json={"prompt": "x", "quality": "fastest"})
    assert bad.status_code == 400 and "quality" in bad.json()["error"]["message"]
    storage = cluster.storage
    used = {run: json.loads(storage.get_bytes(storage.key("videos", f"{job_id}.json")))["computed_with"]["denoiser"]
            for run, job_id in runs.items()}
    assert used[("cogvideox-tiny-5b", "speed")]["cache"] == "first_block"
    assert used[("cogvideox-tiny-5b", "quality")]["cache"] == "none"
    assert used[("cogvideox-tiny-2b", "speed")]["cache"] == "none"


def test_zai_sdk_create_poll_and_download(cluster):
    """Zhipu's official client, pointed at this cluster by base URL and key only: create, poll, download."""
    from zai import ZhipuAiClient

    zai = ZhipuAiClient(api_key=API_KEY, base_url=f"{cluster.base}/api/paas/v4", max_retries=0, timeout=60)
    # Zhipu's model name, an alias of the served model
    task = zai.videos.generations(model="cogvideox-flash", prompt="a lighthouse in a storm", size="48x32",
                                  duration=1, fps=8, request_id="zai-e2e-1", user_id="end-user-1",
                                  extra_body={"seed": 7})
    assert task.task_status == "PROCESSING" and task.request_id == "zai-e2e-1" and task.id.startswith("video_")
    assert task.model == "cogvideox-tiny-2b"
    deadline = time.time() + 120
    result = zai.videos.retrieve_videos_result(id=task.id)
    while result.task_status == "PROCESSING" and time.time() < deadline:
        time.sleep(0.1)
        result = zai.videos.retrieve_videos_result(id=task.id)
    assert result.task_status == "SUCCESS", result
    (item,) = result.video_result
    mp4 = httpx.get(item.url).content
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"], probe["fps"]) == (9, 48, 32, 8)
    assert Image.open(io.BytesIO(httpx.get(item.cover_image_url).content)).size == (48, 32)
    # a retry with the same request_id is the same task, not a second video
    again = zai.videos.generations(model="cogvideox-flash", prompt="a lighthouse in a storm", size="48x32",
                                   duration=1, fps=8, request_id="zai-e2e-1", user_id="end-user-1",
                                   extra_body={"seed": 7})
    assert again.id == task.id
    # the SDK raises on Zhipu's error envelope
    from zai.core import APIRequestFailedError

    with pytest.raises(APIRequestFailedError) as refused:
        zai.videos.generations(model="cogvideox-tiny-2b", prompt="a song", with_audio=True)
    assert refused.value.response.json()["error"]["code"] == "1214"
