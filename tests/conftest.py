"""Shared fixtures: one local S3 (moto on 127.0.0.1) per test session, a fresh bucket per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from serve.config import S3Config
from serve.local_s3 import LocalS3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server; also sets dummy AWS credentials in os.environ if none are set."""
    with LocalS3Server(port=0) as server:
        yield server.endpoint_url


@pytest.fixture
def s3_config(s3_server: str, request: pytest.FixtureRequest) -> S3Config:
    """An S3Config for a bucket of this test's own (valid S3 name, created by `Storage.ensure_bucket`)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    bucket = f"t-{slug}-{uuid.uuid4().hex[:8]}"
    return S3Config(bucket=bucket, endpoint_url=s3_server, create_bucket=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tier runs last: its Ray cluster (session-scoped) then lives only while its tests run, instead
    of idling beside every later unit and stage test on the two cores (a stable sort keeps every other order)."""
    items.sort(key=lambda item: "integration" in item.path.parts)
