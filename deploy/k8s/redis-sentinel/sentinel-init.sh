#!/bin/sh
# Writes $CONF_DIR/sentinel.conf for one sentinel. A sentinel that restarts has lost what it
# learnt (its config is rewritten in a scratch directory), so it asks the other sentinels which
# primary they watch, then the data nodes which of them is a primary, and only when nobody knows
# (a first start) watches the first of NODES; it then waits until that primary answers, since
# Sentinel refuses to start on a name it cannot resolve. The other sentinels and the replicas it
# learns from the primary and from their announcements. Runs unchanged in the Kubernetes init
# container, in docker compose's sentinel profile and in tests/deploy/test_redis_sentinel.py.
#
# Environment: SELF (host:port), NODES and SENTINELS (host:port, space-separated), MASTER_NAME,
# QUORUM, DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, CONF_DIR, BIND, REDIS_PASSWORD (the data nodes';
# may be empty), SENTINEL_PASSWORD (this sentinel's and its peers'; may be empty), WAIT_SECONDS.
set -eu

: "${SELF:?}" "${NODES:?}" "${SENTINELS:?}" "${MASTER_NAME:?}" "${QUORUM:?}" "${CONF_DIR:?}"
: "${DOWN_AFTER_MS:?}" "${FAILOVER_TIMEOUT_MS:?}"
BIND=${BIND:-0.0.0.0}
WAIT_SECONDS=${WAIT_SECONDS:-120}
REDIS_PASSWORD=${REDIS_PASSWORD:-}
SENTINEL_PASSWORD=${SENTINEL_PASSWORD:-}

cli() {
    auth=$1 addr=$2
    shift 2
    if [ -n "$auth" ]; then
        REDISCLI_AUTH=$auth timeout 3 redis-cli --raw -h "${addr%:*}" -p "${addr##*:}" "$@"
    else
        timeout 3 redis-cli --raw -h "${addr%:*}" -p "${addr##*:}" "$@"
    fi
}

# The primary most of the other sentinels name (host:port), or nothing.
peers_primary() {
    for sentinel in $SENTINELS; do
        [ "$sentinel" = "$SELF" ] && continue
        reply=$(cli "$SENTINEL_PASSWORD" "$sentinel" SENTINEL get-master-addr-by-name \
            "$MASTER_NAME" 2>/dev/null) || continue
        set -- $reply
        [ $# -eq 2 ] && echo "$1:$2"
    done | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }'
}

nodes_primary() {
    for node in $NODES; do
        role=$(cli "$REDIS_PASSWORD" "$node" ROLE 2>/dev/null | head -n 1) || continue
        if [ "$role" = "master" ]; then
            echo "$node"
            return
        fi
    done
}

# Until the primary named answers (a primary being replaced answers nothing): ask again.
waited=0
while :; do
    primary=$(peers_primary)
    [ -n "$primary" ] || primary=$(nodes_primary)
    if [ -z "$primary" ]; then
        set -- $NODES
        primary=$1
    fi
    cli "$REDIS_PASSWORD" "$primary" PING 2>/dev/null | grep -q PONG && break
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
        echo "the primary $primary does not answer; giving up (the pod restarts)" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

mkdir -p "$CONF_DIR"
conf="$CONF_DIR/sentinel.conf"
umask 077
{
    echo "port ${SELF##*:}"
    echo "bind $BIND"
    echo "dir $CONF_DIR"
    # Names, not addresses, in and out (Redis 6.2+): pod IPs change on every restart.
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames yes"
    echo "sentinel announce-ip ${SELF%:*}"
    echo "sentinel announce-port ${SELF##*:}"
    if [ -n "$SENTINEL_PASSWORD" ]; then
        # Asked of clients, and sent to the other sentinels (they share it).
        echo "requirepass $SENTINEL_PASSWORD"
    fi
    echo "sentinel monitor $MASTER_NAME ${primary%:*} ${primary##*:} $QUORUM"
    echo "sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS"
    echo "sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS"
    echo "sentinel parallel-syncs $MASTER_NAME 1"
    if [ -n "$REDIS_PASSWORD" ]; then
        echo "sentinel auth-pass $MASTER_NAME $REDIS_PASSWORD"
    fi
} >"$conf"
echo "watching $MASTER_NAME at $primary" >&2
