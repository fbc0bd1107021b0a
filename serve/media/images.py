"""First step of image-to-video, on the ingress before a job exists: an input image's bytes (a JSON data URL, a
multipart file, Zhipu's `image_url`, a remote fetch) become a trusted RGB picture, or a 400 naming what to fix.

Images are hostile until proven otherwise, so the checks run cheapest first and nothing is decoded in full before
the header has passed: the byte cap (before any parsing), the format sniffed from the magic bytes (never a name or
declared type), the declared type if one was given, the pixel cap and minimum size read from the header, no
animation; only then the pixels are decoded, EXIF orientation applied and the picture made 8-bit RGB (alpha
flattened onto white, CMYK converted, 16-bit scaled). The API layer calls `decode_image` (with `parse_data_url` or
`decode_base64` first for text forms) and stores `DecodedImage.data` with its `media_type`: decoding the stored
bytes again gives the same picture on a retry, a reclaim or a restart.

No HTTP, no S3, no Ray: Pillow, numpy and `ServiceError` only.
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from serve.errors import ServiceError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
# 40 MP takes an 8K frame (7680x4320 = 33.2 MP) and every phone camera's default capture (12-24 MP), yet caps what one
# request can make the ingress hold: about 40 MP x (4 B RGBA canvas + 3 B RGB result) = 280 MB at the limit. The models
# see at most 1360x768 (1 MP), so nothing larger helps the video.
MAX_IMAGE_PIXELS = 40_000_000
# Smaller than 16 px on a side is a placeholder or a tracking pixel, not a key frame: refuse it rather than stretch
# a few pixels to 720x480.
MIN_IMAGE_SIDE = 16

ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ACCEPTED = "PNG, JPEG or WebP"
_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}

# Declared types that name a format; `image/jpg` and `image/pjpeg` are what some clients send for JPEG. A type that
# declares nothing (absent, empty, or the octet-stream an SDK sends for raw bytes) is not checked.
_DECLARED_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg",
                     "image/webp": "webp"}
_UNDECLARED = {"", "application/octet-stream"}

# Only to name what was sent instead, so the message says what to convert from.
_REFUSED_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                       (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"))

# What Pillow raises for bytes it cannot parse or decode. MemoryError is deliberately absent: running out of memory
# on an image inside the caps is this server's failure (a 5xx), not the client's.
_PIL_FAILURES = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """An accepted input image. `image` is the picture the models get (mode RGB, loaded, orientation applied);
    `data` are the client's original bytes, the ones to store: `decode_image(data)` gives `image` again, they are
    smaller than any lossless re-encoding, and `sha256` is the hash of what the client sent. Neither appears in the
    repr, so logging a DecodedImage never logs the image."""

    image: Image.Image = field(repr=False, compare=False)
    format: ImageFormat
    width: int
    height: int
    sha256: str
    size_bytes: int
    data: bytes = field(repr=False)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def decode_image(data: bytes, *, param: str, declared_type: str | None = None, max_bytes: int = MAX_IMAGE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = MIN_IMAGE_SIDE) -> DecodedImage:
    """The one place an input image's bytes become a trusted RGB picture. Every refusal is a 400 `ServiceError`
    with `param` and one of the codes `image_too_large`, `unsupported_image`, `image_type_mismatch`,
    `invalid_image`, `image_too_small`, `animated_image`."""
    # 1. The byte cap, before anything parses the bytes
    if len(data) > max_bytes:
        raise _refuse(param, "image_too_large",
                      f"{param} is {len(data):,} bytes; the limit is {max_bytes:,} bytes. Send a smaller or more "
                      f"compressed image")
    # 2. The format, from the bytes alone; then what the client declared must agree with it
    fmt = sniff_format(data, param=param)
    _check_declared(declared_type, fmt, param)
    # 3. The header: size and frame count, before a single pixel is decoded
    im = _open(data, fmt, param, max_pixels)
    try:
        _check_header(im, fmt, param, max_pixels, min_side)
        # 4. The pixels, upright, as 8-bit RGB
        rgb = _to_rgb(_load_upright(im, fmt, param), fmt, param)
    finally:
        im.close()
    return DecodedImage(image=rgb, format=fmt, width=rgb.width, height=rgb.height,
                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), data=bytes(data))


def sniff_format(data: bytes, *, param: str) -> ImageFormat:
    """PNG, JPEG or WebP from the magic bytes; anything else is a 400 `unsupported_image` saying what it is."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise _refuse(param, "unsupported_image",
                  f"{param} must be a {ACCEPTED} image (recognised from its bytes, not its name or declared type), "
                  f"but {_describe(data)}. Convert it to PNG, JPEG or WebP")


def decode_base64(text: str, *, param: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Strict standard base64 (Zhipu's bare `image_url` form, and the payload of a data URL). The encoded length is
    capped before decoding, so an oversized string costs no decoded copy."""
    if len(text) > 4 * -(-max_bytes // 3):  # the longest padded encoding of max_bytes bytes
        raise _refuse(param, "image_too_large",
                      f"{param} holds {len(text):,} base64 characters, more than an image of the {max_bytes:,}-byte "
                      f"limit needs. Send a smaller or more compressed image")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:  # binascii.Error, and non-ASCII text
        raise _refuse(param, "invalid_base64",
                      f"{param} is not valid base64: use the standard alphabet (A-Z, a-z, 0-9, '+', '/') with '=' "
                      f"padding and no spaces, line breaks or URL-safe '-' and '_'") from e


def parse_data_url(url: str, *, param: str, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, str | None]:
    """`data:image/png;base64,...` -> (bytes, declared media type or None when the URL names none). Only base64
    data URLs of an `image/*` type; pass the type on to `decode_image(declared_type=...)`."""
    example = "data:image/png;base64,<base64 bytes>"
    comma = url.find(",", 0, 256)  # a media type and its parameters fit in far less; never scan the payload
    if url[:5].lower() != "data:" or comma < 0:
        raise _refuse(param, "invalid_data_url", f"{param} must be a data URL of the form {example}")
    media_type, *params = (p.strip().lower() for p in url[5:comma].split(";"))
    if media_type and not media_type.startswith("image/"):
        raise _refuse(param, "unsupported_image",
                      f"{param} is a data URL of type {media_type[:64]!r}; it must hold a {ACCEPTED} image "
                      f"({example})")
    if not params or params[-1] != "base64":
        raise _refuse(param, "invalid_data_url",
                      f"{param} must be a base64 data URL ({example}); percent-encoded data URLs are not accepted")
    return decode_base64(url[comma + 1:], param=param, max_bytes=max_bytes), media_type or None


def fit_image(image: Image.Image, width: int, height: int, fit: str) -> Image.Image:
    """The picture as the request's `image_fit` asks, before the stages' own resize: "stretch" leaves it to the
    pipeline's (which stretches it to `width`x`height`); "crop" cuts it to the video's aspect, centred, and "pad"
    puts all of it on black bars of that aspect, each at the video's size."""
    if fit == "stretch":
        return image
    if fit == "crop":
        return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    if fit == "pad":
        return ImageOps.pad(image, (width, height), method=Image.Resampling.LANCZOS, color=(0, 0, 0))
    raise ValueError(f"image_fit must be 'stretch', 'crop' or 'pad', got {fit!r}")


# ---- the steps of decode_image ----------------------------------------------------------------------------------


def _refuse(param: str, code: str, message: str) -> ServiceError:
    return ServiceError(400, message, param=param, code=code)


def _describe(data: bytes) -> str:
    if not data:
        return "it is empty"
    for magic, name in _REFUSED_SIGNATURES:
        if data.startswith(magic):
            return f"it is a {name} image"
    if data[4:8] == b"ftyp":
        return "it is a HEIC/AVIF image"
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        return "it is SVG or other markup"
    return "its bytes are no image format this service knows"


def _check_declared(declared_type: str | None, fmt: ImageFormat, param: str) -> None:
    declared = (declared_type or "").split(";")[0].strip().lower()
    if declared in _UNDECLARED or _DECLARED_FORMATS.get(declared) == fmt:
        return
    raise _refuse(param, "image_type_mismatch",
                  f"{param} is declared as {declared[:64]!r} but its bytes are a {_NAMES[fmt]} image; declare "
                  f"{MEDIA_TYPES[fmt]} or leave the type out")


def _too_many_pixels(param: str, width: int, height: int, max_pixels: int) -> ServiceError:
    return _refuse(param, "image_too_large",
                   f"{param} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels. "
                   f"Downscale it (the video is at most 1360x768) and send it again")


def _invalid(param: str, fmt: ImageFormat) -> ServiceError:
    return _refuse(param, "invalid_image",
                   f"{param} starts like a {_NAMES[fmt]} image but is truncated or corrupt; send the complete file")


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from the first chunk's header (VP8X extended, VP8 lossy or VP8L lossless)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _open(data: bytes, fmt: ImageFormat, param: str, max_pixels: int) -> Image.Image:
    """The format's own Pillow plugin, which reads the header only (PNG and JPEG decode nothing until `load`).

    Not `Image.open`: its decompression-bomb check compares against the process-global `Image.MAX_IMAGE_PIXELS`
    and only warns below twice that, and turning that warning into an error locally needs
    `warnings.catch_warnings`, which swaps the process-wide filter list and is not thread-safe (the ingress decodes
    in a thread pool). Our own cap, checked before `load`, is the only one that counts; no global is read or
    changed. `Image.open` would also make a multi-picture JPEG (MPO: a camera's primary picture plus previews or
    depth maps) an "animated" image; the JPEG plugin reads its primary picture, as any viewer shows it."""
    if fmt == "webp":
        # libwebp's decoder allocates the whole canvas when it is created, inside the plugin's header parse, so the
        # canvas size is read and capped from the bytes first.
        size = _webp_canvas_size(data)
        if size is None:
            raise _invalid(param, fmt)
        if size[0] * size[1] > max_pixels:
            raise _too_many_pixels(param, *size, max_pixels)
    plugin = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile,
              "webp": WebPImagePlugin.WebPImageFile}[fmt]
    try:
        return plugin(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # WebP's own check, above twice Pillow's global limit
        raise _refuse(param, "image_too_large", f"{param} has too many pixels: {e}") from e
    except _PIL_FAILURES as e:
        raise _invalid(param, fmt) from e


def _check_header(im: Image.Image, fmt: ImageFormat, param: str, max_pixels: int, min_side: int) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise _too_many_pixels(param, width, height, max_pixels)
    if min(width, height) < min_side:
        raise _refuse(param, "image_too_small",
                      f"{param} is {width}x{height} pixels; each side must be at least {min_side} pixels")
    if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
        raise _refuse(param, "animated_image",
                      f"{param} is an animated {_NAMES[fmt]} with {getattr(im, 'n_frames', '?')} frames; send a "
                      f"still image (one frame, e.g. the key frame exported as PNG)")


def _load_upright(im: Image.Image, fmt: ImageFormat, param: str) -> Image.Image:
    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except _PIL_FAILURES as e:
        raise _invalid(param, fmt) from e


def _to_rgb(im: Image.Image, fmt: ImageFormat, param: str) -> Image.Image:
    """8-bit RGB whatever the mode: 16-bit and float scaled (Pillow's own conversion clips them to 255), alpha and
    transparent colours flattened onto white (a transparent product shot's background, not black), the rest
    (L, 1, P, CMYK, YCbCr) through Pillow's conversion."""
    try:
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            im = _high_bit_depth_to_8_bit(im)
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _WHITE)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return im.convert("RGB")
    except _PIL_FAILURES as e:
        raise _invalid(param, fmt) from e


def _high_bit_depth_to_8_bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit/float, read as 16-bit range) grayscale picture as L, scaled 65535 -> 255 with rounding;
    a tRNS transparent gray value becomes an alpha channel (mode LA)."""
    values = np.asarray(im)
    if values.dtype.kind == "f":
        scaled = np.rint(np.clip(values, 0, 65535) / 257)
    else:
        scaled = (np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257
    gray = Image.fromarray(scaled.astype(np.uint8))
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):
        gray.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return gray
