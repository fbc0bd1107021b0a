"""Image-to-video through the HTTP API (issue 12, parts 3-6), over a real VideoService, JobStore and JobRunner on
the local moto S3; the stage chain is a fake that reads the stored image as the VaeDecoder replica does.

Every form an official client sends (a multipart file, `input_reference[image_url]`, JSON `image_url`, Zhipu's
`image_url`) gives the same stored bytes; every kind of bad image is a 400 naming the field, with nothing written;
the image is stored with the job, deleted with it, priced, and never shows in the API's answers or the logs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from PIL import Image

from serve.api.routes import create_app
from serve.config import AppConfig, JobsConfig
from serve.jobs.record import ChainResult, JobRecord, JobResult
from serve.jobs.service import video_keys
from serve.jobs.store import JobStore
from serve.jobs.wiring import build_ingress
from serve.media.publishing import publish_video
from serve.stages.types import GenerationParams, GenerationRequest, InputImage
from serve.storage import Storage

API_KEY = "sk-unit-image"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
T2V, I2V = "cogvideox-tiny-2b", "cogvideox-tiny-5b-i2v"
SMALL = {"num_frames": 9, "num_inference_steps": 4}


def png(size: tuple[int, int] = (40, 24), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A 32x32 PNG whose header claims another size (a decompression bomb's shape)."""
    data = bytearray(png((32, 32)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def animated_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


class ReadsImage:
    """The fake chain: reads the job's stored image (as the VaeDecoder's encode does) and uploads a video."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.seen: list[bytes | None] = []

    async def run(self, job: JobRecord) -> ChainResult:
        image = job.input_image
        self.seen.append(None if image is None else await asyncio.to_thread(self.storage.get_bytes, image.key))
        keys = video_keys(self.storage, job.id)
        for key in keys.values():
            await asyncio.to_thread(self.storage.put_bytes, key, b"x", "application/octet-stream")
        return ChainResult(JobResult(**keys), {"text_encoder_s": 0.01, "image_encoder_s": 0.01, "denoiser_s": 0.02,
                                               "vae_decoder_s": 0.01})


@dataclass
class Env:
    client: httpx.AsyncClient
    storage: Storage
    store: JobStore
    pipeline: ReadsImage

    def keys(self) -> list[str]:
        return self.storage.list_keys(self.storage.key(""))


def config(storage: Storage, plan: dict[str, Any] | None = None, **sections: Any) -> AppConfig:
    small = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 4, "max_side": 128}
    return AppConfig.model_validate({
        "model": {"name": T2V, "family": "cogvideox-2b", "source": "./models/tiny-2b", "defaults": small},
        "models": [{"name": I2V, "family": "cogvideox-5b-i2v", "source": "./models/tiny-5b-i2v",
                    "defaults": {k: v for k, v in small.items() if k != "max_side"}}],
        "s3": storage.cfg.model_dump(), "api": {"api_keys": [API_KEY]},
        "jobs": JobsConfig(max_attempts=2, lease_s=5, heartbeat_s=0.5, reclaim_interval_s=1,
                           retry_backoff_s=0).model_dump(),
        "keys": {"legacy_plan": "p"},
        "plans": {"plans": {"p": {"max_cost": 10**12, "max_steps": 200, "requests_per_minute": 6000, "burst": 100,
                                  "max_concurrent_jobs": 50, **(plan or {})}}},
        **sections,
    })


@asynccontextmanager
async def serving(storage: Storage, plan: dict[str, Any] | None = None, **sections: Any) -> AsyncIterator[Env]:
    pipeline = ReadsImage(storage)
    graph = build_ingress(config(storage, plan, **sections), storage=storage, pipeline=pipeline, owner="unit")
    transport = httpx.ASGITransport(app=create_app(graph, _ready))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            yield Env(client, storage, graph.store, pipeline)
    finally:
        await graph.runner.stop()


async def _ready() -> dict[str, Any]:
    return {"s3": True}


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None) -> tuple[bytes, str]:
    boundary = f"b-{uuid.uuid4().hex}"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode()
             for n, v in fields.items()]
    for name, (filename, data, ctype) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def post_file(env: Env, data: bytes, ctype: str = "image/png", headers: dict[str, str] | None = None,
                    **fields: Any) -> httpx.Response:
    body, content_type = multipart({"prompt": "the fox runs", "model": I2V, **{k: str(v) for k, v in
                                                                               {**SMALL, **fields}.items()}},
                                   {"input_reference": ("fox.png", data, ctype)})
    return await env.client.post("/v1/videos", content=body,
                                 headers={**AUTH, "Content-Type": content_type, **(headers or {})})


async def post_json(env: Env, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return await env.client.post("/v1/videos", json={"prompt": "the fox runs", "model": I2V, **SMALL, **fields},
                                 headers={**AUTH, **(headers or {})})


def refused(r: httpx.Response, status: int, code: str, param: str = "input_reference") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    return err["message"]


async def finished(env: Env, video_id: str) -> dict[str, Any]:
    for _ in range(400):
        r = await env.client.get(f"/v1/videos/{video_id}", headers=AUTH)
        if r.json()["status"] in ("completed", "failed", "cancelled"):
            return r.json()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{video_id} did not finish")


# ---- every form gives the same stored image -------------------------------------------------------------------


def test_every_form_of_input_reference_stores_the_clients_bytes_with_the_job(storage: Storage) -> None:
    image = png()
    digest = hashlib.sha256(image).hexdigest()

    async def main() -> None:
        async with serving(storage) as env:
            form, ctype = multipart({"prompt": "the fox runs", "model": I2V, "input_reference[image_url]":
                                     data_url(image)})
            answers = [
                await post_file(env, image),  # the openai SDK's input_reference=("fox.png", data, "image/png")
                await post_json(env, input_reference={"image_url": data_url(image)}),
                await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype}),
                await post_json(env, input_reference=data_url(image)),  # a bare string is the image_url
            ]
            for r, source in zip(answers, ("upload", "data_url", "data_url", "data_url"), strict=True):
                assert r.status_code == 200, r.text
                job = env.store.get(r.json()["id"])
                assert job.input_image == InputImage(
                    key=storage.key("videos", f"{job.id}.input.png"), sha256=digest, size_bytes=len(image),
                    media_type="image/png", width=40, height=24, source=source)
                assert job.params.image_input and storage.get_bytes(job.input_image.key) == image
                assert (await finished(env, job.id))["status"] == "completed"
                # the API's answers and the webhooks' payload (the same Video object) never carry the image
                assert "input_image" not in r.json() and digest not in r.text
            assert env.pipeline.seen == [image] * 4  # each attempt reads the very bytes that were accepted

    asyncio.run(main())


def test_the_models_say_which_take_an_image_and_a_mismatch_is_a_400_naming_the_others(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            models = {m["id"]: m["inputs"] for m in (await env.client.get("/v1/models", headers=AUTH)).json()["data"]}
            assert models == {T2V: ["text"], I2V: ["text", "image"]}
            message = refused(await post_json(env), 400, "image_required")
            assert I2V in message and T2V in message  # what needs the image, and the models that do not
            message = refused(await post_file(env, png(), model=T2V), 400, "image_not_supported")
            assert I2V in message
            assert env.keys() == []

    asyncio.run(main())


# ---- forms this service cannot take ---------------------------------------------------------------------------


def test_file_id_and_urls_are_refused_with_what_to_send_instead(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            message = refused(await post_json(env, input_reference={"file_id": "file-abc"}), 400,
                              "file_id_not_supported")
            assert "data URL" in message and "multipart" in message
            form, ctype = multipart({"prompt": "p", "model": I2V, "input_reference[file_id]": "file-abc"})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            refused(r, 400, "file_id_not_supported")
            # a URL is fetched only where the operator turned remote fetching on
            refused(await post_json(env, input_reference={"image_url": "https://images.example/fox.png"}), 400,
                    "remote_fetch_disabled")
            refused(await post_json(env, input_reference={"image_url": "ftp://images.example/fox.png"}), 400,
                    "invalid_image_url")
            refused(await post_json(env, input_reference={}), 400, "image_required")
            # a file and an image_url at once
            form, ctype = multipart({"prompt": "p", "model": I2V, "input_reference[image_url]": data_url(png())},
                                    {"input_reference": ("a.png", png(), "image/png")})
            r = await env.client.post("/v1/videos", content=form, headers={**AUTH, "Content-Type": ctype})
            refused(r, 400, "invalid_value")
            refused(await post_json(env, input_reference={"image_url": "x", "size": 3}), 400, "invalid_value",
                    "input_reference.size")
            assert env.keys() == []

    asyncio.run(main())


def test_a_fetched_url_goes_through_the_guard_and_becomes_the_stored_image(storage: Storage,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    image = png((32, 48))
    fetched: list[str] = []

    async def fake_fetch(url: str, cfg: Any, *, param: str) -> bytes:
        fetched.append(url)
        return image

    import serve.media.fetch

    monkeypatch.setattr(serve.media.fetch, "fetch_image", fake_fetch)

    async def main() -> None:
        async with serving(storage, images={"remote_fetch": True}) as env:
            r = await post_json(env, input_reference={"image_url": "https://images.example/fox.png"})
            assert r.status_code == 200, r.text
            job = env.store.get(r.json()["id"])
            assert job.input_image.source == "url" and storage.get_bytes(job.input_image.key) == image
            assert fetched == ["https://images.example/fox.png"]

    asyncio.run(main())


# ---- hostile images: a 400 naming the problem, and no job -----------------------------------------------------


BAD_IMAGES = [
    ("not an image", b"hello, world", "image/png", "unsupported_image"),
    ("a GIF", b"GIF89a" + b"\x00" * 64, "image/gif", "unsupported_image"),
    ("a PNG declared JPEG", png(), "image/jpeg", "image_type_mismatch"),
    ("a truncated PNG", png((64, 64))[:60], "image/png", "invalid_image"),
    ("a decompression bomb", png_claiming(50_000, 50_000), "image/png", "image_too_large"),
    ("a 12-pixel-wide image", png((12, 40)), "image/png", "image_too_small"),
    ("an animated PNG", animated_png(), "image/png", "animated_image"),
    ("an empty file", b"", "image/png", "unsupported_image"),
]


@pytest.mark.parametrize(("what", "data", "ctype", "code"), BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_every_kind_of_bad_image_is_a_400_and_creates_nothing(storage: Storage, what: str, data: bytes, ctype: str,
                                                               code: str) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            assert "input_reference" in refused(await post_file(env, data, ctype), 400, code)
            # the same bytes as a data URL, in JSON
            refused(await post_json(env, input_reference={"image_url": data_url(data, ctype)}), 400, code)
            assert env.keys() == [] and env.pipeline.seen == []

    asyncio.run(main())


def test_the_byte_cap_is_the_operators_and_bad_text_forms_are_named(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, images={"max_bytes": 2000}) as env:
            big = png((64, 64), (1, 2, 3)) + b"\x00" * 2000
            assert "2,000" in refused(await post_file(env, big), 400, "image_too_large")
            refused(await post_json(env, input_reference={"image_url": data_url(big)}), 400, "image_too_large")
            refused(await post_json(env, input_reference={"image_url": "data:image/png;base64,***"}), 400,
                    "invalid_base64")
            refused(await post_json(env, input_reference={"image_url": "data:image/png,plain"}), 400,
                    "invalid_data_url")
            assert env.keys() == []

    asyncio.run(main())


# ---- plans, price, idempotency, delete ------------------------------------------------------------------------


def test_a_plan_can_leave_image_input_out_before_the_image_is_read(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, plan={"image_input": False}) as env:
            # refused for the plan although the image itself is bad: the image was never read
            message = refused(await post_file(env, b"not an image"), 403, "image_input_not_allowed")
            assert "plan 'p'" in message
            r = await env.client.post("/v1/videos", json={"prompt": "p", "model": T2V, **SMALL}, headers=AUTH)
            assert r.status_code == 200, r.text  # text-to-video stays open to the plan
            assert env.store.get(r.json()["id"]).input_image is None

    asyncio.run(main())


def test_the_cost_ceiling_counts_the_image_encode(storage: Storage) -> None:
    params = GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                              num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1,
                              image_input=True)
    assert params.cost == params.denoise_cost + params.image_encode_cost and params.image_encode_cost > 0
    assert params.model_copy(update={"image_input": False}).cost == params.denoise_cost

    async def main() -> None:
        # a ceiling the denoising alone fits in, the encode not
        async with serving(storage, plan={"max_cost": params.denoise_cost}) as env:
            message = refused(await post_file(env, png()), 400, "cost_ceiling_exceeded", "num_inference_steps")
            assert "VAE encode" in message and "reduce num_inference_steps to 3" in message
            assert env.keys() == []
        async with serving(storage, plan={"max_cost": params.cost}) as env:
            assert (await post_file(env, png())).status_code == 200

    asyncio.run(main())


def test_an_idempotent_retry_is_the_same_image_in_any_form(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            key = {"Idempotency-Key": "retry-1"}
            first = await post_file(env, png(), headers=key)
            again = await post_json(env, headers=key, input_reference={"image_url": data_url(png())})
            assert first.status_code == again.status_code == 200, again.text
            assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
            other = await post_file(env, png(color=(0, 0, 0)), headers=key)  # another image under the same key
            assert other.status_code == 422, other.text
            images = [k for k in env.keys() if ".input." in k]
            assert len(images) == 1

    asyncio.run(main())


def test_delete_removes_the_input_image_with_the_video(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            video_id = (await post_file(env, png())).json()["id"]
            await finished(env, video_id)
            key = env.store.get(video_id).input_image.key
            assert key in env.keys()
            assert (await env.client.delete(f"/v1/videos/{video_id}", headers=AUTH)).status_code == 200
            left = env.keys()
            assert key not in left and [k for k in left if k.startswith(storage.key("videos", ""))] == []

    asyncio.run(main())


# ---- never in logs, and only its hash and size in the metadata --------------------------------------------------


def test_the_image_never_reaches_a_log_line(storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    image = png((64, 64), (9, 99, 199))
    encoded = base64.b64encode(image).decode()

    async def main() -> None:
        async with serving(storage) as env:
            for r in (await post_json(env, input_reference={"image_url": data_url(image)}),
                      await post_json(env, input_reference={"image_url": data_url(image + b"junk")[:-8] + "!"})):
                if r.status_code == 200:
                    await finished(env, r.json()["id"])

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert caplog.records  # the create and the job's run did log
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert encoded[:40] not in logged and encoded[-40:] not in logged


def test_the_metadata_records_the_images_hash_and_size_not_the_image(storage: Storage) -> None:
    import numpy as np

    image = InputImage(key="videos/x.input.png", sha256="ab" * 32, size_bytes=1234, media_type="image/png",
                       width=40, height=24, source="upload")
    params = GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                              num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1,
                              image_input=True)
    req = GenerationRequest(job_id="video_0123456789ab0123456789abcdef", prompt="p", negative_prompt=None,
                            params=params.sampling, model=I2V, image=image)
    keys = video_keys(storage, req.job_id)
    publish_video(storage, keys, req, np.zeros((9, 32, 48, 3), dtype=np.uint8), {})
    meta = json.loads(storage.get_bytes(keys["metadata_key"]))
    assert meta["input_image"] == {"sha256": "ab" * 32, "bytes": 1234, "media_type": "image/png", "width": 40,
                                   "height": 24, "source": "upload"}
    assert "x.input.png" not in json.dumps(meta)


# ---- Zhipu's image_url -------------------------------------------------------------------------------------------


def test_zhipus_image_url_takes_base64_a_data_url_or_a_list_of_one(storage: Storage) -> None:
    image = png()
    path = "/api/paas/v4/videos/generations"

    async def main() -> None:
        async with serving(storage) as env:
            for value in (base64.b64encode(image).decode(), data_url(image), [data_url(image)]):
                r = await env.client.post(path, json={"model": I2V, "prompt": "the fox runs", "image_url": value},
                                          headers=AUTH)
                assert r.status_code == 200, r.text
                stored = env.store.get(r.json()["id"]).input_image
                assert stored.sha256 == hashlib.sha256(image).hexdigest()
                assert stored.source == ("data_url" if "data:" in str(value) else "base64")
            r = await env.client.post(path, json={"model": I2V, "prompt": "p", "image_url": [data_url(image)] * 2},
                                      headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["param"] == "image_url", r.text
            r = await env.client.post(path, json={"model": I2V, "prompt": "p", "image_url": "bm90IGFuIGltYWdl"},
                                      headers=AUTH)  # base64 of text: Zhipu's envelope, naming image_url
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "image_url" and "image_url" in err["message"], r.text
            assert err["videogen_code"] == "unsupported_image"

    asyncio.run(main())


def test_image_fit_is_kept_with_the_job_and_only_for_an_image(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await post_file(env, png(), image_fit="crop")
            assert r.status_code == 200, r.text
            assert r.json()["image_fit"] == "crop"
            job = env.store.get(r.json()["id"])
            assert job.params.image_fit == "crop" and job.params.sampling.image_fit == "crop"
            assert (await post_file(env, png())).json()["image_fit"] == "stretch"  # the pipeline's, by default
            refused(await post_file(env, png(), image_fit="zoom"), 400, "invalid_value", "image_fit")
            r = await env.client.post("/v1/videos", json={"prompt": "p", "model": T2V, "image_fit": "pad"},
                                      headers=AUTH)
            refused(r, 400, "invalid_value", "image_fit")
            r = await env.client.post("/v1/videos", json={"prompt": "p", "model": T2V}, headers=AUTH)
            assert r.json()["image_fit"] is None  # a text-to-video job has no image to fit

    asyncio.run(main())
