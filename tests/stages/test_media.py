"""MP4 and cover JPEG encoding of decoded frames."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve.media.encoding import encode_cover_jpeg, encode_mp4, probe_mp4


def _frames(n: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    return (np.random.default_rng(0).random((n, height, width, 3)) * 255).astype(np.uint8)


def test_mp4_has_exact_frames_size_and_fps():
    data = encode_mp4(_frames(), fps=8, metadata={"job_id": "video_123"})
    info = probe_mp4(data)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (9, 48, 32, 8)
    assert info["metadata"]["job_id"] == "video_123"
    # +faststart: the index (moov) precedes the media data, so playback starts while downloading.
    assert data[4:8] == b"ftyp"
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_mp4_other_fps():
    assert probe_mp4(encode_mp4(_frames(n=5), fps=16))["fps"] == 16


@pytest.mark.parametrize("shape", [(9, 33, 48, 3), (9, 32, 47, 3)])
def test_mp4_rejects_odd_sizes(shape):
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros(shape, dtype=np.uint8), fps=8)


def test_mp4_rejects_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((9, 32, 48, 3), dtype=np.float32), fps=8)


def test_cover_jpeg_decodes():
    frame = _frames(n=1)[0]
    image = Image.open(io.BytesIO(encode_cover_jpeg(frame)))
    assert image.format == "JPEG"
    assert image.size == (48, 32)
    assert image.mode == "RGB"
