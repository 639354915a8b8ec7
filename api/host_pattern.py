"""The `host` pattern the OpenAPI document gives: exactly the hosts api/targets.py accepts.

shared/models.py's own pattern (HOST_PATTERN there) admits any bracketed run of hex digits, colons
and dots, and the URL parser then refuses what is no IPv6 address (a 422): a fuzzer reading that
pattern would send addresses the server refuses. This is RFC 3986's IPv6address (and the plain
host names), which is what the server accepts.
"""

from __future__ import annotations

from api.inputs import END

_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"


def _before(n: int) -> str:
    """RFC 3986's `[ *n( h16 ":" ) h16 ]`: up to n+1 groups before a `::`."""
    return rf"(?:(?:{_H16}:){{0,{n}}}{_H16})?"


_IPV6 = (
    "(?:"
    + "|".join(
        [
            rf"(?:{_H16}:){{6}}{_LS32}",
            rf"::(?:{_H16}:){{5}}{_LS32}",
            rf"{_before(0)}::(?:{_H16}:){{4}}{_LS32}",
            rf"{_before(1)}::(?:{_H16}:){{3}}{_LS32}",
            rf"{_before(2)}::(?:{_H16}:){{2}}{_LS32}",
            rf"{_before(3)}::{_H16}:{_LS32}",
            rf"{_before(4)}::{_LS32}",
            rf"{_before(5)}::{_H16}",
            rf"{_before(6)}::",
        ]
    )
    + ")"
)
HOST_PATTERN = rf"^(?:\[{_IPV6}\]|[A-Za-z0-9.\-]{{1,253}}){END}"
