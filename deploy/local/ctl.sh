#!/usr/bin/env bash
# Starts, stops and reports the local components (PostgreSQL, Kafka, stripe-mock) of one checkout.
#   ctl.sh start|stop|restart|status [postgres] [kafka] [stripe-mock]     (no name: all three)
# `start` returns once the component really answers; `stop` once its process has exited. Both are
# idempotent, and the fault tests drive them (for example `ctl.sh stop kafka`, `ctl.sh start kafka`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

ALL=(postgres kafka stripe-mock)
STRIPE_TEST_KEY=sk_test_123

usage() {
    say "usage: $0 start|stop|restart|status [${ALL[*]}]" >&2
    exit 2
}

probe() { python3 "$ROOT/deploy/local/probe.py" "$@"; }

# The process of a pid file while it is alive and is still the one we started (pids get reused).
live_pid() {
    local pidfile=$1 marker=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker" || return 1
    echo "$pid"
}

# Alive and not a zombie waiting to be reaped.
pid_running() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# Start a daemon in a session of its own (so a Ctrl-C in the caller's terminal does not reach it),
# detached from the caller's stdio (so a caller capturing output does not wait for it to exit), and
# without the lock descriptor (so it does not hold the lock for its lifetime). The child writes its
# own pid, which stays the daemon's through the exec.
launch() {
    local pidfile=$1 log=$2
    shift 2
    setsid sh -c 'echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 9>&- &
}

# TERM, wait for the exit, then KILL what has not exited after `grace` seconds.
stop_pid() {
    local name=$1 pid=$2 grace=$3 deadline
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while pid_running "$pid"; do
        if ((SECONDS >= deadline)); then
            say "$name: still running ${grace}s after TERM; sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 10))
            while pid_running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
            break
        fi
        sleep 0.2
    done
}

port_taken() { probe --timeout 1 tcp "127.0.0.1:$1" 2>/dev/null; }

# Running, but started with other ports than this call asks for (a changed METERLINE_*_PORT).
wrong_port() {
    die "$1 of this checkout is running, but not on port $2 as asked; use ctl.sh restart $1"
}

fail_start() {
    local name=$1 log=$2 reason=$3
    say "error: $name $reason; the last lines of $log:" >&2
    tail -n 20 "$log" >&2 2>/dev/null || true
    exit 1
}

# --- state folders ----------------------------------------------------------------------------

ensure_state() {
    mkdir -p "$LOCAL_DIR" "$LOG_DIR" "$KAFKA_CONF_DIR" "$STATE_DIR"
    if is_root; then chown postgres:postgres "$STATE_DIR"; fi
    chmod 700 "$STATE_DIR"
    ln -sfn "$PG_DATA" "$LOCAL_DIR/pgdata"
    ln -sfn "$KAFKA_DATA" "$LOCAL_DIR/kafka-data"
    ln -sfn "$PG_LOG" "$LOG_DIR/postgres.log"
}

# --- PostgreSQL -------------------------------------------------------------------------------

PG_BIN=$(pg_bindir)

pg_running() { [ -n "$PG_BIN" ] && as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_write_config() {
    local owner
    owner=$(pg_owner)
    cat >"$PG_DATA/meterline.conf" <<EOF
# Written by deploy/local/ctl.sh at every start; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $METERLINE_PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 200
shared_buffers = 256MB
# Tests drop whole schemas of partitioned tables in one transaction: one lock per partition.
max_locks_per_transaction = 256
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    # A throwaway cluster on loopback: anyone on this machine may connect as any role.
    cat >"$PG_DATA/pg_hba.conf" <<EOF
# Written by deploy/local/ctl.sh at every start.
local all all trust
host  all all 127.0.0.1/32 trust
EOF
    if is_root; then chown "$owner:" "$PG_DATA/meterline.conf" "$PG_DATA/pg_hba.conf"; fi
    chmod 600 "$PG_DATA/meterline.conf" "$PG_DATA/pg_hba.conf"
}

pg_init() {
    [ -f "$PG_DATA/PG_VERSION" ] && return
    # What an interrupted initdb left behind is ours, and initdb refuses a non-empty folder.
    rm -rf "$PG_DATA"
    say "postgres: initdb $PG_DATA (as $(pg_owner))"
    as_pg_owner "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C >"$LOG_DIR/initdb.log" 2>&1 ||
        fail_start postgres "$LOG_DIR/initdb.log" "initdb failed"
    echo "include 'meterline.conf'" >>"$PG_DATA/postgresql.conf"
}

pg_ensure_database() {
    local psql=psql
    [ -x "$PG_BIN/psql" ] && psql="$PG_BIN/psql"
    "$psql" -X -q -v ON_ERROR_STOP=1 \
        "host=127.0.0.1 port=$METERLINE_PG_PORT user=postgres dbname=postgres" >/dev/null <<'SQL'
SELECT 'CREATE ROLE meterline LOGIN CREATEDB PASSWORD ''meterline'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'meterline') \gexec
SELECT 'CREATE DATABASE meterline OWNER meterline'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'meterline') \gexec
SQL
}

start_postgres() {
    [ -n "$PG_BIN" ] || die "no PostgreSQL server binaries (initdb, pg_ctl); run deploy/local/install.sh"
    local major
    major=$(pg_major "$PG_BIN")
    [ -n "$major" ] && [ "$major" -ge "$PG_MIN_MAJOR" ] ||
        die "postgres: PostgreSQL $PG_MIN_MAJOR or newer is needed (NULLS NOT DISTINCT);" \
            "$PG_BIN has ${major:-an unknown version} (install a newer one, or set METERLINE_PG_BIN)"
    ensure_state
    pg_init
    if pg_running; then
        [ "$(sed -n 4p "$PG_DATA/postmaster.pid")" = "$METERLINE_PG_PORT" ] ||
            wrong_port postgres "$METERLINE_PG_PORT"
        say "postgres: already running on 127.0.0.1:$METERLINE_PG_PORT"
    else
        port_taken "$METERLINE_PG_PORT" &&
            die "postgres: port $METERLINE_PG_PORT is taken by another process (set METERLINE_PG_PORT)"
        pg_write_config
        as_pg_owner mkdir -p "$PG_SOCKET_DIR"
        as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$METERLINE_START_TIMEOUT" \
            start >/dev/null 9>&- || fail_start postgres "$PG_LOG" "did not start"
        say "postgres: started on 127.0.0.1:$METERLINE_PG_PORT"
    fi
    pg_ensure_database
}

stop_postgres() {
    if pg_running; then
        as_pg_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null
        say "postgres: stopped"
    else
        say "postgres: not running"
    fi
}

status_postgres() {
    local pid
    if pg_running; then
        pid=$(head -1 "$PG_DATA/postmaster.pid" 2>/dev/null || echo '?')
        printf '%-12s running  pid %-8s 127.0.0.1:%-6s log %s\n' postgres "$pid" \
            "$METERLINE_PG_PORT" "$LOG_DIR/postgres.log"
    else
        printf '%-12s stopped\n' postgres
        return 1
    fi
}

# --- Kafka ------------------------------------------------------------------------------------

KAFKA_CONFIG="$KAFKA_CONF_DIR/server.properties"

kafka_pid() { live_pid "$KAFKA_PID" "$KAFKA_CONFIG"; }

KAFKA_JVM=(java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    -Dkafka.logs.dir="$LOG_DIR" -Dlog4j.configuration="file:$ROOT/deploy/local/kafka/log4j.properties"
    -cp "$KAFKA_LIBS/*")

kafka_write_config() {
    sed -e "s|@PORT@|$METERLINE_KAFKA_PORT|g" \
        -e "s|@CONTROLLER_PORT@|$METERLINE_KAFKA_CONTROLLER_PORT|g" \
        -e "s|@DATA_DIR@|$KAFKA_DATA|g" \
        "$ROOT/deploy/local/kafka/server.properties" >"$KAFKA_CONFIG"
}

# A KRaft log folder is formatted once, with a cluster id of its own.
kafka_format() {
    local cluster_id
    [ -f "$KAFKA_DATA/meta.properties" ] && return
    # 16 random bytes in base64url, as Kafka's own ids; never with a leading '-', which the
    # storage tool's option parser would take for an option (Kafka's generator avoids it too).
    cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    done
    say "kafka: formatting $KAFKA_DATA (cluster $cluster_id)"
    "${KAFKA_JVM[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_CONFIG" \
        >>"$KAFKA_STDOUT" 2>&1 9>&- || fail_start kafka "$KAFKA_STDOUT" "storage format failed"
}

start_kafka() {
    local deadline
    kafka_libs_present || die "no Kafka jars in $KAFKA_LIBS; run deploy/local/install.sh"
    ensure_state
    if kafka_pid >/dev/null; then
        grep -qF "PLAINTEXT://127.0.0.1:$METERLINE_KAFKA_PORT," "$KAFKA_CONFIG" ||
            wrong_port kafka "$METERLINE_KAFKA_PORT"
        say "kafka: already running on 127.0.0.1:$METERLINE_KAFKA_PORT"
    else
        for port in "$METERLINE_KAFKA_PORT" "$METERLINE_KAFKA_CONTROLLER_PORT"; do
            port_taken "$port" && die "kafka: port $port is taken by another process" \
                "(set METERLINE_KAFKA_PORT / METERLINE_KAFKA_CONTROLLER_PORT)"
        done
        kafka_write_config
        kafka_format
        rm -f "$KAFKA_PID"
        launch "$KAFKA_PID" "$KAFKA_STDOUT" "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_CONFIG"
        say "kafka: starting on 127.0.0.1:$METERLINE_KAFKA_PORT"
    fi
    # Ready means a real metadata answer with a leader for every partition, not an open port.
    deadline=$((SECONDS + METERLINE_START_TIMEOUT))
    until probe kafka "127.0.0.1:$METERLINE_KAFKA_PORT" 2>/dev/null; do
        sleep 0.3
        # The pid file is written by the child: give it a moment before taking its absence as a death.
        if ! kafka_pid >/dev/null && [ -s "$KAFKA_PID" ]; then
            fail_start kafka "$KAFKA_LOG" "exited while starting (also see $KAFKA_STDOUT)"
        fi
        if ((SECONDS >= deadline)); then
            probe kafka "127.0.0.1:$METERLINE_KAFKA_PORT" || true
            fail_start kafka "$KAFKA_LOG" "did not answer within ${METERLINE_START_TIMEOUT}s"
        fi
    done
    say "kafka: answering on 127.0.0.1:$METERLINE_KAFKA_PORT"
}

stop_kafka() {
    local pid
    if pid=$(kafka_pid); then
        stop_pid kafka "$pid" 120
        say "kafka: stopped"
    else
        say "kafka: not running"
    fi
    rm -f "$KAFKA_PID"
}

status_kafka() {
    local pid
    if pid=$(kafka_pid); then
        printf '%-12s running  pid %-8s 127.0.0.1:%-6s log %s\n' kafka "$pid" \
            "$METERLINE_KAFKA_PORT" "$KAFKA_LOG"
    else
        printf '%-12s stopped\n' kafka
        return 1
    fi
}

# --- stripe-mock ------------------------------------------------------------------------------

stripe_mock_pid() { live_pid "$STRIPE_MOCK_PID" "$STRIPE_MOCK_BIN"; }

stripe_mock_answers() {
    probe http "http://127.0.0.1:$METERLINE_STRIPE_MOCK_PORT/v1/customers" --user "$STRIPE_TEST_KEY"
}

start_stripe_mock() {
    local deadline
    [ -x "$STRIPE_MOCK_BIN" ] || die "no stripe-mock at $STRIPE_MOCK_BIN; run deploy/local/install.sh"
    ensure_state
    if stripe_mock_pid >/dev/null; then
        live_pid "$STRIPE_MOCK_PID" "-http-addr 127.0.0.1:$METERLINE_STRIPE_MOCK_PORT " >/dev/null ||
            wrong_port stripe-mock "$METERLINE_STRIPE_MOCK_PORT"
        say "stripe-mock: already running on 127.0.0.1:$METERLINE_STRIPE_MOCK_PORT"
        return
    fi
    port_taken "$METERLINE_STRIPE_MOCK_PORT" &&
        die "stripe-mock: port $METERLINE_STRIPE_MOCK_PORT is taken (set METERLINE_STRIPE_MOCK_PORT)"
    rm -f "$STRIPE_MOCK_PID"
    # stripe-mock opens an HTTPS listener on all interfaces unless told where (-http-addr does not
    # turn it off, and no flag does); so it goes to loopback on a port the system picks.
    launch "$STRIPE_MOCK_PID" "$STRIPE_MOCK_LOG" "$STRIPE_MOCK_BIN" \
        -http-addr "127.0.0.1:$METERLINE_STRIPE_MOCK_PORT" -https-addr 127.0.0.1:0
    deadline=$((SECONDS + METERLINE_START_TIMEOUT))
    until stripe_mock_answers 2>/dev/null; do
        sleep 0.2
        if ! stripe_mock_pid >/dev/null && [ -s "$STRIPE_MOCK_PID" ]; then
            fail_start stripe-mock "$STRIPE_MOCK_LOG" "exited while starting"
        fi
        ((SECONDS < deadline)) || fail_start stripe-mock "$STRIPE_MOCK_LOG" "did not answer in time"
    done
    say "stripe-mock: answering on 127.0.0.1:$METERLINE_STRIPE_MOCK_PORT"
}

stop_stripe_mock() {
    local pid
    if pid=$(stripe_mock_pid); then
        stop_pid stripe-mock "$pid" 30
        say "stripe-mock: stopped"
    else
        say "stripe-mock: not running"
    fi
    rm -f "$STRIPE_MOCK_PID"
}

status_stripe_mock() {
    local pid
    if pid=$(stripe_mock_pid); then
        printf '%-12s running  pid %-8s 127.0.0.1:%-6s log %s\n' stripe-mock "$pid" \
            "$METERLINE_STRIPE_MOCK_PORT" "$STRIPE_MOCK_LOG"
    else
        printf '%-12s stopped\n' stripe-mock
        return 1
    fi
}

# --- command line -----------------------------------------------------------------------------

[ $# -ge 1 ] || usage
action=$1
shift
components=("$@")
[ ${#components[@]} -gt 0 ] || components=("${ALL[@]}")
for component in "${components[@]}"; do
    case $component in postgres | kafka | stripe-mock) ;; *) usage ;; esac
done

if [ "$action" != status ]; then
    mkdir -p "$LOCAL_DIR"
    # One start or stop at a time per checkout: concurrent `make up`s must not start two brokers.
    exec 9>"$LOCAL_DIR/ctl.lock"
    flock 9
fi

status=0
for component in "${components[@]}"; do
    fn=${component//-/_}
    case $action in
    start) "start_$fn" ;;
    stop) "stop_$fn" ;;
    restart) "stop_$fn" && "start_$fn" ;;
    status) "status_$fn" || status=3 ;;
    *) usage ;;
    esac
done
exit "$status"
