"""The domain's one error: what went wrong, in terms a caller can act on. The bottom of `serve/`.

Everything below the HTTP layer (admission, jobs, tenancy, billing, webhooks) raises `ServiceError`;
`serve/api/errors.py` only maps it to the JSON envelope. It imports nothing of the project and no web
framework, and it pickles with plain arguments, so it crosses Ray actors (the shared limiter) intact.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal or failure with the HTTP status it maps to, a machine-readable `code`, the request field
    it concerns (`param`) and response headers (e.g. `Retry-After`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, param, code, headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def __str__(self) -> str:
        return self.message
