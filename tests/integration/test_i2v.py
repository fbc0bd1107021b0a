"""Image-to-video on the local cluster (issue 12): a picture and a prompt through the official SDKs and the CLI,
encoded on the tiny I2V model's VaeDecoder replica; a Denoiser replica killed mid-run is retried with the stored
image; bad images are 400s that leave no job."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.media.encoding import probe_mp4
from tests.integration.conftest import API_KEY, I2V_MODEL
from tests.integration.test_api_e2e import TERMINAL, api, wait_for
from tests.integration.test_faults import kill_replica

pytestmark = pytest.mark.integration

I2V_APP = f"model-{I2V_MODEL}"
QUICK = {"num_frames": 9, "fps": 8, "num_inference_steps": 4}


def picture(size: tuple[int, int] = (64, 40), seed: int = 0) -> bytes:
    """A non-square picture whose aspect differs from the video's 48x32 (stretched as diffusers does)."""
    im = Image.effect_noise(size, 60 + seed).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def metadata(cluster, video_id: str) -> dict:
    storage = cluster.storage
    return json.loads(storage.get_bytes(storage.key("videos", f"{video_id}.json")))


def job_keys(cluster) -> list[str]:
    return cluster.storage.list_keys(cluster.storage.key("jobs/"))


def test_sdk_create_and_poll_with_input_reference_gives_the_mp4(cluster, client):
    image = picture()
    with pytest.warns(DeprecationWarning):  # the SDK's Sora shutdown notice (test_api_e2e pins its wording)
        video = client.videos.create_and_poll(
            prompt="the fox turns its head", model=I2V_MODEL, input_reference=("fox.png", image, "image/png"),
            poll_interval_ms=200, extra_body={**QUICK, "seed": 42})
    assert video.status == "completed", video.error
    assert video.size == "48x32" and video.model == I2V_MODEL
    with pytest.warns(DeprecationWarning):
        mp4 = client.videos.download_content(video.id).read()
    probe = probe_mp4(mp4)
    assert (probe["frames"], probe["width"], probe["height"], probe["fps"]) == (9, 48, 32, 8)
    meta = metadata(cluster, video.id)
    assert meta["input_image"] == {"sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image),
                                   "media_type": "image/png", "width": 64, "height": 40, "source": "upload"}
    assert meta["timings_s"]["image_encoder_s"] > 0  # the VaeDecoder's encode call ran, and was timed
    assert meta["computed_with"]["image_encoder"]["input_image"]["sha256"] == meta["input_image"]["sha256"]
    # the same image, seed and prompt give the same video again (the generator's state crossed the replicas)
    with pytest.warns(DeprecationWarning):
        again = client.videos.create_and_poll(
            prompt="the fox turns its head", model=I2V_MODEL, input_reference=("fox.png", image, "image/png"),
            poll_interval_ms=200, extra_body={**QUICK, "seed": 42})
        same = client.videos.download_content(again.id).read()
    # the same frames, up to the CPU's float reassociation between runs (amplified by H.264); a generator that did
    # not carry the encoder's draw would give other noise altogether (tests/stages/test_i2v_numerics.py)
    a, b = frames_of(same), frames_of(mp4)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert a.shape == b.shape and diff.mean() < 1.0, (diff.mean(), diff.max())


def frames_of(mp4: bytes):
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_json_data_url_and_usage_bill_the_image_encode(cluster):
    image = picture(seed=1)
    with api(cluster) as http:
        r = http.post("/v1/videos", json={"prompt": "waves on a rock", "model": I2V_MODEL, **QUICK, "image_fit": "pad",
                                          "input_reference": {"image_url": "data:image/png;base64,"
                                                              + base64.b64encode(image).decode()}})
        assert r.status_code == 200, r.text
        done = wait_for(http, r.json()["id"], lambda v: v["status"] in TERMINAL)
        assert done["status"] == "completed", done
        day = time.strftime("%Y-%m-%d", time.gmtime(done["completed_at"]))
        usage = http.get("/v1/usage", params={"start": day, "end": day}).json()
    assert usage["totals"]["gpu_seconds"]["image_encoder"] > 0  # billed (the CPU run bills as if 1 GPU each)
    assert done["image_fit"] == "pad" and metadata(cluster, done["id"])["parameters"]["image_fit"] == "pad"


def test_zai_sdk_image_url_gives_the_video(cluster):
    from zai import ZhipuAiClient

    zai = ZhipuAiClient(api_key=API_KEY, base_url=f"{cluster.base}/api/paas/v4", max_retries=0, timeout=60)
    image = picture(seed=2)
    task = zai.videos.generations(model=I2V_MODEL, prompt="a kite climbs", fps=8, duration=1,
                                  image_url=base64.b64encode(image).decode())
    for _ in range(600):
        result = zai.videos.retrieve_videos_result(id=task.id)
        if result.task_status != "PROCESSING":
            break
        time.sleep(0.2)
    assert result.task_status == "SUCCESS", result
    probe = probe_mp4(httpx.get(result.video_result[0].url).content)
    assert (probe["frames"], probe["width"], probe["height"]) == (9, 48, 32)
    assert metadata(cluster, task.id)["input_image"]["sha256"] == hashlib.sha256(image).hexdigest()


def test_cli_image_makes_an_image_to_video_job(cluster, tmp_path, capsys):
    from videogen_client.cli import main

    path = tmp_path / "key-frame.png"
    path.write_bytes(picture(seed=3))
    out = tmp_path / "out.mp4"
    code = main(["--base-url", f"{cluster.base}/v1", "--api-key", cluster.keys["acme"], "generate", "a boat drifts",
                 "--image", str(path), "--model", I2V_MODEL, "--frames", "9", "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    probe = probe_mp4(out.read_bytes())
    assert (probe["frames"], probe["width"], probe["height"]) == (9, 48, 32)


def test_killing_the_denoiser_mid_run_retries_with_the_stored_image(cluster):
    image = picture(seed=4)
    with api(cluster) as http:
        files = {"input_reference": ("frame.png", image, "image/png")}
        # 49 frames, 200 steps: seconds of denoising (one S3 progress write per step), time to kill mid-loop
        r = http.post("/v1/videos", files=files, data={"prompt": "slow zoom on a harbour", "model": I2V_MODEL,
                                                       "num_frames": "49", "num_inference_steps": "200",
                                                       "seed": "5"})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        running = wait_for(http, job_id, lambda v: v["status"] == "in_progress" and v.get("stage") == "denoising"
                           and (v.get("step") or 0) >= 2, interval_s=0.02)
        assert running["step"] < running["total_steps"], "the job finished denoising before the kill"
        kill_replica("Denoiser", I2V_APP)
        done = wait_for(http, job_id, lambda v: v["status"] in TERMINAL, timeout_s=240)
    assert done["status"] == "completed", done
    record = json.loads(cluster.storage.get_bytes(cluster.storage.key("jobs", f"{job_id}.json")))
    assert record["attempts"] >= 2, record  # the killed attempt was retried as a whole chain
    stored = cluster.storage.get_bytes(record["input_image"]["key"])
    assert stored == image and metadata(cluster, job_id)["input_image"]["sha256"] == hashlib.sha256(image).hexdigest()


def test_every_kind_of_bad_image_is_a_400_and_no_job(cluster):
    ok = picture()
    bomb = bytearray(picture((32, 32)))
    bomb[16:24] = (60_000).to_bytes(4, "big") * 2  # a header claiming 3.6 GP (CRC left wrong: invalid either way)
    animated = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:])
    cases = [(b"GIF89a" + b"\0" * 40, "image/gif", "unsupported_image"),
             (ok, "image/jpeg", "image_type_mismatch"),
             (ok[:70], "image/png", "invalid_image"),
             (bytes(bomb), "image/png", None),  # image_too_large or invalid_image: both refuse before decoding
             (picture((8, 8)), "image/png", "image_too_small"),
             (animated.getvalue(), "image/webp", "animated_image"),
             (ok + b"\0" * (10 * 1024 * 1024), "image/png", "image_too_large")]
    def images() -> list[str]:
        return [k for k in cluster.storage.list_keys(cluster.storage.key("videos", "")) if ".input." in k]

    before, images_before = job_keys(cluster), images()
    with api(cluster) as http:
        for data, ctype, code in cases:
            r = http.post("/v1/videos", files={"input_reference": ("x", data, ctype)},
                          data={"prompt": "p", "model": I2V_MODEL})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "input_reference" and (code is None or err["code"] == code), err
        r = http.post("/v1/videos", json={"prompt": "p", "model": I2V_MODEL})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_required", r.text
        r = http.post("/v1/videos", files={"input_reference": ("x.png", ok, "image/png")}, data={"prompt": "p"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_supported", r.text
        assert I2V_MODEL in r.json()["error"]["message"]
    assert job_keys(cluster) == before and images() == images_before
