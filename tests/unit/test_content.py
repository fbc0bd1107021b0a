"""Content downloads: streamed from S3 (never read whole into the ingress), byte ranges for seeking players,
and the optional redirect to a presigned URL. Real app, real Storage on the local moto S3, a fake chain."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.api.ranges import byte_range
from serve.errors import ServiceError
from serve.storage import CHUNK_BYTES, Storage
from tests.unit.test_routes import (
    AUTH,
    assert_error,
    create,
    serving,
    video_bytes,
    wait_status,
)


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None),
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=90-", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-500", 100, (0, 99)),  # a suffix longer than the object: all of it
    ("bytes=95-200", 100, (95, 99)),  # an end past the object is cut to it
    ("bytes= 5 - 9", 100, (5, 9)),
    ("bytes=0-1,5-9", 100, None),  # several ranges: not served, the whole object instead (RFC 9110 allows it)
    ("items=0-9", 100, None),
    ("bytes=9-5", 100, None),  # invalid: ignored
    ("bytes=-", 100, None),
])
def test_byte_range_resolves_one_range_against_the_size(header, size, expected):
    assert byte_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_a_range_outside_the_object_is_416_naming_the_size(header):
    with pytest.raises(ServiceError) as err:
        byte_range(header, 100)
    assert err.value.status == 416 and err.value.headers == {"Content-Range": "bytes */100"}


def test_an_object_streams_in_chunks_and_ranges_read_only_their_bytes(storage: Storage) -> None:
    data = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256)  # 2.5 chunks
    storage.put_bytes(storage.key("big.bin"), data, "application/octet-stream")
    chunks = list(storage.open_range(storage.key("big.bin"), 0, len(data) - 1))
    assert len(chunks) == 3 and all(len(c) <= CHUNK_BYTES for c in chunks) and b"".join(chunks) == data
    assert b"".join(storage.open_range(storage.key("big.bin"), 1000, 1099)) == data[1000:1100]


async def _completed(env) -> str:
    vid = (await create(env))["id"]
    await wait_status(env, vid, "completed")
    return vid


def test_content_streams_with_ranges_and_never_reads_the_whole_object(storage: Storage, monkeypatch) -> None:
    def whole(*_a, **_k):
        raise AssertionError("content read the whole object into memory")

    async def main() -> None:
        async with serving(storage) as env:
            vid = await _completed(env)
            data = video_bytes(vid)
            monkeypatch.setattr(Storage, "get_bytes", whole)
            url = f"/v1/videos/{vid}/content"
            r = await env.client.get(url, headers=AUTH)
            assert r.status_code == 200 and r.content == data
            assert r.headers["accept-ranges"] == "bytes" and r.headers["content-length"] == str(len(data))
            r = await env.client.get(url, headers={**AUTH, "Range": "bytes=4-11"})
            assert r.status_code == 206 and r.content == data[4:12]
            assert r.headers["content-range"] == f"bytes 4-11/{len(data)}" and r.headers["content-length"] == "8"
            r = await env.client.get(url, headers={**AUTH, "Range": "bytes=-6"})
            assert r.status_code == 206 and r.content == data[-6:]
            r = await env.client.get(url, headers={**AUTH, "Range": f"bytes={len(data)}-"})
            assert_error(r, 416, "range_not_satisfiable", "range")
            assert r.headers["content-range"] == f"bytes */{len(data)}"
            r = await env.client.get(url, headers={**AUTH, "Range": "bytes=0-1,4-5"})
            assert r.status_code == 200 and r.content == data  # several ranges: the whole video
            # the object gone after the record said it exists: a 404 before any byte, not a cut-off 200
            storage.delete_many([storage.key("videos", f"{vid}.mp4")])
            assert_error(await env.client.get(url, headers=AUTH), 404, "not_found", "video_id")

    asyncio.run(main())


def test_content_redirects_to_a_presigned_url_when_configured(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, content_redirect=True) as env:
            vid = await _completed(env)
            r = await env.client.get(f"/v1/videos/{vid}/content", headers=AUTH)
            assert r.status_code == 302 and r.headers["cache-control"] == "no-store"
            location = r.headers["location"]
            assert "X-Amz-Signature=" in location and f"{vid}.mp4" in location
            got = await asyncio.to_thread(httpx.get, location)
            assert got.status_code == 200 and got.content == video_bytes(vid)

    asyncio.run(main())
