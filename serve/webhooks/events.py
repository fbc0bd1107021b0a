"""What a job's end tells its tenant: the `video.*` event, and the interface the job layer sends it through.

The job layer (serve/jobs/hooks.py) and admission depend only on this module; `WebhookSender`
(serve/webhooks/sender.py, with the HTTP client) implements `Notifier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

EventType = Literal["video.completed", "video.failed", "video.cancelled"]
EVENT_FOR_STATUS: dict[str, EventType] = {
    "completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}


@dataclass(frozen=True)
class WebhookEvent:
    type: EventType
    job_id: str
    tenant: str
    url: str
    data: Mapping[str, Any]  # the video object, as GET /v1/videos/{id} returns it
    occurred_at: float  # unix seconds of the terminal transition
    request_id: str | None = None  # the job's create request id (JobRecord.request_id): sent as X-Request-ID

    @classmethod
    def for_status(cls, status: str, *, job_id: str, tenant: str, url: str, data: Mapping[str, Any],
                   occurred_at: float, request_id: str | None = None) -> WebhookEvent:
        if status not in EVENT_FOR_STATUS:
            raise ValueError(f"webhooks are sent for {sorted(EVENT_FOR_STATUS)} jobs, got status {status!r}")
        return cls(EVENT_FOR_STATUS[status], job_id, tenant, url, data, occurred_at, request_id)

    @property
    def msg_id(self) -> str:
        """Stable per (job, event type): every attempt carries it, so receivers can deduplicate."""
        return f"msg_{self.job_id}_{self.type.removeprefix('video.')}"


class Notifier(Protocol):
    """Where the job layer hands events (`WebhookSender`; None when webhooks are off)."""

    def url_for(self, tenant: str, job_url: str | None) -> str | None: ...

    async def validate_registration(self, url: str, tenant: str) -> None: ...

    def schedule(self, event: WebhookEvent, on_done=None) -> bool: ...

    def claim_s(self) -> float: ...
