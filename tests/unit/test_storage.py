"""Storage against a local moto S3: plain and multipart objects, conditional writes, listing, presigned URLs."""

from __future__ import annotations

import os
import time
import urllib.request
from urllib.parse import parse_qs, urlparse

import pytest

from serve.config import S3Config
from serve.storage import NotFound, PreconditionFailed, Storage, StorageError

MiB = 1024 * 1024


@pytest.fixture
def storage(s3_config: S3Config) -> Storage:
    st = Storage.from_config(s3_config)
    st.ensure_bucket()
    return st


def test_key_applies_prefix() -> None:
    st = Storage(S3Config(bucket="prefix-test", prefix="/prod/"), client=object())
    assert st.key("jobs", "a.json") == "prod/jobs/a.json"
    assert st.key("index", "default", "") == "prod/index/default/"
    assert st.key("active/") == "prod/active/"
    assert Storage(S3Config(bucket="prefix-test"), client=object()).key("jobs", "a.json") == "jobs/a.json"


def test_ensure_bucket_is_idempotent_and_check_passes(storage: Storage) -> None:
    storage.ensure_bucket()
    storage.check()


def test_check_reports_missing_bucket_and_unreachable_endpoint(s3_config: S3Config) -> None:
    missing = Storage.from_config(s3_config.model_copy(update={"bucket": "no-such-bucket-here"}))
    with pytest.raises(StorageError, match="does not exist"):
        missing.check()
    # Port 1 on loopback refuses at once; check() makes a single attempt.
    down = Storage.from_config(s3_config.model_copy(update={"endpoint_url": "http://127.0.0.1:1"}))
    with pytest.raises(StorageError, match="unreachable"):
        down.check()


def test_put_get_head_delete(storage: Storage) -> None:
    key = storage.key("videos", "t", "a.bin")
    storage.put_bytes(key, b"hello", "application/octet-stream", metadata={"job": "video_1"})
    assert storage.get_bytes(key) == b"hello"
    info = storage.head(key)
    assert (info.size, info.content_type, info.metadata) == (5, "application/octet-stream", {"job": "video_1"})
    assert storage.exists(key)

    storage.put_json(storage.key("x.json"), {"a": [1, "é"]})
    assert storage.get_json(storage.key("x.json")) == {"a": [1, "é"]}

    storage.delete(key)
    storage.delete(key)  # idempotent
    assert not storage.exists(key)
    with pytest.raises(NotFound):
        storage.get_bytes(key)
    with pytest.raises(NotFound):
        storage.head(key)


def test_multipart_upload_round_trips(s3_config: S3Config) -> None:
    cfg = s3_config.model_copy(update={"multipart_threshold_bytes": 5 * MiB})  # S3's minimum part size
    st = Storage.from_config(cfg)
    st.ensure_bucket()
    data = os.urandom(11 * MiB)  # 3 parts: 5 + 5 + 1 MiB
    key = st.key("videos", "big.mp4")
    st.put_bytes(key, data, "video/mp4")
    assert st.get_bytes(key) == data
    info = st.head(key)
    assert info.size == len(data) and info.content_type == "video/mp4"
    assert info.etag.strip('"').endswith("-3"), info.etag  # a multipart ETag names its part count


def test_conditional_writes(storage: Storage) -> None:
    key = storage.key("jobs", "c.json")
    assert storage.get_with_etag(key) is None
    etag1 = storage.put_if_absent(key, b"v1")
    with pytest.raises(PreconditionFailed):
        storage.put_if_absent(key, b"other")
    data, etag = storage.get_with_etag(key)
    assert (data, etag) == (b"v1", etag1)

    etag2 = storage.put_if_match(key, b"v2", etag1)
    assert etag2 != etag1
    with pytest.raises(PreconditionFailed):
        storage.put_if_match(key, b"v3", etag1)  # stale etag
    assert storage.get_bytes(key) == b"v2"

    with pytest.raises(NotFound):
        storage.put_if_match(storage.key("jobs", "gone.json"), b"x", etag2)


def test_list_keys_pages_and_start_after(s3_config: S3Config) -> None:
    st = Storage(s3_config, list_page_size=2)  # force several ListObjectsV2 pages
    st.ensure_bucket()
    keys = [st.key("index", f"{i:03d}") for i in range(7)]
    for k in keys:
        st.put_bytes(k, b"", "application/octet-stream")
    st.put_bytes(st.key("other", "x"), b"", "application/octet-stream")

    prefix = st.key("index", "")
    assert st.list_keys(prefix) == keys
    assert st.list_keys(prefix, max_keys=5) == keys[:5]
    assert st.list_keys(prefix, start_after=keys[4]) == keys[5:]
    assert st.list_keys(st.key("nothing", "")) == []


def test_delete_many(storage: Storage) -> None:
    keys = [storage.key("d", str(i)) for i in range(3)]
    for k in keys:
        storage.put_bytes(k, b"x", "text/plain")
    storage.delete_many([keys[0], keys[1], storage.key("d", "missing")])
    assert storage.list_keys(storage.key("d", "")) == [keys[2]]
    storage.delete_many([])


def test_presigned_url_is_sigv4_and_fetchable(storage: Storage) -> None:
    key = storage.key("videos", "t", "v.mp4")
    storage.put_bytes(key, b"fake mp4 bytes", "video/mp4")
    url = storage.presign_get(key, expires_s=60, filename="clip é.mp4", content_type="video/mp4")
    q = parse_qs(urlparse(url).query)
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert q["X-Amz-Expires"] == ["60"]
    assert "attachment" in q["response-content-disposition"][0]
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"fake mp4 bytes"
        assert resp.headers["Content-Type"] == "video/mp4"
    # Default lifetime comes from the config.
    default = parse_qs(urlparse(storage.presign_get(key)).query)
    assert default["X-Amz-Expires"] == [str(storage.cfg.presign_expires_s)]


def test_presigned_urls_are_minted_per_call(storage: Storage) -> None:
    key = storage.key("v.mp4")
    storage.put_bytes(key, b"x", "video/mp4")
    first = storage.presign_get(key)
    time.sleep(1.05 - time.time() % 1)  # X-Amz-Date has 1 s resolution
    second = storage.presign_get(key)
    assert first != second
    d1 = parse_qs(urlparse(first).query)["X-Amz-Date"][0]
    d2 = parse_qs(urlparse(second).query)["X-Amz-Date"][0]
    assert d2 > d1


def test_presigned_url_on_aws_uses_the_regional_host(s3_server: str) -> None:
    # No request is made; s3_server only guarantees credentials to sign with.
    st = Storage.from_config(S3Config(bucket="videos-eu", region="eu-west-1"))
    url = st.presign_get(st.key("a.mp4"))
    assert url.startswith("https://videos-eu.s3.eu-west-1.amazonaws.com/a.mp4?"), url
