"""The fps a request asks for (and the model generates) is the fps of the published mp4: request -> resolved params -> SamplingParams ->
`publish_video` -> S3 (local moto) -> read back with PyAV. Every other publishing test uses the 2b/5b default of 8,
so a hard-coded 8 anywhere on that path would pass them."""

from __future__ import annotations

import io
import json
from fractions import Fraction

import numpy as np
import pytest

from serve.api.wire import CreateVideoRequest
from serve.config import ApiConfig, ModelConfig, S3Config
from serve.jobs.params import resolve_request
from serve.jobs.record import new_job_id
from serve.media.publishing import publish_video, video_keys
from serve.stages.types import GenerationRequest
from serve.storage import Storage

FRAMES, HEIGHT, WIDTH = 9, 48, 64


@pytest.fixture
def storage(s3_config: S3Config) -> Storage:
    st = Storage.from_config(s3_config)
    st.ensure_bucket()
    return st


def published(storage: Storage, fps: int) -> tuple[bytes, dict]:
    """Publish a random 9-frame clip for a request asking for `fps`; the mp4 and metadata as stored."""
    req = CreateVideoRequest(prompt="a cat", size=f"{WIDTH}x{HEIGHT}", num_frames=FRAMES, fps=fps)
    # a request's fps is the model's own (its envelope: defaults.fps) or a factor of it (the Enhancer's)
    params = resolve_request(req, ModelConfig(defaults={"fps": fps}), ApiConfig())
    gen = GenerationRequest(job_id=new_job_id(), prompt=req.prompt, negative_prompt=None,
                            params=params.sampling, model="cogvideox-tiny-2b")
    frames = (np.random.default_rng(fps).random((FRAMES, HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    keys = video_keys(storage, gen.job_id)
    publish_video(storage, keys, gen, frames, timings={})
    return storage.get_bytes(keys["video_key"]), json.loads(storage.get_bytes(keys["metadata_key"]))


@pytest.mark.parametrize("fps", [12, 16, 24])
def test_published_mp4_plays_at_the_requested_fps(storage: Storage, fps: int) -> None:
    import av

    mp4, metadata = published(storage, fps)
    with av.open(io.BytesIO(mp4), mode="r") as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(fps, 1)
        assert stream.guessed_rate == Fraction(fps, 1)
        decoded = list(container.decode(stream))
        # one tick of 1/fps per frame: frame i shows at i/fps, the clip lasts FRAMES/fps
        assert len(decoded) == FRAMES
        assert [f.time for f in decoded] == pytest.approx([i / fps for i in range(FRAMES)])
        assert float(stream.duration * stream.time_base) == pytest.approx(FRAMES / fps)
        assert container.duration / av.time_base == pytest.approx(FRAMES / fps, abs=1e-3)
        assert (decoded[0].width, decoded[0].height) == (WIDTH, HEIGHT)
    assert metadata["parameters"]["fps"] == fps and metadata["frames"] == FRAMES


def test_two_fps_give_two_durations(storage: Storage) -> None:
    """The same frames at 12 and 16 fps: different lengths, so the fps cannot have been dropped on the way."""
    import av

    lengths = {}
    for fps in (12, 16):
        with av.open(io.BytesIO(published(storage, fps)[0]), mode="r") as container:
            lengths[fps] = container.duration / av.time_base
    assert lengths[12] == pytest.approx(FRAMES / 12, abs=1e-3)
    assert lengths[16] == pytest.approx(FRAMES / 16, abs=1e-3)
