"""Last step of the data flow: uint8 RGB frames (from `serve.stages.decoding`) -> MP4 and JPEG bytes
that the storage layer uploads. Everything stays in memory; nothing touches the disk.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

_AVIO_FLAG_READ = 1  # libavformat's AVIO_FLAG_READ

def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 [F, H, W, 3] but are {frames.dtype} {list(frames.shape)}"
        )
    if frames.shape[0] == 0:
        raise ValueError("frames must hold at least one frame but hold none")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        # yuv420p halves the chroma planes, so H.264 needs even sizes.
        raise ValueError(f"frame height and width must be even for yuv420p but are {height} and {width}")


def encode_mp4(frames_uint8: np.ndarray, fps: int, metadata: dict[str, str] | None = None, crf: int = 18) -> bytes:
    """H.264/yuv420p MP4 with exactly one frame per input frame at exactly `fps`, `moov` atom first
    (`+faststart`) so browsers can start playing before the download finishes."""
    import av

    _check_frames(frames_uint8)
    if fps <= 0:
        raise ValueError(f"fps must be positive but is {fps}")
    height, width = frames_uint8.shape[1:3]
    buf = io.BytesIO()

    def reopen_for_reading(url: str, flags: int, options: dict) -> io.BytesIO:
        # +faststart moves the moov atom to the front after encoding by re-opening the output
        # "file" for reading (FFmpeg's shift_data); with in-memory output there is no file, so
        # hand it a snapshot of what was written. Its reads are of the pre-shift data, which is
        # what it expects. (Verified byte-identical to FFmpeg writing a real file.)
        if flags != _AVIO_FLAG_READ:
            raise ValueError(f"MP4 muxer asked to open {url!r} with flags {flags}; only reading is supported")
        return io.BytesIO(buf.getvalue())

    # use_metadata_tags keeps arbitrary keys (job id, prompt hash...) that plain MP4 would drop.
    movflags = {"movflags": "+faststart+use_metadata_tags"}
    with av.open(buf, mode="w", format="mp4", options=movflags, io_open=reopen_for_reading) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One tick per frame: the container's frame rate is then exactly `fps`, not a rounded float.
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {"crf": str(crf)}
        for index, rgb in enumerate(frames_uint8):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buf.getvalue()


def encode_cover_jpeg(frame_uint8: np.ndarray, quality: int = 90) -> bytes:
    """One uint8 `[H, W, 3]` frame -> JPEG bytes (the video's cover image)."""
    from PIL import Image

    if frame_uint8.ndim != 3 or frame_uint8.shape[-1] != 3 or frame_uint8.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3] but is {frame_uint8.dtype} {list(frame_uint8.shape)}")
    buf = io.BytesIO()
    Image.fromarray(frame_uint8, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def probe_mp4(data: bytes) -> dict:
    """Decode an MP4 and report `frames`, `width`, `height`, `fps` (and container `metadata`)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.base_rate
        return {
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(rate) if rate is not None else None,
            "metadata": dict(container.metadata),
        }
