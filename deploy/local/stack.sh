# What the local stack is: its ports, folders, pinned versions and binaries, in one place.
# Sourced (never run) by install.sh, ctl.sh, up.sh and down.sh. The ports, the cache folder and the
# start timeout can be overridden by the METERLINE_* environment variables named below.
# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
LOCAL_DIR="$ROOT/.local"
LOG_DIR="$LOCAL_DIR/logs"

METERLINE_PG_PORT=${METERLINE_PG_PORT:-55432}
METERLINE_KAFKA_PORT=${METERLINE_KAFKA_PORT:-59092}
METERLINE_KAFKA_CONTROLLER_PORT=${METERLINE_KAFKA_CONTROLLER_PORT:-59093}
METERLINE_STRIPE_MOCK_PORT=${METERLINE_STRIPE_MOCK_PORT:-12111}
# How long `ctl.sh start` waits for a component to answer before it gives up.
METERLINE_START_TIMEOUT=${METERLINE_START_TIMEOUT:-120}
# How many Kafka brokers `make up` runs: 1 (one node) or 3 (a KRaft cluster on loopback, every node
# broker and controller, topics replicated 3 with min.insync.replicas 2). The cluster's ports are
# its own, so it can also run beside the single broker (a fault test starts it that way).
METERLINE_KAFKA_BROKERS=${METERLINE_KAFKA_BROKERS:-1}
# What `make up` points the clients at in .local/env: none (PLAINTEXT) or scram (the brokers'
# SASL_PLAINTEXT listener, SCRAM-SHA-512). Both listeners are always open.
METERLINE_KAFKA_AUTH=${METERLINE_KAFKA_AUTH:-none}

KAFKA_VERSION=3.9.2
STRIPE_MOCK_VERSION=v0.197.0

CACHE_DIR=${METERLINE_CACHE:-$HOME/.cache/meterline}
KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
STRIPE_MOCK_BIN="$CACHE_DIR/bin/stripe-mock"

# The PostgreSQL cluster runs as the postgres user, which cannot enter a checkout under a mode-700
# home; so the data (PostgreSQL's and Kafka's) lives in a folder of its own under /var/tmp, one per
# checkout, and .local/ links to it.
STATE_DIR="/var/tmp/meterline-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
PG_DATA="$STATE_DIR/pgdata"
PG_SOCKET_DIR="$STATE_DIR/pgsock"
PG_LOG="$STATE_DIR/postgres.log"
KAFKA_DATA="$STATE_DIR/kafka-data"

KAFKA_CONF_DIR="$LOCAL_DIR/kafka"
KAFKA_PID="$LOCAL_DIR/kafka.pid"
KAFKA_LOG="$LOG_DIR/kafka.log"
KAFKA_STDOUT="$LOG_DIR/kafka.stdout.log"
# Every broker also listens with SASL_PLAINTEXT (SCRAM) two ports above its plaintext port; the
# user is created by ctl.sh with the password kept in .local (like the pepper).
KAFKA_SCRAM_USER=meterline
KAFKA_SCRAM_PASSWORD_FILE="$LOCAL_DIR/kafka-scram-password"
KAFKA_SASL_PORT=$((METERLINE_KAFKA_PORT + 2))
# Node n (1..3) of the cluster listens on its own loopback address 127.0.0.(n+1): clients on
# METERLINE_KAFKA_PORT + 8n (SASL + 2), its controller on METERLINE_KAFKA_CONTROLLER_PORT + 8n;
# every checkout keeps to its own small range. Its own address because these ports may lie in the
# kernel's ephemeral range, and every client connection on loopback leaves from 127.0.0.1: a
# restarted node would otherwise find a port held by some passing connection.
KAFKA_CLUSTER_NODES=(1 2 3)
KAFKA_CLUSTER_CONF_DIR="$LOCAL_DIR/kafka-cluster"
KAFKA_CLUSTER_DATA="$STATE_DIR/kafka-cluster"
kafka_node_host() { echo "127.0.0.$((1 + $1))"; }
kafka_node_port() { echo $((METERLINE_KAFKA_PORT + 8 * $1)); }
kafka_node_sasl_port() { echo $((METERLINE_KAFKA_PORT + 8 * $1 + 2)); }
kafka_node_controller_port() { echo $((METERLINE_KAFKA_CONTROLLER_PORT + 8 * $1)); }

# The bootstrap servers of the brokers METERLINE_KAFKA_BROKERS selects: plaintext, or with `sasl`
# their SCRAM listeners.
kafka_servers() {
    local kind=${1:-plain} n servers=()
    if [ "$METERLINE_KAFKA_BROKERS" = 1 ]; then
        if [ "$kind" = sasl ]; then echo "127.0.0.1:$KAFKA_SASL_PORT"; else echo "127.0.0.1:$METERLINE_KAFKA_PORT"; fi
        return
    fi
    for n in "${KAFKA_CLUSTER_NODES[@]}"; do
        if [ "$kind" = sasl ]; then
            servers+=("$(kafka_node_host "$n"):$(kafka_node_sasl_port "$n")")
        else
            servers+=("$(kafka_node_host "$n"):$(kafka_node_port "$n")")
        fi
    done
    (IFS=,; echo "${servers[*]}")
}

# A secret generated once per checkout and kept, so that what was made with it stays valid
# across make down / make up.
keep_secret() {
    local file=$1
    if [ ! -s "$file" ]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$file")
    fi
    cat "$file"
}

STRIPE_MOCK_PID="$LOCAL_DIR/stripe-mock.pid"
STRIPE_MOCK_LOG="$LOG_DIR/stripe-mock.log"

say() { printf '%s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# The user that owns and runs the PostgreSQL cluster: initdb refuses to run as root.
pg_owner() { if is_root; then echo postgres; else id -un; fi; }

# Run a PostgreSQL server binary as the cluster owner, from a folder that user can enter.
as_pg_owner() {
    if is_root; then
        (cd "$STATE_DIR" && runuser -u postgres -- "$@")
    else
        (cd "$STATE_DIR" && "$@")
    fi
}

# The newest installed PostgreSQL server binaries (initdb, pg_ctl, postgres), or nothing.
pg_bindir() {
    local dir
    if [ -n "${METERLINE_PG_BIN:-}" ]; then
        echo "$METERLINE_PG_BIN"
        return
    fi
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return
        fi
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
    fi
}

# The oldest PostgreSQL the schema runs on: usage_records' unique key uses NULLS NOT DISTINCT (15).
PG_MIN_MAJOR=15

# The major version of the server binaries in a bindir ("16"), or nothing.
pg_major() {
    { "$1/postgres" --version 2>/dev/null || true; } |
        sed -n 's/^postgres (PostgreSQL) \([0-9][0-9]*\).*/\1/p'
}

# The bindir when its server is new enough, or nothing.
pg_usable_bindir() {
    local dir major
    dir=$(pg_bindir)
    [ -n "$dir" ] || return 0
    major=$(pg_major "$dir")
    if [ -n "$major" ] && [ "$major" -ge "$PG_MIN_MAJOR" ]; then echo "$dir"; fi
}

kafka_libs_present() {
    [ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] &&
        [ -f "$KAFKA_LIBS/kafka-tools-$KAFKA_VERSION.jar" ] &&
        [ -f "$KAFKA_LIBS/slf4j-reload4j-1.7.36.jar" ]
}

# METERLINE_KAFKA_BROKERS and METERLINE_KAFKA_AUTH hold one of the values they allow.
check_kafka_mode() {
    case $METERLINE_KAFKA_BROKERS in 1 | 3) ;; *) die "METERLINE_KAFKA_BROKERS must be 1 or 3, not '$METERLINE_KAFKA_BROKERS'" ;; esac
    case $METERLINE_KAFKA_AUTH in none | scram) ;; *) die "METERLINE_KAFKA_AUTH must be none or scram, not '$METERLINE_KAFKA_AUTH'" ;; esac
}
