"""Unit-test fixtures: one S3 client per session on top of the shared moto server (each test keeps its own bucket)."""

from __future__ import annotations

from typing import Any

import pytest

from serve.config import S3Config
from serve.storage import Storage


@pytest.fixture(scope="session")
def s3_client(s3_server: str) -> Any:
    """Building a boto3 client costs ~0.1 s of CPU; tests that only need a fresh bucket share this one."""
    return Storage.from_config(S3Config(endpoint_url=s3_server)).client


@pytest.fixture
def storage(s3_config: S3Config, s3_client: Any) -> Storage:
    """A Storage on this test's own bucket (created), through the shared client."""
    st = Storage(s3_config, client=s3_client)
    st.ensure_bucket()
    return st
