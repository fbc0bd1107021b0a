"""The `videogen` client: `VideogenClient` over the public HTTP API and the `videogen` CLI (httpx only)."""

from videogen_client.api import (
    ClientError,
    JobError,
    ServerUnreachable,
    Video,
    VideogenClient,
    VideoPage,
)

__all__ = ["ClientError", "JobError", "ServerUnreachable", "Video", "VideoPage", "VideogenClient"]
