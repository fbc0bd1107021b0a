"""An image-to-video request's input image, in whichever form the client sent it, made one `DecodedImage`.

The forms (each what an official client sends):

- a multipart file part named `input_reference` (the `openai` SDK's `input_reference=("a.png", data, "image/png")`,
  `videogen generate --image`): `UploadedFile`;
- `input_reference.image_url`: JSON `{"input_reference": {"image_url": "data:image/png;base64,..."}}`, or the
  multipart field `input_reference[image_url]` (how the SDK flattens that object into a form): a base64 data URL,
  or an `https://` URL that is fetched only if the operator enabled `images.remote_fetch` (serve/media/fetch.py:
  the webhooks' SSRF guard, a byte cap, one deadline, no redirects);
- Zhipu's `image_url`: a URL, a data URL or bare base64 (`serve/api/zhipu.py` hands bare base64 on as a data URL
  without a type).

`input_reference.file_id` names a file in OpenAI's Files API; this service keeps no uploaded files, so it is a 400
that says what to send instead. Every refusal is a 400 naming `param`, raised before a job exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serve.api.wire import InputReference, UploadedFile
from serve.config.app import ImagesConfig
from serve.errors import ServiceError
from serve.media.images import DecodedImage, decode_image, parse_data_url

Fetcher = Callable[..., Awaitable[bytes]]


@dataclass(frozen=True)
class AcceptedImage:
    image: DecodedImage
    source: str  # upload, data_url, base64 or url


def _refuse(param: str, code: str, message: str) -> ServiceError:
    return ServiceError(400, message, param=param, code=code)


def has_image(ref: InputReference | None, upload: UploadedFile | None) -> bool:
    """Whether the request names an input image at all (before any of it is read)."""
    return upload is not None or ref is not None


async def accept_image(ref: InputReference | None, upload: UploadedFile | None, cfg: ImagesConfig, *,
                       param: str = "input_reference", fetch: Fetcher | None = None) -> AcceptedImage | None:
    """The request's input image, decoded and checked (serve/media/images.py), or None when it names none.
    Decoding runs in a thread: it is CPU work of up to `cfg.max_pixels` pixels."""
    if upload is not None and ref is not None:
        raise _refuse(param, "invalid_value", f"{param} is given twice (a file and image_url); send one image")
    if upload is not None:
        image = await asyncio.to_thread(decode_image, upload.data, param=param, declared_type=upload.content_type,
                                        max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels)
        return AcceptedImage(image, "upload")
    if ref is None:
        return None
    if ref.file_id is not None:
        raise _refuse(param, "file_id_not_supported",
                      f"{param}.file_id names a file of OpenAI's Files API; this service stores no uploaded files. "
                      f"Send the image itself: a multipart file named {param}, or {param}.image_url as a base64 "
                      f"data URL (data:image/png;base64,...)")
    url = (ref.image_url or "").strip()
    if not url:
        raise _refuse(param, "image_required", f"{param} needs image_url (a data URL or an https:// URL), or send "
                                               f"the image as a multipart file named {param}")
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        data, declared = parse_data_url(url, param=param, max_bytes=cfg.max_bytes)
        source = "base64" if url.startswith("data:;base64,") else "data_url"  # Zhipu's bare base64 (zhipu.py)
    elif scheme in ("https", "http"):
        if len(url) > cfg.max_url_chars:
            raise _refuse(param, "invalid_image_url",
                          f"{param} is a URL of {len(url):,} characters; at most {cfg.max_url_chars:,} are accepted")
        if fetch is None:  # the HTTP client only where a URL is fetched (the job layer imports no web stack)
            from serve.media.fetch import fetch_image as fetch
        data, declared, source = await fetch(url, cfg, param=param), None, "url"
    else:
        raise _refuse(param, "invalid_image_url",
                      f"{param} must be a base64 data URL (data:image/png;base64,...) or an https:// URL, or be sent "
                      f"as a multipart file; got a value starting {url[:24]!r}")
    image = await asyncio.to_thread(decode_image, data, param=param, declared_type=declared,
                                    max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels)
    return AcceptedImage(image, source)
