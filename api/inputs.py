"""The four forms of `POST /dispatch_model`, read into one request (+ the payload, if bytes).

1. JSON: `input` is any JSON value (the common path: one parse, nothing more).
2. JSON with `data`: a data URI, decoded into a raw payload with its media type.
3. multipart/form-data: form fields are the request fields, every other part is payload,
   forwarded as multipart with the same names, filenames, content types and bytes. Parsed
   streaming (python-multipart): the parts' bytes go straight into one buffer, never a copy of
   the whole request body.
4. Any other Content-Type: the body is the raw payload; the request fields come from the query.

Every form is bounded by MAX_BODY_BYTES as TorchServe will receive it, before anything is stored.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.errors import InvalidRequest, PayloadTooLarge
from shared.models import PredictionRequest
from shared.payloads import DEFAULT_MEDIA_TYPE, Part, Payload, multipart_size

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
# The request fields a form may carry; parts with other names (or with a filename) are payload.
REQUEST_FIELDS = frozenset(PredictionRequest.model_fields) - {"input", "data"}
# Never from a URL: query strings end up in access logs and browser histories.
SECRET_FIELDS = ("token", "password", "username")
MAX_FIELD_BYTES = 64 * 1024
CLOSING_BYTES = multipart_size([])  # the closing boundary line
# type/subtype[; parameters], printable ASCII only: it becomes a header of the TorchServe call.
# `$(?!\n)`: the end of the string, in ECMA regexes (the OpenAPI document's) and Python's alike
# (Python's `$` also matches before a final newline, which must not reach a header).
END = r"$(?!\n)"
_TCHARS = r"[A-Za-z0-9!#$&^_.+\-]+"
MEDIA_TYPE_PATTERN = rf"^{_TCHARS}/{_TCHARS}(\s*;[\x20-\x7e]*)?{END}"
MEDIA_TYPE = re.compile(MEDIA_TYPE_PATTERN)
DATA_URI = re.compile(r"^data:([^,]*?)(;base64)?,", re.IGNORECASE)
# What `decode_data_uri` accepts, as one pattern for the OpenAPI document (api/openapi.py): an
# optional MEDIA_TYPE (no ',': it ends the header), ';base64,', then padded standard base64 as
# binascii's strict mode takes it (which also takes any '=' after a whole quad: "QUJD==").
_DATA_MEDIA = rf"\s*(?:{_TCHARS}/{_TCHARS}(?:\s*;[\x20-\x2b\x2d-\x7e]*)?\s*)?"
_QUAD = "[A-Za-z0-9+/]{4}"
_BASE64 = rf"(?:(?:{_QUAD})*(?:[A-Za-z0-9+/]{{2}}==|[A-Za-z0-9+/]{{3}}=)|(?:{_QUAD})+=*)?"
_DATA = "[dD][aA][tT][aA]:"
DATA_URI_PATTERN = rf"^{_DATA}{_DATA_MEDIA};[bB][aA][sS][eE]64,{_BASE64}{END}"
# A data URI that names no media type: its bytes take `input_media_type`'s (`fallback_type`).
UNTYPED_DATA_URI_PATTERN = rf"^{_DATA}\s*;"


def too_large(size: int, limit: int, what: str = "the payload") -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{what} is {size} bytes as TorchServe would receive it, more than MAX_BODY_BYTES "
        f"({limit}); send less"
    )


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is larger than {limit} bytes (MAX_BODY_BYTES); send less"
    )


def _invalid(error: ValidationError, where: str) -> RequestValidationError:
    """FastAPI's error for the usual 422 message, with locations as FastAPI would give them."""
    errors = []
    for item in error.errors(include_url=False, include_context=False, include_input=False):
        if item["type"] == "model_type":  # not an object: FastAPI's name for it
            item = {**item, "type": "model_attributes_type"}
        errors.append({**item, "loc": (where, *item["loc"])})
    return RequestValidationError(errors)


def _validate(fields: Mapping[str, Any], where: str) -> PredictionRequest:
    try:
        return PredictionRequest.model_validate(fields)
    except ValidationError as error:
        raise _invalid(error, where) from None


def _media_type(value: str, field: str) -> str:
    if not MEDIA_TYPE.match(value):
        raise InvalidRequest(f"{field}: {value[:100]!r} is not a media type such as image/png")
    return value


def fallback_type(request: PredictionRequest) -> str | None:
    """`input_media_type`, the original field, names the type of bytes that carry none."""
    value = request.input_media_type
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("input_media_type: must be a media type string such as image/png")
    return _media_type(value, "input_media_type")


async def read_request(http: Request, max_bytes: int) -> tuple[PredictionRequest, Payload | None]:
    """The request and its payload (None: the JSON `input` path), in whichever form it came."""
    content_type = http.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media == JSON_TYPE:
        return await _read_json(http, max_bytes)
    if media == MULTIPART_TYPE:
        return await _read_multipart(http, content_type, max_bytes)
    return await _read_raw(http, content_type, max_bytes)


# --- 1 and 2: JSON --------------------------------------------------------------------------


async def _read_json(http: Request, max_bytes: int) -> tuple[PredictionRequest, Payload | None]:
    body = await http.body()
    # The body limit lets JSON through up to the size of a data URI of MAX_BODY_BYTES (api/limits
    # .py); a JSON `input` is still bounded by MAX_BODY_BYTES itself.
    if len(body) > max_bytes and b'"data"' not in body:
        raise body_too_large(max_bytes)
    try:
        request = PredictionRequest.model_validate_json(body)
    except ValidationError as error:
        raise _invalid(error, "body") from None
    if request.data is None:
        if len(body) > max_bytes:
            raise body_too_large(max_bytes)
        return request, None
    data, media_type = decode_data_uri(request.data, max_bytes)
    request.data = None  # the decoded bytes are the one copy kept from here on
    content_type = media_type or fallback_type(request) or DEFAULT_MEDIA_TYPE
    return request, Payload(data, [Part(content_type=content_type, size=len(data))], False)


def decode_data_uri(uri: str, max_bytes: int) -> tuple[bytes, str | None]:
    """(bytes, media type or None) of `data:[<media type>][;base64],<data>` (base64 only)."""
    match = DATA_URI.match(uri[:1024])
    if not match or not match.group(2):
        raise InvalidRequest(
            "data: must be a base64 data URI, data:<media type>;base64,<payload> "
            "(e.g. data:image/png;base64,iVBORw0...)"
        )
    encoded = uri[match.end() :]
    # Checked before decoding: a too large payload costs no decode.
    if len(encoded) // 4 * 3 - encoded[-2:].count("=") > max_bytes:
        raise too_large(len(encoded) // 4 * 3, max_bytes, "data")
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "data: the payload after ';base64,' is not valid base64 (standard alphabet, "
            "padded with '=', no spaces or newlines)"
        ) from None
    media_type = match.group(1).strip() or None
    return data, _media_type(media_type, "data") if media_type else None


# --- 3: multipart/form-data -----------------------------------------------------------------


class _FormReader:
    """python-multipart callbacks: fields into small buffers, payload parts into one buffer."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.parts: list[Part] = []
        self.data = bytearray()
        self.ended = False
        self._headers: dict[str, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._field: bytearray | None = None
        self._part: dict[str, Any] = {}
        self._start = 0
        self._overhead = CLOSING_BYTES

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        name = self._header_name.decode("latin-1").strip().lower()
        # Kept as bytes: parse_options_header wants latin-1, and browsers send UTF-8 names.
        self._headers[name] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        if b"name" not in params:
            raise InvalidRequest("every multipart part needs a Content-Disposition with a name")
        name = params[b"name"].decode("utf-8", "replace")
        filename = params[b"filename"].decode("utf-8", "replace") if b"filename" in params else None
        if filename is None and name in REQUEST_FIELDS:
            self._field = bytearray()
            self._part = {"name": name}
            return
        self._field = None
        content_type = self._headers.get("content-type", b"").decode("latin-1") or None
        if content_type is not None:
            _media_type(content_type, f"the Content-Type of part {name!r}")
        self._part = {"name": name, "filename": filename, "content_type": content_type}
        self._start = len(self.data)
        # This part's headers and its closing CRLF in the body TorchServe will receive.
        self._overhead += multipart_size([Part(**self._part, size=0)]) - CLOSING_BYTES

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is not None:
            if len(self._field) + end - start > MAX_FIELD_BYTES:
                raise InvalidRequest(
                    f"{self._part['name']}: a form field of more than {MAX_FIELD_BYTES} bytes"
                )
            self._field.extend(data[start:end])
            return
        self.data += data[start:end]
        # The running size of the body TorchServe would receive: stop reading once it is over.
        if len(self.data) + self._overhead > self.max_bytes:
            size = len(self.data) + self._overhead
            raise too_large(size, self.max_bytes, "the multipart payload")

    def _part_end(self) -> None:
        if self._field is not None:
            self.fields[self._part["name"]] = self._field.decode("utf-8", "replace")
            self._field = None
            return
        self.parts.append(Part(**self._part, size=len(self.data) - self._start))

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(
    http: Request, content_type: str, max_bytes: int
) -> tuple[PredictionRequest, Payload]:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data needs a boundary parameter in its Content-Type")
    reader = _FormReader(max_bytes)
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in http.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise InvalidRequest("the multipart/form-data body is malformed") from None
    if not reader.ended:
        raise InvalidRequest("the multipart/form-data body ended before its closing boundary")
    if not reader.parts:
        raise InvalidRequest(
            "the multipart request has no file part: send the payload as a part named data "
            "(curl -F data=@picture.png)"
        )
    request = _validate(reader.fields, "body")
    fallback = fallback_type(request)
    parts = [
        p.model_copy(update={"content_type": p.content_type or fallback}) for p in reader.parts
    ]
    size = multipart_size(parts)
    if size > max_bytes:
        raise too_large(size, max_bytes, "the multipart payload")
    return request, Payload(reader.data, parts, True)


# --- 4: a raw body, fields in the query string ---------------------------------------------


async def _read_raw(
    http: Request, content_type: str, max_bytes: int
) -> tuple[PredictionRequest, Payload]:
    query = http.query_params
    for name in (*SECRET_FIELDS, "input", "data"):
        if name in query:
            raise InvalidRequest(
                f"{name}: not in the query string of a raw body: "
                + (
                    "URLs are logged; send credentials in a JSON or multipart request"
                    if name in SECRET_FIELDS
                    else "the body itself is the payload"
                )
            )
    fields = {name: query[name] for name in query if name != "wait"}
    if "model_name" not in fields:
        shown = content_type or "none"
        raise InvalidRequest(
            f"model_name: missing. A body of Content-Type {shown[:100]} is sent to the model as "
            "it is, with the request fields in the query string (?model_name=...); or send "
            "JSON (content-type: application/json) or multipart/form-data"
        )
    request = _validate(fields, "query")
    if content_type:
        _media_type(content_type, "Content-Type")
    data = await _read_body(http, max_bytes)
    media_type = content_type or fallback_type(request) or DEFAULT_MEDIA_TYPE
    return request, Payload(data, [Part(content_type=media_type, size=len(data))], False)


async def _read_body(http: Request, max_bytes: int) -> bytearray:
    """The body in one buffer, stopped as soon as it is over the limit."""
    data = bytearray()
    async for chunk in http.stream():
        data += chunk
        if len(data) > max_bytes:
            raise body_too_large(max_bytes)
    return data
