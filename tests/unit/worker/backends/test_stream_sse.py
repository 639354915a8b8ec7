"""The incremental SSE parser (worker/backends/stream_sse.py) against the WHATWG event stream
rules: the same events however the bytes are split (at every byte position, one byte at a time,
mid-UTF-8 and between a CR and its LF), every line ending, comments, fields, the last event ID,
retry, the incomplete last event, and the size limits."""

from __future__ import annotations

import pytest

from worker.backends.stream_sse import Event, SSEParser, SSETooLarge

# A bit of everything: a BOM, CRLF/CR/LF, a comment, multi-line data, an event type, ids, a
# retry, a field without a colon, no space after a colon, UTF-8 of 2, 3 and 4 bytes.
SAMPLE = (
    "\ufeff: keep-alive\r\n"
    "data: héllo\r\n"
    "data:  wörld\r\n"
    "\r\n"
    'event: output\rid: 7\rdata: {"t": "日本"}\r\r'
    "retry: 1500\n"
    "data\n"
    "\n"
    "id: 8\n"
    "unknown: field\n"
    "data: 🙂 last\n"
    "\n"
).encode()
EXPECTED = [
    Event("héllo\n wörld"),
    Event('{"t": "日本"}', "output", "7"),
    Event("", "message", "7", 1500),
    Event("🙂 last", "message", "8"),
]


def parse(*chunks: bytes) -> list[Event]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def test_the_sample_parses_per_the_spec() -> None:
    assert parse(SAMPLE) == EXPECTED


@pytest.mark.parametrize("position", range(len(SAMPLE) + 1))
def test_a_split_at_any_byte_gives_the_same_events(position: int) -> None:
    assert parse(SAMPLE[:position], SAMPLE[position:]) == EXPECTED


@pytest.mark.parametrize("first", range(0, len(SAMPLE), 7))
def test_three_way_splits_give_the_same_events(first: int) -> None:
    for second in range(first, len(SAMPLE) + 1, 3):
        chunks = SAMPLE[:first], SAMPLE[first:second], SAMPLE[second:]
        assert parse(*chunks) == EXPECTED, (first, second)


def test_one_byte_at_a_time_and_empty_reads_give_the_same_events() -> None:
    chunks = [b""] + [SAMPLE[i : i + 1] for i in range(len(SAMPLE))] + [b""]
    assert parse(*chunks) == EXPECTED


def test_an_event_is_out_as_soon_as_its_empty_line_is_in() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == [Event("a")]
    # A CR ends its line at once: the event is not held back for a possible LF.
    assert parser.feed(b"data: b\r\r") == [Event("b")]
    assert parser.feed(b"\ndata: c\n\n") == [Event("c")]  # that LF paired the CR: no empty line


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending(ending: bytes) -> None:
    stream = ending.join([b"event: e", b"data: 1", b"data: 2", b"", b"data: 3", b"", b""])
    assert parse(stream) == [Event("1\n2", "e"), Event("3")]


def test_lf_cr_is_two_line_ends() -> None:
    assert parse(b"data: a\n\rdata: b\n\n") == [Event("a"), Event("b")]


def test_a_cr_split_from_its_lf_is_one_line_end() -> None:
    assert parse(b"data: a\r", b"\n", b"data: b\r\n", b"\r", b"\n") == [Event("a\nb")]


def test_comments_and_empty_data_dispatch_nothing() -> None:
    assert parse(b": ping\n\n:\n\nevent: x\n\nid: 3\n\n") == []


def test_data_with_an_empty_value_is_an_event_with_empty_data() -> None:
    assert parse(b"data:\n\n", b"data\n\n") == [Event(""), Event("")]


def test_only_one_space_after_the_colon_goes() -> None:
    assert parse(b"data:   x \n\n") == [Event("  x ")]
    assert parse(b"data:x:y\n\n") == [Event("x:y")]


def test_the_last_event_id_carries_over_until_set_again() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert [event.id for event in events] == ["1", "1", ""]
    assert parser.last_event_id == ""


def test_an_id_with_nul_is_ignored() -> None:
    assert parse(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")[1].id == "1"


@pytest.mark.parametrize("value", [b"15x", b"-5", b"1.5", b"", b"\xd9\xa3"])  # ARABIC-INDIC 3
def test_retry_takes_ascii_digits_only(value: bytes) -> None:
    parser = SSEParser()
    [event] = parser.feed(b"retry: " + value + b"\ndata: a\n\n")
    assert (event.retry, parser.retry) == (None, None)


def test_a_retry_without_data_changes_the_stream_but_dispatches_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 250\n\ndata: a\n\n") == [Event("a")]
    assert parser.retry == 250


def test_an_event_without_its_empty_line_is_discarded_at_the_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: cut") == [Event("a")]
    parser.close()
    assert parser.feed(b"\n\n") == []  # nothing of the discarded event is left


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse(b"data: \xff\xfe ok\n\n") == [Event("\ufffd\ufffd ok")]


def test_a_leading_bom_split_across_reads_is_dropped() -> None:
    bom = "\ufeff".encode()
    assert parse(bom[:1], bom[1:2], bom[2:] + b"data: a\n\n") == [Event("a")]


def test_a_bom_later_in_the_stream_makes_an_unknown_field() -> None:
    bom = "\ufeff".encode()
    assert parse(b"data: a\n\n" + bom + b"data: b\n\n") == [Event("a")]


def test_a_line_over_the_limit_raises_even_before_it_ends() -> None:
    parser = SSEParser(max_line_bytes=16)
    assert parser.feed(b"data: " + b"x" * 10 + b"\n\n") == [Event("x" * 10)]
    with pytest.raises(SSETooLarge, match="line is over 16 bytes") as raised:
        parser.feed(b"data: " + b"Q" * 11)  # no line end yet
    assert "Q" not in str(raised.value)  # the bytes are never quoted


def test_a_line_over_the_limit_across_reads_raises() -> None:
    parser = SSEParser(max_line_bytes=16)
    parser.feed(b"data: 12345")
    with pytest.raises(SSETooLarge):
        parser.feed(b"678901\n")


def test_an_event_over_the_limit_raises() -> None:
    parser = SSEParser(max_line_bytes=100, max_event_bytes=40)
    assert len(parser.feed(b"data: " + b"a" * 30 + b"\n\n")) == 1  # each event counts anew
    parser.feed(b"data: " + b"b" * 30 + b"\n")
    with pytest.raises(SSETooLarge, match="event is over 40 bytes"):
        parser.feed(b"data: " + b"c" * 30 + b"\n")


def test_comments_do_not_count_towards_the_event_limit() -> None:
    parser = SSEParser(max_line_bytes=100, max_event_bytes=40)
    for _ in range(10):
        parser.feed(b": " + b"k" * 30 + b"\n")
    assert parser.feed(b"data: ok\n\n") == [Event("ok")]


def test_a_comment_line_never_takes_an_event_over_the_limit() -> None:
    parser = SSEParser(max_line_bytes=100, max_event_bytes=40)
    parser.feed(b"data: " + b"a" * 30 + b"\n")
    parser.feed(b": " + b"k" * 30 + b"\n: " + b"k" * 10)  # whole and partial comments
    assert parser.feed(b"k" * 10 + b"\n\n") == [Event("a" * 30)]


def test_an_unended_line_that_takes_its_event_over_the_limit_raises() -> None:
    parser = SSEParser(max_line_bytes=100, max_event_bytes=40)
    parser.feed(b"data: " + b"a" * 30 + b"\n")
    with pytest.raises(SSETooLarge, match="event is over 40 bytes"):
        parser.feed(b"data: " + b"b" * 10)
