"""The payload pieces without servers: data URIs, the multipart encoding, answers, body limits."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from python_multipart.multipart import MultipartParser, parse_options_header

from api.inputs import _FormReader, decode_data_uri
from api.limits import ENVELOPE_BYTES, body_limit
from api.routes.tasks import raw_answer
from shared.errors import InvalidRequest, PayloadTooLarge
from shared.models import PredictionCall
from shared.payloads import Part, Payload, PayloadRef, encode_multipart, multipart_size
from shared.priorities import Priority
from shared.settings import Settings
from tests.support.upstream_fakes import Canned, FakeUpstream
from worker.backends import Caller
from worker.backends.base import parse_answer

ORIGIN = "http://127.0.0.1:8080"


def parse_multipart(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """Each part's headers and bytes, as a receiving server's parser sees them."""
    _, params = parse_options_header(content_type)
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def header_end() -> None:
        parts[-1]["headers"][header["field"].decode().lower()] = header["value"].decode()
        header["field"], header["value"] = bytearray(), bytearray()

    parser = MultipartParser(
        params[b"boundary"],
        {  # type: ignore[arg-type]
            "on_part_begin": lambda: parts.append({"headers": {}, "data": bytearray()}),
            "on_header_field": lambda d, s, e: header["field"].extend(d[s:e]),
            "on_header_value": lambda d, s, e: header["value"].extend(d[s:e]),
            "on_header_end": header_end,
            "on_part_data": lambda d, s, e: parts[-1]["data"].extend(d[s:e]),
        },
    )
    parser.write(body)
    parser.finalize()
    return parts


def test_multipart_keeps_names_filenames_content_types_and_bytes() -> None:
    parts = (
        Part(name="data", filename="a.png", content_type="image/png", size=3),
        Part(name="data", filename='sp "q" ü.bin', content_type=None, size=0),
        Part(name="mask", filename=None, content_type="application/octet-stream", size=4),
    )
    body, content_type = encode_multipart(parts, b"\x89PN" + b"\r\n--")
    assert len(body) == multipart_size(parts)
    seen = parse_multipart(body, content_type)
    assert [p["data"] for p in seen] == [b"\x89PN", b"", b"\r\n--"]
    assert seen[0]["headers"]["content-disposition"] == 'form-data; name="data"; filename="a.png"'
    assert seen[0]["headers"]["content-type"] == "image/png"
    assert "content-type" not in seen[1]["headers"]  # none came in, none goes out
    assert 'filename="sp %22q%22 ü.bin"' in seen[1]["headers"]["content-disposition"]
    assert "filename" not in seen[2]["headers"]["content-disposition"]


def test_small_payloads_ride_inline_big_ones_by_reference() -> None:
    small = Payload(b"x" * 10, [Part(size=10)], False)
    ref, stored = small.reference("t1")
    assert stored is None
    assert ref.inline is not None
    assert base64.b64decode(ref.inline) == b"x" * 10
    big = Payload(bytearray(70_000), [Part(size=70_000)], False)
    ref, stored = big.reference("t2")
    assert (ref.inline, ref.key, stored) == (None, "dispatch:payload:t2", big.data)
    assert "70000 bytes" in repr(ref)
    assert "\\x00" not in repr(ref)


@pytest.mark.parametrize(
    ("uri", "data", "media"),
    [
        ("data:image/png;base64,AAEC", b"\x00\x01\x02", "image/png"),
        ("data:;base64,AAEC", b"\x00\x01\x02", None),
        ("DATA:text/plain;charset=utf-8;BASE64,aMOk", "hä".encode(), "text/plain;charset=utf-8"),
        ("data:application/octet-stream;base64,", b"", "application/octet-stream"),
    ],
)
def test_data_uris(uri: str, data: bytes, media: str | None) -> None:
    assert decode_data_uri(uri, 100) == (data, media)


@pytest.mark.parametrize(
    "uri", ["data:image/png,AAEC", "data:image/png;base64,AAE", "image/png;base64,AAEC", "data:"]
)
def test_bad_data_uris_name_the_field(uri: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_data_uri(uri, 100)
    assert caught.value.msg.startswith("data:")


def test_data_uri_over_the_limit_is_refused_before_decoding() -> None:
    uri = "data:x/y;base64," + base64.b64encode(b"\x00" * 101).decode()
    with pytest.raises(PayloadTooLarge):
        decode_data_uri(uri, 100)
    assert decode_data_uri(uri, 101)[0] == b"\x00" * 101


@pytest.mark.parametrize(
    ("content", "content_type", "value", "stored_type"),
    [
        (b'{"a": 1}', None, {"a": 1}, None),
        (b'{"a": 1}', "application/json", {"a": 1}, None),
        (b"plain words", None, "plain words", "text/plain; charset=utf-8"),
        ("grüße".encode(), "text/csv", "grüße", "text/csv"),
        (
            "grüße".encode("latin-1"),
            "text/plain; charset=latin-1",
            "grüße",
            "text/plain; charset=latin-1",
        ),
        (b"\x89PNG\xff", "image/png", "data:image/png;base64,iVBOR/8=", "image/png"),
        (
            b"\xff\xfe",
            None,
            "data:application/octet-stream;base64,//4=",
            "application/octet-stream",
        ),
        (b"\xff\xfe", "text/plain", "data:text/plain;base64,//4=", "text/plain"),
    ],
)
def test_answers_keep_their_content_type(
    content: bytes, content_type: str | None, value: Any, stored_type: str | None
) -> None:
    answer = parse_answer(content, content_type)
    assert answer.value == value
    assert answer.content_type == stored_type
    # /tasks/{id}/result gives back exactly what TorchServe sent (JSON re-serialized).
    raw = raw_answer(answer.value, answer.content_type)
    if answer.content_type is None:
        assert raw.media_type == "application/json"
    else:
        assert raw.body == content
        assert raw.headers["content-type"] == answer.content_type


def test_body_limits_leave_room_for_data_uris_and_form_fields() -> None:
    assert body_limit(b"application/octet-stream", 3000) == 3000
    assert body_limit(b"Application/JSON; charset=utf-8", 3000) == 4000 + ENVELOPE_BYTES
    assert body_limit(b"multipart/form-data; boundary=x", 3000) == 3000 + ENVELOPE_BYTES
    assert body_limit(b"", 3000) == 3000


def _call(ref: PayloadRef) -> PredictionCall:
    return PredictionCall(
        origin=ORIGIN,
        model_name="m",
        model_version=None,
        body=None,
        payload=ref,
        deadline=time.time() + 30,
        submitted_at=time.time(),
        priority=Priority.default,
    )


def test_client_sends_raw_and_multipart_payloads_and_keeps_binary_answers() -> None:
    upstream = FakeUpstream(lambda _: Canned(200, b"\x00\xff", {"content-type": "audio/wav"}))
    seen = upstream.sent
    settings = Settings(_env_file=None, torchserve_url=ORIGIN)  # type: ignore[call-arg]
    client = Caller(settings, upstream)
    raw = PayloadRef(parts=(Part(content_type="image/png", size=3),), multipart=False)
    answer = asyncio.run(client.predict_answer(_call(raw), b"abc"))
    assert (seen[0].body, seen[0].headers["content-type"]) == (b"abc", "image/png")
    assert answer.value == "data:audio/wav;base64,AP8="
    assert answer.content_type == "audio/wav"

    parts = (Part(name="data", filename="f", content_type="x/y", size=2), Part(name="b", size=1))
    asyncio.run(client.predict_answer(_call(PayloadRef(parts=parts, multipart=True)), b"abc"))
    received = parse_multipart(seen[1].body, seen[1].headers["content-type"])
    assert [(p["data"], p["headers"].get("content-type")) for p in received] == [
        (b"ab", "x/y"),
        (b"c", None),
    ]


def test_form_reader_takes_utf8_part_names_and_filenames() -> None:
    """Found by the fuzz test: a part name outside latin-1 was a 500."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="\xf3\xbe\x80\x99x"\r\n\r\n{}\r\n'
        b'--b\r\nContent-Disposition: form-data; name="d\xc3\xa4ta"; filename="\xc3\xbc.png"\r\n'
        b"Content-Type: image/png\r\n\r\nabc\r\n--b--\r\n"
    )
    reader = _FormReader(10_000)
    parser = MultipartParser(b"b", reader.callbacks())  # type: ignore[arg-type]
    parser.write(body)
    parser.finalize()
    assert reader.ended
    assert [(p.name, p.filename, p.content_type, p.size) for p in reader.parts] == [
        ("\U000fe019x", None, None, 2),
        ("däta", "ü.png", "image/png", 3),
    ]
    assert bytes(reader.data) == b"{}abc"
