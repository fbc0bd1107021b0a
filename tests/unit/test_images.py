"""serve/media/images.py: every input image is hostile until proven otherwise (issue 12, part 4).

Images are made in memory with Pillow; hostile ones (bombs, truncations, mislabels) are made by cutting or patching
real files. Every refusal is checked for status 400, the `param` passed in, its code and a message naming it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable

import pytest
from PIL import Image, ImageFile, PngImagePlugin

from serve.errors import ServiceError
from serve.media.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    DecodedImage,
    decode_base64,
    decode_image,
    parse_data_url,
)

PARAM = "input_reference"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def refused(code: str, call: Callable[[], object]) -> ServiceError:
    with pytest.raises(ServiceError) as excinfo:
        call()
    e = excinfo.value
    assert (e.status, e.param, e.code) == (400, PARAM, code), e.message
    assert PARAM in e.message
    return e


def decode(data: bytes, **kwargs) -> DecodedImage:
    return decode_image(data, param=PARAM, **kwargs)


def close(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 0) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Incompressible pixels, so a file cut in half really lacks half its image data."""
    return Image.effect_noise(size, 80).convert("RGB")


def png_with_size(width: int, height: int) -> bytes:
    """A real 32x32 PNG whose IHDR (CRC fixed) claims another size: the pixel data for that size is not there, so
    decoding it would fail or exhaust memory; only a check of the header alone refuses it as too large."""
    data = bytearray(encode(Image.new("1", (32, 32)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]


# ---- accepted formats ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kwargs", "tolerance"), [
    ("png", {}, 0), ("jpeg", {"quality": 95}, 4), ("webp", {"lossless": True}, 0), ("webp", {"quality": 90}, 8)])
def test_each_accepted_format_becomes_a_loaded_rgb_picture(fmt, kwargs, tolerance):
    data = encode(Image.new("RGB", (48, 32), (200, 40, 90)), fmt.upper(), **kwargs)
    out = decode(data)
    assert (out.format, out.media_type, out.width, out.height) == (fmt, f"image/{fmt}", 48, 32)
    assert out.image.mode == "RGB" and out.image.size == (48, 32)
    assert not isinstance(out.image, ImageFile.ImageFile)  # decoded in full, holds no file
    assert close(out.image.getpixel((10, 10)), (200, 40, 90), tolerance)
    assert out.sha256 == hashlib.sha256(data).hexdigest() and out.size_bytes == len(data)
    assert out.data == data  # the original bytes are what gets stored


def test_the_stored_bytes_decode_to_the_same_picture_and_never_show_in_the_repr():
    data = encode(noise(), "JPEG")
    first, again = decode(data), decode(decode(data).data)
    assert first.image.tobytes() == again.image.tobytes() and first == again
    assert "data=" not in repr(first) and "image=" not in repr(first) and first.sha256 in repr(first)


def test_a_multi_picture_jpeg_is_a_still_jpeg_of_its_primary_picture():
    # cameras write MPO (primary picture + previews/depth); Image.open would call it animated
    data = encode(two_frames()[0], "MPO", save_all=True, append_images=two_frames()[1:])
    out = decode(data)
    assert out.format == "jpeg" and close(out.image.getpixel((5, 5)), RED, 8)


# ---- refused formats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "named"), [
    (encode(Image.new("RGB", (32, 32)), "GIF"), "GIF"),
    (encode(Image.new("RGB", (32, 32)), "BMP"), "BMP"),
    (encode(Image.new("RGB", (32, 32)), "TIFF"), "TIFF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"/>', "SVG"),
    (b"hello, this is text", "no image format"),
    (bytes(range(256)), "no image format"),
    (b"", "empty"),
    (b"\x89PNG", "no image format"),  # half a signature
])
def test_anything_but_png_jpeg_webp_is_unsupported_and_named(data, named):
    e = refused("unsupported_image", lambda: decode(data))
    assert "PNG, JPEG or WebP" in e.message and named in e.message


def test_the_format_comes_from_the_bytes_and_a_declared_type_must_agree():
    png = encode(Image.new("RGB", (32, 32), RED), "PNG")
    e = refused("image_type_mismatch", lambda: decode(png, declared_type="image/jpeg"))
    assert "image/jpeg" in e.message and "PNG" in e.message
    refused("image_type_mismatch", lambda: decode(png, declared_type="text/plain"))
    for declared in (None, "", "application/octet-stream", "image/png", "IMAGE/PNG; charset=binary"):
        assert decode(png, declared_type=declared).format == "png"
    jpeg = encode(Image.new("RGB", (32, 32), RED), "JPEG")
    assert decode(jpeg, declared_type="image/jpg").format == "jpeg"


# ---- caps ---------------------------------------------------------------------------------------------------------


def test_the_byte_cap_holds_at_the_limit_and_comes_before_any_parsing():
    data = encode(noise(), "PNG")
    assert decode(data, max_bytes=len(data)).size_bytes == len(data)
    e = refused("image_too_large", lambda: decode(data, max_bytes=len(data) - 1))
    assert f"{len(data):,} bytes" in e.message and f"{len(data) - 1:,}" in e.message
    refused("image_too_large", lambda: decode(b"GIF89a" + bytes(MAX_IMAGE_BYTES)))  # not sniffed first


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    bomb = png_with_size(100_000, 100_000)
    filters = list(warnings.filters)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        e = refused("image_too_large", lambda: decode(bomb))
        refused("image_too_large", lambda: decode(png_with_size(10_000, 10_000)))  # Pillow's own warning band
    assert time.perf_counter() - started < 1.0
    assert "10,000,000,000 pixels" in e.message and f"{MAX_IMAGE_PIXELS:,}" in e.message
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == 89_478_485  # no global state touched


def test_the_pixel_cap_holds_at_the_limit():
    data = encode(Image.new("RGB", (40, 25)), "PNG")
    assert decode(data, max_pixels=1000).width == 40
    refused("image_too_large", lambda: decode(data, max_pixels=999))


def test_a_webp_canvas_is_capped_before_libwebp_allocates_it():
    # a VP8X header claiming a 10000x10000 canvas and no frame: only the header check can call it too large
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (9999).to_bytes(3, "little") * 2
    bomb = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    e = refused("image_too_large", lambda: decode(bomb))
    assert "10000x10000" in e.message


def test_a_picture_under_16_px_a_side_is_too_small():
    assert decode(encode(Image.new("RGB", (16, 16)), "PNG")).width == 16
    e = refused("image_too_small", lambda: decode(encode(Image.new("RGB", (15, 300)), "PNG")))
    assert "15x300" in e.message and "16" in e.message


# ---- animation and corruption -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animated_image_is_refused(fmt):
    frames = two_frames()
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    e = refused("animated_image", lambda: decode(data))
    assert "2 frames" in e.message and "still image" in e.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_file_is_invalid(fmt):
    data = encode(noise(), fmt)
    e = refused("invalid_image", lambda: decode(data[: len(data) // 2]))
    assert "truncated or corrupt" in e.message


def test_a_corrupt_header_is_invalid():
    refused("invalid_image", lambda: decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40))
    refused("invalid_image", lambda: decode(b"\xff\xd8\xff" + b"\x00" * 40))
    refused("invalid_image", lambda: decode(b"RIFF\x00\x00\x00\x00WEBPJUNK" + b"\x00" * 40))


def test_running_out_of_memory_is_the_servers_failure_not_a_400(monkeypatch):
    def exhausted(self):
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", exhausted)
    with pytest.raises(MemoryError):
        decode(encode(Image.new("RGB", (32, 32)), "PNG"))


# ---- orientation and colour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0), ("JPEG", 40), ("WEBP", 0)])
def test_exif_orientation_6_turns_the_picture_upright(fmt, tolerance):
    im = Image.new("RGB", (64, 32), BLUE)
    im.paste(RED, (0, 0, 16, 16))  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(encode(im, fmt, exif=exif.tobytes(), **kwargs))
    assert (out.width, out.height) == (32, 64)
    assert close(out.image.getpixel((28, 3)), RED, tolerance)  # top-left went to top-right
    assert close(out.image.getpixel((3, 3)), BLUE, tolerance)
    assert close(out.image.getpixel((3, 60)), BLUE, tolerance)


def test_transparency_is_flattened_onto_white():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black: flattened naively it is black
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 8))
    rgba.paste((255, 0, 0, 128), (8, 0, 16, 8))
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True})):
        out = decode(encode(rgba, fmt, **kwargs)).image
        assert out.getpixel((20, 20)) == WHITE and out.getpixel((2, 2)) == RED
        assert close(out.getpixel((10, 2)), (255, 127, 127), 1)


@pytest.mark.parametrize(("mode", "transparency"), [
    ("LA", None),  # gray + alpha channel
    ("P", 0),  # palette index 0 transparent (tRNS)
    ("P", bytes([0, 255])),  # a palette alpha table (tRNS)
    ("RGB", (0, 0, 0)),  # black transparent (tRNS)
    ("I;16", 0),  # 16-bit gray 0 transparent (tRNS)
], ids=["LA", "P+index", "P+alpha-table", "RGB+tRNS", "I;16+tRNS"])
def test_every_kind_of_png_transparency_is_white(mode, transparency):
    im = Image.new(mode, (32, 32))  # black (palette index 0), alpha 0 where there is a channel
    kwargs = {} if transparency is None else {"transparency": transparency}
    assert decode(encode(im, "PNG", **kwargs)).image.getpixel((5, 5)) == WHITE


def test_a_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close(decode(data).image.getpixel((5, 5)), RED, 4)


@pytest.mark.parametrize(("value", "gray"), [(0, 0), (257, 1), (32768, 128), (65535, 255)])
def test_16_bit_grayscale_is_scaled_not_clipped(value, gray):
    out = decode(encode(Image.new("I;16", (32, 32), value), "PNG")).image
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (gray, gray, gray)


@pytest.mark.parametrize("mode", ["1", "L", "P"])
def test_one_bit_gray_and_palette_become_rgb(mode):
    im = Image.new(mode, (32, 32), 1 if mode != "P" else 0)
    if mode == "P":
        im.putpalette([10, 200, 30] * 256)
    expected = {"1": WHITE, "L": (1, 1, 1), "P": (10, 200, 30)}[mode]
    assert decode(encode(im, "PNG")).image.getpixel((5, 5)) == expected


# ---- data URLs and base64 -----------------------------------------------------------------------------------------


def test_a_data_url_gives_the_bytes_and_its_declared_type():
    png = encode(Image.new("RGB", (32, 32), RED), "PNG")
    b64 = base64.b64encode(png).decode()
    assert parse_data_url(f"data:image/png;base64,{b64}", param=PARAM) == (png, "image/png")
    assert parse_data_url(f"DATA:Image/PNG;name=shot.png;BASE64,{b64}", param=PARAM) == (png, "image/png")
    assert parse_data_url(f"data:;base64,{b64}", param=PARAM) == (png, None)
    data, declared = parse_data_url(f"data:image/jpeg;base64,{b64}", param=PARAM)
    refused("image_type_mismatch", lambda: decode(data, declared_type=declared))


@pytest.mark.parametrize(("url", "code"), [
    ("https://example.com/a.png", "invalid_data_url"),
    ("data:image/png;base64", "invalid_data_url"),  # no comma
    ("data:image/png,%89PNG", "invalid_data_url"),  # percent-encoded, not base64
    ("data:text/plain;base64,aGVsbG8=", "unsupported_image"),
    ("data:text/plain,hello", "unsupported_image"),
    ("data:image/png;base64,iVBORw0KGgo!", "invalid_base64"),
    ("data:image/png;base64,iVBORw0K\nGgo=", "invalid_base64"),  # line breaks (`base64` without -w0)
    ("data:image/png;base64,iVBORw0KGgo", "invalid_base64"),  # no padding
    ("data:image/png;base64,_-__", "invalid_base64"),  # URL-safe alphabet
    ("data:image/png;base64,ïVBORw0KGgo=", "invalid_base64"),  # not ASCII
])
def test_a_bad_data_url_is_refused_by_name(url, code):
    refused(code, lambda: parse_data_url(url, param=PARAM))


def test_the_encoded_length_is_capped_before_decoding():
    limit = 3000
    assert len(decode_base64(base64.b64encode(bytes(limit)).decode(), param=PARAM, max_bytes=limit)) == limit
    over = base64.b64encode(bytes(limit + 1)).decode()
    refused("image_too_large", lambda: parse_data_url(f"data:image/png;base64,{over}", param=PARAM, max_bytes=limit))
    # garbage past the cap is refused for its length: it is never decoded
    e = refused("image_too_large", lambda: decode_base64("!" * (4 * limit // 3 + 1), param=PARAM, max_bytes=limit))
    assert f"{limit:,}-byte" in e.message


# ---- image_fit: stretch (the pipeline's), crop, pad ----------------------------------------------------------------


def test_image_fit_crops_or_pads_to_the_videos_aspect_and_stretch_leaves_it_to_the_pipeline():
    from serve.media.images import fit_image

    # 96x32 (3:1): a red left third, white middle, blue right third; the video is 48x32 (3:2)
    im = Image.new("RGB", (96, 32), WHITE)
    im.paste(RED, (0, 0, 32, 32))
    im.paste(BLUE, (64, 0, 96, 32))
    assert fit_image(im, 48, 32, "stretch") is im  # the stages' preprocess stretches it, as diffusers does
    cropped = fit_image(im, 48, 32, "crop")
    assert cropped.size == (48, 32)
    # centred: 48 of the 96 columns are kept at full height, the outer 24 on each side are cut
    assert close(cropped.getpixel((0, 16)), RED) and close(cropped.getpixel((47, 16)), BLUE)
    assert close(cropped.getpixel((24, 16)), WHITE)
    padded = fit_image(im, 48, 32, "pad")
    assert padded.size == (48, 32)
    # all of it, 48x16, on black bars above and below
    assert padded.getpixel((24, 2)) == (0, 0, 0) and padded.getpixel((24, 29)) == (0, 0, 0)
    assert close(padded.getpixel((2, 16)), RED, 8) and close(padded.getpixel((45, 16)), BLUE, 8)
    with pytest.raises(ValueError, match="image_fit"):
        fit_image(im, 48, 32, "zoom")
