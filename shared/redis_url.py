"""What REDIS_URL names: one Redis server, or a primary that Redis Sentinel watches over.

Two forms, both Celery's: `redis://[[user]:password@]host[:port][/db]` (`rediss://` for TLS,
`unix://` for a socket) names one server; `sentinel://h1:26379;sentinel://h2:26379;...` names
the sentinels to ask for the current primary of REDIS_SENTINEL_MASTER, with the data nodes'
password and the db in the parts (Celery takes them from the first part, kombu too; here any
part may carry them, and the parts that do must agree). The sentinels' own password is not in
the URL: it is REDIS_SENTINEL_PASSWORD, as Celery's `sentinel_kwargs` keep it apart.

Parsing is here, apart from building clients (shared/redis_connect.py), so that the settings
can refuse a malformed URL at start-up without importing redis-py. No message quotes the URL or
a part of it: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_PORT = 26379
_FORM = "sentinel://host:port;sentinel://host:port;... (optional /db and password in the parts)"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """The sentinels to ask, the db, and the data nodes' credentials (None: none)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None

    def broker_url(self) -> str:
        """The same sentinels as kombu's sentinel transport reads them: every part with the
        credentials and the db, as kombu takes both from the first part only."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{auth}{_netloc_host(host)}:{port}/{self.db}"
            for host, port in self.sentinels
        )


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}:")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinel form's parts; ValueError naming what is wrong (never the URL itself)."""
    parts = [part.strip() for part in url.strip().split(";")]
    if not parts or any(not part for part in parts):
        raise ValueError(f"REDIS_URL: an empty part; the sentinel form is {_FORM}")
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    credentials: set[tuple[str | None, str | None]] = set()
    for number, part in enumerate(parts, 1):
        split = _split(part, number)
        sentinels.append((split.hostname or "", _port(split, number)))
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"REDIS_URL: part {number}: the db must be a number (/0)")
            dbs.add(int(path))
        if split.username is not None or split.password is not None:
            credentials.add((_unquoted(split.username), _unquoted(split.password)))
    if len(dbs) > 1:
        raise ValueError("REDIS_URL: the parts name different dbs; name one, or the same in all")
    if len(credentials) > 1:
        raise ValueError("REDIS_URL: the parts carry different passwords; give one, or the same")
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("REDIS_URL: a sentinel is named twice")
    username, password = credentials.pop() if credentials else (None, None)
    return SentinelTarget(tuple(sentinels), dbs.pop() if dbs else 0, username, password)


def check_redis_url(url: str, *, master: str, sentinel_password: bool) -> None:
    """Raise ValueError when REDIS_URL is in neither form, or the sentinel settings do not fit
    it (`master`: REDIS_SENTINEL_MASTER; `sentinel_password`: whether one is set)."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        if not master.strip():
            raise ValueError(
                "REDIS_URL names sentinels: set REDIS_SENTINEL_MASTER to the name they monitor "
                "the primary under (`sentinel monitor <name> <host> <port> <quorum>`)"
            )
        return
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in PLAIN_SCHEMES:
        raise ValueError(
            "REDIS_URL: redis://host:port/db, rediss:// (TLS), unix:// (a socket), or the "
            f"sentinel form {_FORM}"
        )
    if master or sentinel_password:
        raise ValueError(
            "REDIS_SENTINEL_MASTER and REDIS_SENTINEL_PASSWORD are for a sentinel REDIS_URL "
            f"({_FORM}); with one server, leave them empty"
        )


def _split(part: str, number: int) -> SplitResult:
    try:
        split = urlsplit(part)
        split.port  # noqa: B018 (parses the port: ValueError when it is not a number)
    except ValueError:
        raise ValueError(f"REDIS_URL: part {number} is not a URL with host:port") from None
    if split.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"REDIS_URL: part {number} is not sentinel://; the form is {_FORM}")
    if not split.hostname:
        raise ValueError(f"REDIS_URL: part {number} names no host")
    if split.query or split.fragment:
        raise ValueError(f"REDIS_URL: part {number}: query options are not supported here")
    return split


def _port(split: SplitResult, number: int) -> int:
    port = split.port if split.port is not None else SENTINEL_PORT
    if not 0 < port < 65536:
        raise ValueError(f"REDIS_URL: part {number}: the port must be 1-65535")
    return port


def _unquoted(value: str | None) -> str | None:
    return unquote(value) if value else None


def _netloc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
