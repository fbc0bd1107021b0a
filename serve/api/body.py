"""Request bodies of `POST /v1/videos`: one decoding and validation path for JSON, multipart and urlencoded forms.

Each body type is split into `(name, value)` pairs by its own parser (the stdlib's `json`, python-multipart's
streaming `MultipartParser`, the stdlib's `parse_qsl`), with every name and text value decoded from UTF-8 the same
way (`_utf8`); `fields` then refuses duplicate names and text that is not clean UTF-8 (lone surrogates, from a
`\\ud800` escape or from bytes that are not UTF-8) or holds control characters other than tab, line feed and
carriage return. Nothing here creates anything: a refused body never reaches the service.

Media types are strict: exactly `application/json` (charset, if given, UTF-8), `multipart/form-data` and
`application/x-www-form-urlencoded`; anything else is a 415, and so is a `Content-Encoding` this server does not
undo (it applies none: a gzip body would otherwise be parsed as if it were plain).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serve.api.wire import UploadedFile
from serve.errors import ServiceError

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
ACCEPTED = (JSON, MULTIPART, URLENCODED)

MAX_JSON_DEPTH = 32  # the request is one flat object; 32 leaves room for a wrong-typed value to be named by the schema
MAX_FIELDS = 64  # CreateVideoRequest has 15
MAX_FIELD_BYTES = 1024 * 1024  # per form field, as Starlette's own form parser
# multipart fields that may be file parts (the input image); each at most MAX_FILE_BYTES here, the images section's
# own (smaller) cap is applied where the image is decoded (serve/media/reference.py), whose 400 names the limit
FILE_FIELDS = ("input_reference",)
MAX_FILE_BYTES = 64 * 1024 * 1024
# object fields a form spells `name[key]` (how the `openai` SDK flattens `input_reference={"image_url": ...}`)
OBJECT_FIELDS = {"input_reference": ("image_url", "file_id")}
_BRACKETED = re.compile(r"^([a-z_]+)\[([a-z_]+)\]$")

# lone surrogates (a JSON "\ud800" escape, or, through surrogateescape, a byte that is not UTF-8) and C0 controls
# but for \t \n \r
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
# what the depth pre-scan drops: JSON strings (escapes included) and runs of anything but brackets and quotes
_NOT_BRACKETS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+', re.DOTALL)
_OPENERS = re.compile(rb"[\[{]{%d}" % (MAX_JSON_DEPTH + 1))


def _refuse(message: str, code: str, param: str | None = None, status: int = 400) -> ServiceError:
    return ServiceError(status, message, param=param, code=code)


def _utf8(data: bytes) -> str:
    """Bytes as text: what is not UTF-8 (an encoded surrogate included) becomes lone surrogates, for `check_text`
    to refuse naming the field it is in."""
    return data.decode("utf-8", "surrogateescape")


def _clean(text: str) -> bool:
    return _BAD_TEXT.search(text) is None


def check_text(text: str, param: str | None) -> None:
    """Refuse text with lone surrogates or control characters (tab, line feed and carriage return are fine)."""
    bad = _BAD_TEXT.search(text)
    if bad is None:
        return
    char, where = bad.group(), bad.start()
    if "\udc80" <= char <= "\udcff":  # surrogateescape's mark of a byte that is not UTF-8, or a "\udcXX" escape
        what = (f"is not valid UTF-8 text at character {where}: the byte 0x{ord(char) - 0xDC00:02x} is not UTF-8 "
                f"(or the lone surrogate {ascii(char)[1:-1]})")
    elif "\ud800" <= char <= "\udfff":
        what = f"is not valid UTF-8 text at character {where}: the lone surrogate {ascii(char)[1:-1]}"
    else:
        what = f"contains the control character U+{ord(char):04X} at character {where}"
    if param is None or not _clean(param):
        raise _refuse(f"a field name {what} (name {param!a})", "invalid_value")
    raise _refuse(f"{param} {what}", "invalid_value", param)


def _check_value(value: Any, param: str, depth: int = 0) -> None:
    if isinstance(value, str):
        check_text(value, param)
        return
    if isinstance(value, (list, dict)) and depth >= MAX_JSON_DEPTH:
        raise _too_deep()
    if isinstance(value, list):
        for item in value:
            _check_value(item, param, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            _check_value(item, param, depth + 1)


def fields(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """The shared last step of every body type: names and text values checked, a name given twice refused."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        check_text(name, None)
        if name in out:
            raise _refuse(f"field {name!r} is given more than once", "invalid_value", name)
        _check_value(value, name)
        out[name] = value
    return out


# ---- media type and encoding ----------------------------------------------------------------------------------


def media_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    """The body's media type (one of ACCEPTED) and its parameters, or a 415."""
    accepted = ", ".join(ACCEPTED)
    # every Content-Encoding header, each possibly a list ("gzip, identity"): all must be identity
    codings = [c.strip().lower() for h in request.headers.getlist("content-encoding") for c in h.split(",")]
    applied = [c for c in codings if c not in ("", "identity")]
    if applied:
        raise ServiceError(415, f"Content-Encoding {', '.join(applied)!r} is not applied by this server: send the "
                                f"body uncompressed (identity)", code="unsupported_media_type",
                           headers={"Accept-Encoding": "identity"})
    headers = request.headers.getlist("content-type")
    if len(headers) != 1:
        why = "missing Content-Type" if not headers else f"{len(headers)} Content-Type headers"
        raise _refuse(f"{why}; send one of {accepted}", "unsupported_media_type", status=415)
    kind, params = parse_options_header(headers[0])
    mtype = kind.decode("latin-1").strip()
    if mtype not in ACCEPTED:
        raise _refuse(f"unsupported content type {mtype!a}; send one of {accepted}", "unsupported_media_type",
                      status=415)
    charset = params.get(b"charset")
    if charset is not None and charset.lower() not in (b"utf-8", b"utf8"):
        raise _refuse(f"unsupported charset {charset.decode('latin-1')!a}; send UTF-8", "unsupported_media_type",
                      status=415)
    return mtype, params


# ---- JSON -----------------------------------------------------------------------------------------------------


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep() -> ServiceError:
    return _refuse(f"body is not accepted JSON: nested more than {MAX_JSON_DEPTH} deep", "invalid_json")


def _surely_too_deep(body: bytes) -> bool:
    """A cheap look before parsing (regular expressions only, no step per byte in Python): more than
    MAX_JSON_DEPTH brackets opened in a row outside strings, whatever is between them, as in `[[[[...` or
    `{"a": [{"b": [...`. Depth built otherwise (`[[][[][[]...`) is bounded while parsing (RecursionError) and
    after it (`_check_value`)."""
    return _OPENERS.search(_NOT_BRACKETS.sub(b"", body)) is not None


def json_pairs(body: bytes) -> list[tuple[str, Any]]:
    if _surely_too_deep(body):
        raise _too_deep()
    try:
        raw = json.loads(_utf8(body or b"null"), object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except _Duplicate as dup:
        param = dup.key if _clean(dup.key) else None
        raise _refuse(f"key {dup.key!a} appears more than once in a JSON object", "invalid_json",
                      param) from None
    except json.JSONDecodeError as exc:
        raise _refuse(f"body is not valid JSON: {exc.msg} at position {exc.pos}", "invalid_json") from None
    except RecursionError:  # deeper than the interpreter's recursion limit: what the pre-scan did not see
        raise _too_deep() from None
    except ValueError as exc:  # NaN / Infinity, an integer too long to convert
        raise _refuse(f"body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(raw, dict):
        raise _refuse("body must be a JSON object with at least a 'prompt'", "invalid_json")
    return list(raw.items())


# ---- forms ----------------------------------------------------------------------------------------------------


def urlencoded_pairs(body: bytes) -> list[tuple[str, str]]:
    # latin-1 both ways maps each byte to one character and back, so the pairs come out as the sent bytes
    # (percent-escapes decoded), decoded like every other body's text
    try:
        raw = parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1",
                        max_num_fields=MAX_FIELDS)
    except ValueError as exc:
        raise _refuse(f"body is not a valid urlencoded form: {exc}", "invalid_form") from None
    return [(_utf8(name.encode("latin-1")), _utf8(value.encode("latin-1"))) for name, value in raw]


class _Multipart:
    """Callbacks for python-multipart's streaming parser: text fields, each at most MAX_FIELD_BYTES, and file
    parts only for FILE_FIELDS (`UploadedFile`, at most MAX_FILE_BYTES)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str | UploadedFile]] = []
        self.ended = False
        self._name = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._field: str | None = None
        self._file: tuple[str | None, str | None] | None = None  # (filename, declared type) of a file part
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers = {}
        self._field = None
        self._file = None
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._name).lower()] = bytes(self._value).strip(b" \t")
        self._name, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise _refuse("a multipart part has no Content-Disposition name", "invalid_multipart")
        name = _utf8(options[b"name"])
        check_text(name, None)
        if len(self.pairs) >= MAX_FIELDS:
            raise _refuse(f"more than {MAX_FIELDS} multipart fields", "invalid_multipart")
        ctype, params = parse_options_header(self._headers.get(b"content-type"))
        if b"filename" in options:
            if name not in FILE_FIELDS:
                raise _refuse(f"field {name!r} is a file upload; only {' and '.join(FILE_FIELDS)} may be a file",
                              "invalid_value", name)
            filename = _utf8(options[b"filename"])
            declared = ctype.decode("latin-1").strip().lower() or None
            self._file = (filename if _clean(filename) else None, declared)
            self._field = name
            return
        charset = params.get(b"charset")
        if charset is not None and charset.lower() not in (b"utf-8", b"utf8"):
            raise _refuse(f"field {name!r} is declared {charset.decode('latin-1')!a}; send UTF-8",
                          "invalid_value", name)
        if self._headers.get(b"content-transfer-encoding", b"8bit").lower() not in (b"7bit", b"8bit", b"binary"):
            raise _refuse(f"field {name!r} has a Content-Transfer-Encoding; send it as plain UTF-8",
                          "invalid_value", name)
        self._field = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            if len(self._data) + (end - start) > MAX_FILE_BYTES:
                raise _refuse(f"file {self._field!r} is longer than {MAX_FILE_BYTES:,} bytes", "image_too_large",
                              self._field)
        elif len(self._data) + (end - start) > MAX_FIELD_BYTES:
            raise _refuse(f"field {self._field!r} is longer than {MAX_FIELD_BYTES} bytes", "invalid_value",
                          self._field)
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._field is None:  # not reached: a part's headers come first, or the parser fails
            raise _refuse("a multipart part ended before its headers", "invalid_multipart")
        if self._file is not None:
            filename, declared = self._file
            self.pairs.append((self._field, UploadedFile(bytes(self._data), declared, filename)))
        else:
            self.pairs.append((self._field, _utf8(bytes(self._data))))

    def _end(self) -> None:
        self.ended = True


async def multipart_pairs(request: Request, params: dict[bytes, bytes]) -> list[tuple[str, str | UploadedFile]]:
    boundary = params.get(b"boundary")
    if not boundary:
        raise _refuse("multipart/form-data without a boundary parameter", "invalid_multipart")
    form = _Multipart()
    try:
        parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            if chunk and parser.write(chunk) != len(chunk):
                raise _refuse("body is not valid multipart/form-data", "invalid_multipart")
        parser.finalize()
    except FormParserError as exc:
        raise _refuse(f"body is not valid multipart/form-data: {exc}", "invalid_multipart") from None
    if not form.ended:
        raise _refuse("body is not valid multipart/form-data: it ends before the closing boundary",
                      "invalid_multipart")
    return form.pairs


def fold_objects(raw: dict[str, Any]) -> dict[str, Any]:
    """A form's `name[key]` fields (OBJECT_FIELDS) as the object `name: {key: value}` that JSON sends; the same name
    also sent whole (a file, or a plain value) is refused as given twice."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        bracketed = _BRACKETED.match(name)
        if bracketed is None or bracketed.group(1) not in OBJECT_FIELDS:
            out[name] = value
            continue
        outer, key = bracketed.groups()
        if key not in OBJECT_FIELDS[outer]:
            raise _refuse(f"unknown field {name!r}; {outer} takes {[f'{outer}[{k}]' for k in OBJECT_FIELDS[outer]]}",
                          "invalid_value", name)
        if outer in raw:
            raise _refuse(f"{outer} is given twice ({outer} and {name}); send one image", "invalid_value", outer)
        out.setdefault(outer, {})[key] = value
    return out


async def read_fields(request: Request) -> dict[str, Any]:
    """The body's fields by name, whatever its media type, each checked the same way; or a 4xx ServiceError. A
    multipart file part (FILE_FIELDS only) comes as an `UploadedFile`."""
    mtype, params = media_type(request)
    if mtype == JSON:
        return fields(json_pairs(await request.body()))
    if mtype == MULTIPART:
        return fold_objects(fields(await multipart_pairs(request, params)))
    return fold_objects(fields(urlencoded_pairs(await request.body())))


def validated(model: type[M], raw: dict[str, Any]) -> M:
    """`raw` (from `read_fields`) as the wire model `model`, or a 400 naming the first field that is wrong.
    Form values are strings: pydantic coerces "7" -> 7 and "true" -> True."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            msg = f"unknown field {param!r}; accepted: {sorted(model.model_fields)}"
        elif first["type"] == "missing":
            msg = f"{param} is required"
        else:
            shown = repr(first.get("input"))  # a wrong-typed value may be megabytes (a data URL): show its start
            msg = f"{param}: {first['msg']} (got {shown if len(shown) <= 200 else shown[:200] + '...'})"
        raise ServiceError(400, msg, param=param, code="invalid_value") from None
