"""dispatcher_client's SSE parser (`_sse.py`) against the WHATWG event stream rules: any split of
the bytes, CRLF/CR/LF, multi-line data, ids, comments, BOM, and its bounds."""

from __future__ import annotations

import pytest
from dispatcher_client._sse import SSEEvent, SSEParser, SSETooLarge

STREAM = (
    "\ufeff: hello\r\n"
    'event: output\r\nid: 1-0\r\ndata: {"a":\r\ndata:  1}\r\n\r\n'  # CRLF, two data lines
    "data: é€😀\rid: 2-0\r\r"  # CR only; multi-byte UTF-8
    "retry: 1500\nevent: restart\ndata\n\n"  # LF only; `data` without a colon: empty value
    "id: bad\0id\nevent: done\ndata: end\n\n"  # an id with NUL is ignored: 2-0 stays
    "data: cut"  # no closing empty line: never dispatched
).encode()
EXPECTED = [
    SSEEvent('{"a":\n 1}', "output", "1-0"),
    SSEEvent("é€😀", "message", "2-0"),
    SSEEvent("", "restart", "2-0", 1500),
    SSEEvent("end", "done", "2-0"),
]


def parse(*chunks: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    parser.close()
    return events


def test_the_whole_stream_in_one_read() -> None:
    assert parse(STREAM) == EXPECTED


def test_every_split_point_gives_the_same_events() -> None:
    # Including a split between CR and LF (one line end, not two) and inside a UTF-8 character.
    for cut in range(len(STREAM) + 1):
        assert parse(STREAM[:cut], STREAM[cut:]) == EXPECTED, cut


def test_byte_by_byte() -> None:
    assert parse(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


def test_an_event_is_dispatched_as_soon_as_its_empty_line_ends() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEEvent("a")]  # a CR ends the line at once
    assert parser.feed(b"\n") == []  # ...and an LF after a CR is not another (empty) line


def test_comments_and_blocks_without_data_dispatch_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b": keep-alive\n\n:\n\nevent: output\nid: 7-0\n\n") == []
    assert parser.last_event_id == "7-0"  # an id without data still moves the last id
    assert parser.feed(b"data: x\n\n") == [SSEEvent("x", "message", "7-0")]


def test_only_one_space_after_the_colon_is_dropped_and_unknown_fields_are_ignored() -> None:
    assert parse(b"data:x\ndata:  y\nfoo: bar\nretry: 1s\n\n") == [SSEEvent("x\n y")]


def test_a_bom_is_dropped_only_at_the_start() -> None:
    bom = "\ufeff".encode()
    assert parse(bom + b"data: a\n\n" + bom + b"data: b\n\n") == [SSEEvent("a")]


def test_a_line_over_the_limit_raises_without_quoting_it() -> None:
    parser = SSEParser(max_line_bytes=64)
    with pytest.raises(SSETooLarge, match="over 64 bytes") as caught:
        parser.feed(b"data: " + b"s3cret" * 20)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(SSETooLarge):
        SSEParser(max_line_bytes=64).feed(b":" + b"x" * 100 + b"\n")  # a comment too


def test_an_event_over_the_limit_raises_even_in_short_lines() -> None:
    parser = SSEParser(max_line_bytes=64, max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 40 + b"\n" + b"data: " + b"x" * 40 + b"\n")
    with pytest.raises(SSETooLarge, match="event"):
        parser.feed(b"data: " + b"x" * 40 + b"\n")


def test_the_event_bound_is_per_event() -> None:
    parser = SSEParser(max_line_bytes=64, max_event_bytes=100)
    for _ in range(10):
        assert parser.feed(b"data: " + b"x" * 50 + b"\n\n") == [SSEEvent("x" * 50)]
