#!/usr/bin/env bash
# The lock: requirements.lock pins every transitive version the project was tested with, and
# scripts/bootstrap.sh installs with it as a pip constraints file, so a fresh machine next month
# installs exactly what CI passed with (torch stays the machine's local 2.13.0 CPU wheel).
#
#   scripts/lock.sh            re-lock after editing pyproject.toml (keeps every pin it can)
#   scripts/lock.sh --upgrade  move every pin to the newest release pyproject.toml allows
#   scripts/lock.sh --check    fail if pyproject.toml and requirements.lock disagree (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=requirements.lock
TOOLS=.venv-lock   # pip-tools in a venv of its own: it must not depend on what it locks
PIP_TOOLS="pip-tools==7.6.2"

if [[ ! -x "$TOOLS/bin/pip-compile" ]]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "$PIP_TOOLS" 2>&1 | grep -v "^WARNING: Location" || true
fi

compile() {  # $1: output file, then extra pip-compile options
    local out=$1; shift
    # --strip-extras: pip refuses extras in a constraints file. No hashes: torch is a local
    # wheel whose hash is not the one PyPI lists for 2.13.0.
    "$TOOLS/bin/pip-compile" --quiet --strip-extras --no-header --no-emit-index-url --no-emit-find-links \
        --extra local --extra dev --extra otel --output-file "$out" "$@" pyproject.toml 2> >(grep -v '^WARNING: Location' >&2)
}

case "${1:-}" in
    --check)
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        cp "$LOCK" "$tmp/lock"   # start from the committed pins, as a re-lock would
        compile "$tmp/lock"
        if ! diff -u "$LOCK" "$tmp/lock"; then
            echo "lock: $LOCK does not match pyproject.toml; run scripts/lock.sh and commit it" >&2
            exit 1
        fi
        echo "lock: $LOCK matches pyproject.toml"
        ;;
    --upgrade) compile "$LOCK" --upgrade ;;
    "") compile "$LOCK" ;;
    *) echo "usage: $0 [--check|--upgrade]" >&2; exit 2 ;;
esac
