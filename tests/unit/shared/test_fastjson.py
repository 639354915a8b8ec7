"""shared/fastjson.py: pydantic-core's parser, with exactly json.loads's values and errors."""

from __future__ import annotations

import json
import math
import random

import pytest

from shared import fastjson

SAME_AS_STDLIB = [
    b'{"a": 1, "a": 2}',  # the last duplicate wins
    b"18446744073709551616",  # beyond 64 bits: an exact int (orjson would give a float)
    b"-9223372036854775809",
    b"123456789012345678901234567890",
    b"[1.0000000000000002, 0.1, 5e-324, 1.7976931348623157e308, 2.2250738585072014e-308]",
    b"1e400",  # inf, as json.loads gives
    b"1.5e-400",
    b"-0.0",
    b'"\\ud800"',  # a lone surrogate: from_json refuses it, json.loads takes it
    b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 BOM
    '{"é": "ü"}'.encode("utf-16"),
    b'"a\\u0000b"',
    b' {"a" :1 , "b":[ ]} ',
]


@pytest.mark.parametrize("data", SAME_AS_STDLIB)
def test_values_are_the_standard_librarys(data: bytes) -> None:
    value = fastjson.loads(data)
    expected = json.loads(data)
    assert repr(value) == repr(expected)  # repr: 1 and 1.0 differ, as do int and float
    assert type(value) is type(expected)


def test_nan_and_infinity_parse_as_json_loads_parses_them() -> None:
    value = fastjson.loads(b"[NaN, Infinity, -Infinity]")
    assert math.isnan(value[0])
    assert value[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize(
    "data", [b"", b"01", b"1.", b"+1", b"[1,]", b"{'a': 1}", b'"a\nb"', b'{"x": 1}x', b'"\xff"']
)
def test_what_json_loads_refuses_is_refused_with_its_error(data: bytes) -> None:
    with pytest.raises(ValueError) as expected:  # noqa: PT011 - its message is compared below
        json.loads(data)
    with pytest.raises(type(expected.value)) as raised:
        fastjson.loads(data)
    assert str(raised.value) == str(expected.value)


def test_a_prediction_of_floats_round_trips_exactly() -> None:
    rng = random.Random(7)
    scores = [rng.random() * 10 ** rng.randint(-300, 300) for _ in range(2000)]
    text = json.dumps({"scores": scores})
    assert fastjson.loads(text) == json.loads(text)
    assert fastjson.loads(text.encode()) == json.loads(text)
