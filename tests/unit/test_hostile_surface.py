"""A corpus of hostile values in every query parameter, path parameter and header the API reads, on every route:
each answer is a 4xx (or a plain 200/404 where the value is merely unknown) in the route's error envelope, never
a 5xx, and nothing is created. (test_hostile_input.py covers bodies; tests/integration/test_fuzz.py fuzzes the
documented surface against the cluster.)"""

from __future__ import annotations

from typing import Any

import httpx

from serve.storage import Storage
from tests.unit.test_hostile_input import assert_no_job
from tests.unit.test_routes import AUTH, run, serving

# percent-encoded as sent on the wire: NUL, a byte that is not UTF-8, an encoded lone surrogate, a right-to-left
# override, path tricks, numbers JSON and Python read loosely, a long value
VALUES = ["%00", "%ff", "%ed%a0%80", "%e2%80%ae", "%2e%2e%2f", "..%2f..%2f", "-1", "1e309", "NaN", "%5B%5D",
          "%7B%7D", "a" * 5000, "video_" + "0" * 28, "%0d%0aSet-Cookie:%20x=1", "%20", ""]
# raw header bytes: what a client can put in a header value (no CR/LF: the server's parser refuses those)
HEADER_VALUES = [b"\xff\xfe", b"\xed\xa0\x80", b"\x00", b"\x7f", b"a" * 4000, b"bytes=9-1", b"bytes=-0",
                 b"bytes=0-1,2-3", b"bytes=a-b", b" ", b"video_" + b"0" * 28, "é".encode("latin-1")]
VIDEO = "video_0190a1b2c3d4aaaaaaaaaaaaaaaa"
GETS = ["/v1/videos", "/v1/models", "/v1/usage", f"/v1/videos/{VIDEO}", f"/v1/videos/{VIDEO}/content",
        f"/api/paas/v4/async-result/{VIDEO}"]
QUERY = {"/v1/videos": ["after", "limit", "order"], "/v1/usage": ["start", "end"],
         f"/v1/videos/{VIDEO}/content": ["variant"]}
PATHS = ["/v1/videos/{v}", "/v1/videos/{v}/content", "/v1/videos/{v}/cancel", "/api/paas/v4/async-result/{v}"]
HEADERS = ["Idempotency-Key", "X-Request-ID", "Range", "Authorization", "Content-Type", "Accept",
           "Content-Encoding", "Transfer-Encoding"]


def check(r: httpx.Response, where: str) -> None:
    assert r.status_code < 500, (where, r.status_code, r.text[:300])
    if r.status_code >= 400:
        body: Any = r.json()
        assert set(body) == {"error"} and body["error"]["message"], (where, body)
        if "/api/paas/v4/" in where:
            assert body["error"]["code"].isdigit(), (where, body)  # Zhipu's envelope
        else:
            assert "type" in body["error"], (where, body)


def test_hostile_query_path_and_header_values_are_4xx_in_the_envelope_and_create_nothing(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            for path, names in QUERY.items():
                for name in names:
                    for value in VALUES:
                        url = f"{path}?{name}={value}"
                        check(await env.client.get(httpx.URL(url), headers=AUTH), url)
            for template in PATHS:
                for value in VALUES:
                    url = template.replace("{v}", value)
                    method = "POST" if url.endswith("/cancel") else "GET"
                    check(await env.client.request(method, httpx.URL(url), headers=AUTH), url)
                    if template == "/v1/videos/{v}":
                        check(await env.client.delete(httpx.URL(url), headers=AUTH), "DELETE " + url)
            for name in HEADERS:
                for raw in HEADER_VALUES:
                    headers = [(b"authorization", f"Bearer {AUTH['Authorization'].split()[1]}".encode())]
                    headers = [h for h in headers if name.lower() != "authorization"] + [(name.lower().encode(), raw)]
                    for path in GETS:
                        check(await env.client.get(path, headers=headers), f"{path} {name}: {raw[:20]!r}")
                    for path in ("/v1/videos", "/v1/videos/sync?wait_s=0.1", "/api/paas/v4/videos/generations"):
                        r = await env.client.post(path, headers=headers, content=b"")
                        check(r, f"POST {path} {name}: {raw[:20]!r}")
            assert_no_job(env)

    run(main())
