"""An input image named by URL, fetched on the ingress before `decode_image` sees its bytes (image-to-video).

Fetching a URL the client chose is a server-side request on the client's behalf, so it is refused unless the
operator enables it (`images.remote_fetch`), and every fetch goes through the webhooks' SSRF guard: the URL is
checked (no loopback, private, link-local or metadata address unless allow-listed), the connection goes to the very
address that was checked (Host header and TLS SNI/certificate name of the original host), so DNS rebinding has no
window, and environment proxies are ignored (a proxy would resolve the name again). Redirects are not followed:
their target was never checked, and the client can send the final URL. The whole fetch has one deadline and the
body one byte cap, enforced while it streams. Every refusal is a 400 `ServiceError` naming `param`; URLs appear in
messages and logs only as `redact_url` gives them (queries of presigned URLs are credentials).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import urljoin

import httpx

from serve.config.app import ImagesConfig
from serve.config.webhooks import WebhookConfig
from serve.errors import ServiceError
from serve.webhooks.urlguard import (
    Resolver,
    _Target,
    _UrlProblem,
    check_url,
    redact_url,
)

log = logging.getLogger(__name__)

USER_AGENT = "videogen-serve-image-fetch/1"


async def fetch_image(url: str, cfg: ImagesConfig, *, param: str, resolver: Resolver = socket.getaddrinfo,
                      transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """The body of `url` (at most `cfg.max_bytes` bytes), fetched from the address the SSRF guard checked.

    Refusals are 400 `ServiceError`s with `param` and code `remote_fetch_disabled`, `invalid_image_url`,
    `image_too_large` or `image_fetch_failed`. The bytes are not inspected: pass them to `decode_image`.
    """
    # 1. Enabled at all?
    if not cfg.remote_fetch:
        raise ServiceError(400, f"{param} is a URL, but this server does not fetch images from URLs "
                                f"(images.remote_fetch is off); send the image itself (a file upload or a base64 "
                                f"data URL)", param=param, code="remote_fetch_disabled")
    shown = redact_url(url)
    try:
        return await asyncio.wait_for(_fetch(url, cfg, param, resolver, transport), cfg.fetch_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _failed(param, shown, f"no complete answer within {cfg.fetch_timeout_s:g} s") from None
    except httpx.InvalidURL:  # what the guard let through but httpx cannot send
        raise ServiceError(400, f"{param} is not a URL this server can fetch: {shown}", param=param,
                           code="invalid_image_url") from None
    except httpx.HTTPError as e:  # connection refused or reset, TLS failure, broken chunking
        raise _failed(param, shown, f"the connection failed ({type(e).__name__})") from None


async def _fetch(url: str, cfg: ImagesConfig, param: str, resolver: Resolver,
                 transport: httpx.AsyncBaseTransport | None) -> bytes:
    # 2. The SSRF guard (blocking DNS, hence a thread)
    try:
        target = await asyncio.to_thread(check_url, url, _guard_config(cfg), resolver, param)
    except _UrlProblem as p:
        raise ServiceError(400, p.message, param=param, code="invalid_image_url") from None
    shown = redact_url(url)
    # 3. One GET to the checked address, the body streamed under the byte cap
    async with _client(cfg, transport) as client, client.stream(
            "GET", target.pinned_url(), headers=_headers(target), extensions=_tls_name(target)) as resp:
        if 300 <= resp.status_code < 400:
            location = resp.headers.get("location")
            to = f" to {redact_url(urljoin(url, location))}" if location else ""
            raise _failed(param, shown, f"it answered a redirect ({resp.status_code}){to}, and redirects are "
                                        f"not followed", hint="send the final URL")
        if not 200 <= resp.status_code < 300:
            raise _failed(param, shown, f"it answered HTTP {resp.status_code}")
        declared = _content_length(resp)
        if declared is not None and declared > cfg.max_bytes:
            raise _too_large(param, shown, f"is {declared:,} bytes (Content-Length)", cfg.max_bytes)
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > cfg.max_bytes:
                raise _too_large(param, shown, "runs past the limit", cfg.max_bytes)
    log.info("fetched %s for %s: %d bytes", shown, param, len(body))
    return bytes(body)


# ---- helpers ------------------------------------------------------------------------------------------------------


def _guard_config(cfg: ImagesConfig) -> WebhookConfig:
    """The guard's settings from the images section (the guard reads allow_hosts, require_https, allowed_ports,
    max_url_chars); any port is accepted, as an image store may listen on any."""
    return WebhookConfig(allow_hosts=cfg.allow_hosts, require_https=not cfg.allow_http,
                         max_url_chars=cfg.max_url_chars)


def _client(cfg: ImagesConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        follow_redirects=False,  # a redirect's target was never checked by the guard
        trust_env=False,  # an environment proxy would resolve the name itself, undoing the pinning
        timeout=httpx.Timeout(cfg.fetch_timeout_s),
        transport=transport,
    )


def _headers(target: _Target) -> dict[str, str]:
    # identity: the byte cap and Content-Length then speak of the same bytes (images are compressed already)
    return {"host": target.host_header, "user-agent": USER_AGENT, "accept": "image/png, image/jpeg, image/webp",
            "accept-encoding": "identity"}


def _tls_name(target: _Target) -> dict[str, str]:
    """TLS: SNI and the certificate check use the name although the connection goes to the pinned address."""
    return {"sni_hostname": target.host} if target.scheme == "https" and not target.is_ip_literal else {}


def _content_length(resp: httpx.Response) -> int | None:
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _failed(param: str, shown: str, why: str,
            hint: str = "check that the URL is publicly reachable, or send the image itself") -> ServiceError:
    return ServiceError(400, f"could not fetch {param} from {shown}: {why}; {hint}", param=param,
                        code="image_fetch_failed")


def _too_large(param: str, shown: str, what: str, limit: int) -> ServiceError:
    return ServiceError(400, f"{param} at {shown} {what}; the limit is {limit:,} bytes. Send a smaller or more "
                             f"compressed image", param=param, code="image_too_large")
