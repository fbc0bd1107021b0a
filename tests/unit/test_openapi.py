"""The OpenAPI document tells the truth: it validates (openapi-spec-validator), declares the bodies the routes
read themselves (JSON and forms), the bearer scheme on every operation that needs a key, the right error envelope
on every error status, and binary content where the answer is bytes. (tests/integration/test_fuzz.py drives a
schemathesis run from the same document against the local cluster.)"""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from serve.storage import Storage
from tests.unit.test_routes import run, serving

ERROR_STATUSES = {"400", "401", "404", "409", "413", "415", "422", "429", "431", "500", "503"}


def spec_of(storage: Storage) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def main() -> None:
        async with serving(storage) as env:
            r = await env.client.get("/openapi.json")
            assert r.status_code == 200
            out.update(r.json())

    run(main())
    return out


@pytest.fixture
def spec(storage: Storage) -> dict[str, Any]:
    return spec_of(storage)


def operations(spec: dict[str, Any]):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_the_document_validates(spec: dict[str, Any]) -> None:
    validate(spec)  # raises on an invalid OpenAPI 3.1 document
    assert {"/v1/videos", "/v1/videos/sync", "/v1/models", "/api/paas/v4/videos/generations",
            "/api/paas/v4/async-result/{task_id}"} <= set(spec["paths"])


def test_every_operation_needs_the_bearer_key(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    ((name, scheme),) = schemes.items()
    assert scheme == {"type": "http", "scheme": "bearer", "description": scheme["description"]}
    for path, method, op in operations(spec):
        assert op.get("security") == [{name: []}], (method, path)


def test_request_bodies_are_declared_as_json_and_forms(spec: dict[str, Any]) -> None:
    for path in ("/v1/videos", "/v1/videos/sync"):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert set(body["content"]) == {"application/json", "multipart/form-data",
                                        "application/x-www-form-urlencoded"}
        schema = body["content"]["application/json"]["schema"]
        assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
        assert {"prompt", "size", "width", "height", "seconds", "num_frames", "fps"} <= set(schema["properties"])
    zhipu = spec["paths"]["/api/paas/v4/videos/generations"]["post"]["requestBody"]
    assert set(zhipu["content"]) == {"application/json"}
    assert {"model", "prompt", "request_id", "with_audio", "off_peak"} <= set(
        zhipu["content"]["application/json"]["schema"]["properties"])


def test_every_error_status_carries_its_routes_envelope(spec: dict[str, Any]) -> None:
    for path, method, op in operations(spec):
        envelope = "ZhipuErrorEnvelope" if path.startswith("/api/paas/v4/") else "ErrorEnvelope"
        errors = {s for s in op["responses"] if s[0] in "45"}
        assert ERROR_STATUSES <= errors, (method, path, ERROR_STATUSES - errors)
        for status in errors:
            ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{envelope}", (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's 422 body is never sent


def test_content_is_declared_binary(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/v1/videos/{video_id}/content"]["get"]["responses"]
    for status in ("200", "206"):
        content = responses[status]["content"]
        assert set(content) == {"video/mp4", "image/jpeg"}, content
        assert all(c["schema"] == {"type": "string", "format": "binary"} for c in content.values())
    assert "416" in responses and "302" in responses


def test_sync_declares_its_202(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/v1/videos/sync"]["post"]["responses"]
    assert responses["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/Video")
    assert "Location" in responses["202"]["headers"]
