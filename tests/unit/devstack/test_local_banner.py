"""`make run`'s banner never shows a password of REDIS_URL (devstack/local.py masked_url)."""

from __future__ import annotations

import pytest

from devstack.local import LocalConfig, _start_redis, masked_url
from devstack.supervisor import Supervisor

SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://user:{SECRET}@h:6379/0", "redis://user:***@h:6379/0"),
        (f"redis://{SECRET}@h/0", "redis://***@h/0"),  # a lone userinfo may be a password
        (
            f"rediss://u:{SECRET}%40x@h:1/2?ssl_cert_reqs=none",
            "rediss://u:***@h:1/2?ssl_cert_reqs=none",
        ),
        (f"unix://:{SECRET}@/tmp/r.sock?db=0", "unix://:***@/tmp/r.sock?db=0"),
        (f"redis://h/0?db=1&password={SECRET}", "redis://h/0?db=1&password=***"),
        (f"redis://:p@{SECRET}@h/0", "redis://:***@h/0"),  # an unencoded @ in it
        (f"redis://:a;{SECRET}@h:1/0", "redis://:***@h:1/0"),  # `;` splits sentinel URLs only
        (
            f"sentinel://:{SECRET}@h1:26379;sentinel://:{SECRET}@h2:26379/0",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379/0",
        ),
        ("sentinel://h1:26379;sentinel://h2:26379", "sentinel://h1:26379;sentinel://h2:26379"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"redis://:{SECRET}@[::1:6379/0", "redis://(not shown)"),  # malformed: nothing of it
        (f"redis://:{SECRET}", "redis://(not shown)"),  # no host: the secret would be the port
    ],
)
def test_passwords_are_masked_and_the_rest_shown(url: str, shown: str) -> None:
    assert masked_url(url) == shown


def test_the_banner_names_the_redis_in_use_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:6390/0"
    assert _start_redis(Supervisor(), LocalConfig(redis_url=url)) == url  # passed on as given
    printed = capsys.readouterr().out
    assert printed == "Using Redis at redis://:***@127.0.0.1:6390/0 (REDIS_URL)\n"
    assert SECRET not in printed
