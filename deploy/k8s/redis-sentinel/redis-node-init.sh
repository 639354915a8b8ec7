#!/bin/sh
# Writes $CONF_DIR/redis.conf for one data node of the Sentinel topology, choosing its role
# first: a node that restarts after a failover must not come back as the primary it once was (its
# AOF misses what was written since; replicas that followed it would drop that too), so it asks
# the sentinels who the primary is, then the other data nodes, and only when nobody knows (a first
# start) is the first of NODES the primary and the others its replicas. A node the sentinels
# still name although it restarted (it came back before they noticed it gone) waits, up to
# HANDOVER_SECONDS, for them to promote a replica that never stopped; if they cannot (no live
# replica), it starts as the primary. POSIX sh + redis-cli: it runs in the redis image's init
# container (deploy/k8s/redis-sentinel/), in docker compose's sentinel profile and in
# tests/deploy/test_redis_sentinel.py, unchanged.
#
# Environment: SELF (this node, host:port, as the others reach it), NODES and SENTINELS
# (host:port, space-separated), MASTER_NAME, CONF_DIR, DATA_DIR, BIND, REDIS_PASSWORD (may be
# empty: no password), SENTINEL_PASSWORD (may be empty), MIN_REPLICAS_TO_WRITE,
# MIN_REPLICAS_MAX_LAG, APPENDFSYNC, HANDOVER_SECONDS.
set -eu

: "${SELF:?}" "${NODES:?}" "${SENTINELS:?}" "${MASTER_NAME:?}" "${CONF_DIR:?}" "${DATA_DIR:?}"
: "${MIN_REPLICAS_TO_WRITE:?}" "${MIN_REPLICAS_MAX_LAG:?}" "${APPENDFSYNC:?}"
BIND=${BIND:-0.0.0.0}
HANDOVER_SECONDS=${HANDOVER_SECONDS:-60}
REDIS_PASSWORD=${REDIS_PASSWORD:-}
SENTINEL_PASSWORD=${SENTINEL_PASSWORD:-}

# cli PASSWORD HOST:PORT ARGS...: one bounded query (a frozen node must not hang the start).
cli() {
    auth=$1 addr=$2
    shift 2
    if [ -n "$auth" ]; then
        REDISCLI_AUTH=$auth timeout 3 redis-cli --raw -h "${addr%:*}" -p "${addr##*:}" "$@"
    else
        timeout 3 redis-cli --raw -h "${addr%:*}" -p "${addr##*:}" "$@"
    fi
}

# The primary most sentinels name (host:port), or nothing when none answers.
sentinels_primary() {
    for sentinel in $SENTINELS; do
        reply=$(cli "$SENTINEL_PASSWORD" "$sentinel" SENTINEL get-master-addr-by-name \
            "$MASTER_NAME" 2>/dev/null) || continue
        set -- $reply
        [ $# -eq 2 ] && echo "$1:$2"
    done | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }'
}

# Another data node that says it is a primary (host:port), or nothing.
nodes_primary() {
    for node in $NODES; do
        [ "$node" = "$SELF" ] && continue
        role=$(cli "$REDIS_PASSWORD" "$node" ROLE 2>/dev/null | head -n 1) || continue
        if [ "$role" = "master" ]; then
            echo "$node"
            return
        fi
    done
}

primary=$(sentinels_primary)
# An append-only file (Redis 6.2's, or 7's directory) means this node ran before.
if [ "$primary" = "$SELF" ] && { [ -e "$DATA_DIR/appendonly.aof" ] || [ -d "$DATA_DIR/appendonlydir" ]; }; then
    echo "the sentinels name this restarted node; waiting for them to promote a live replica" >&2
    waited=0
    while [ "$primary" = "$SELF" ] && [ "$waited" -lt "$HANDOVER_SECONDS" ]; do
        sleep 1
        waited=$((waited + 1))
        primary=$(sentinels_primary)
    done
    [ -n "$primary" ] || primary=$SELF
fi
[ -n "$primary" ] || primary=$(nodes_primary)
if [ -z "$primary" ]; then
    set -- $NODES
    primary=$1
fi

mkdir -p "$CONF_DIR"
conf="$CONF_DIR/redis.conf"
umask 077
{
    echo "port ${SELF##*:}"
    echo "bind $BIND"
    echo "dir $DATA_DIR"
    echo "appendonly yes"
    echo "appendfsync $APPENDFSYNC"
    echo "maxmemory-policy noeviction"
    # The primary refuses writes with no replica within the lag: an old primary cut off from
    # the others stops taking writes that the new one will never see.
    echo "min-replicas-to-write $MIN_REPLICAS_TO_WRITE"
    echo "min-replicas-max-lag $MIN_REPLICAS_MAX_LAG"
    # Known to the others, and to the sentinels, by its stable name (a pod's IP changes).
    echo "replica-announce-ip ${SELF%:*}"
    echo "replica-announce-port ${SELF##*:}"
    if [ -n "$REDIS_PASSWORD" ]; then
        echo "requirepass $REDIS_PASSWORD"
        echo "masterauth $REDIS_PASSWORD"
    fi
    if [ "$primary" != "$SELF" ]; then
        echo "replicaof ${primary%:*} ${primary##*:}"
    fi
} >"$conf"
if [ "$primary" = "$SELF" ]; then
    echo "starting as the primary" >&2
else
    echo "starting as a replica of $primary" >&2
fi
