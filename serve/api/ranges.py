"""HTTP byte ranges (RFC 9110, section 14) for content downloads: one `Range: bytes=...` resolved against a size.

A single range is honoured (`a-b`, `a-`, `-n`); a header this server does not serve (other units, several
ranges, bad syntax) is ignored, as the RFC allows, and the whole object is sent; a range that starts past
the end is a 416 naming the size.
"""

from __future__ import annotations

import re

from serve.errors import ServiceError

_ONE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive `(start, end)` to send of an object of `size` bytes, or None for the whole object."""
    if header is None:
        return None
    m = _ONE_RANGE.fullmatch(header.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # not a single byte range: ignored
    first, last = m.group(1), m.group(2)
    if not first:  # a suffix: the last n bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None  # a syntactically invalid range: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ServiceError:
    return ServiceError(416, f"the requested range is outside the {size} bytes of the object", param="range",
                        code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})
