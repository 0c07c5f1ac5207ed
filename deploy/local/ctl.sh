#!/usr/bin/env bash
# Starts, stops and reports the local components (PostgreSQL, Kafka, stripe-mock) of one checkout.
#   ctl.sh start|stop|restart|status [postgres] [kafka] [stripe-mock]     (no name: all three)
#   ctl.sh start|stop|kill|status kafka-1|kafka-2|kafka-3   one node of the 3-broker cluster
#   ctl.sh servers [plain|sasl]                             bootstrap servers of the brokers
# METERLINE_KAFKA_BROKERS=3 makes `kafka` the three-node cluster instead of the single broker.
# `start` returns once the component really answers; `stop` once its process has exited. Both are
# idempotent, and the fault tests drive them (for example `ctl.sh stop kafka`, `ctl.sh start kafka`).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

ALL=(postgres kafka stripe-mock)
STRIPE_TEST_KEY=sk_test_123

usage() {
    say "usage: $0 start|stop|restart|status|kill [${ALL[*]} kafka-1 kafka-2 kafka-3]" >&2
    say "       $0 servers [plain|sasl]   (the bootstrap servers of METERLINE_KAFKA_BROKERS)" >&2
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

# Something accepts connections on port $1 (of host $2, default 127.0.0.1).
port_taken() { probe --timeout 1 tcp "${2:-127.0.0.1}:$1" 2>/dev/null; }

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
# `kafka` is the single broker, or with METERLINE_KAFKA_BROKERS=3 all three nodes of the cluster;
# `kafka-1`, `kafka-2`, `kafka-3` are one node of the cluster (a fault test kills and restarts one).

KAFKA_CONFIG="$KAFKA_CONF_DIR/server.properties"

kafka_pid() { live_pid "$KAFKA_PID" "$KAFKA_CONFIG"; }

# The java command of a broker or tool into the array named $1: logs in $2, heap $3 (min/max).
kafka_jvm() {
    local -n command=$1
    local logs=$2 heap=$3
    command=(java "-Xms${heap%/*}" "-Xmx${heap#*/}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -Djava.awt.headless=true "-Dkafka.logs.dir=$logs"
        "-Dlog4j.configuration=file:$ROOT/deploy/local/kafka/log4j.properties" -cp "$KAFKA_LIBS/*")
}
kafka_jvm KAFKA_JVM "$LOG_DIR" 256m/1g
# Three of these share a small box with everything else.
KAFKA_NODE_HEAP=128m/512m

# A random KRaft cluster id: 16 bytes in base64url, as Kafka's own, never with a leading '-',
# which the storage tool's option parser would take for an option (Kafka's generator avoids it).
new_cluster_id() {
    local cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    done
    echo "$cluster_id"
}

# A KRaft log folder is formatted once, with the cluster id it is given.
kafka_format() {
    local config=$1 data=$2 cluster_id=$3 log=$4
    [ -f "$data/meta.properties" ] && return
    say "kafka: formatting $data (cluster $cluster_id)"
    "${KAFKA_JVM[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$config" \
        >>"$log" 2>&1 9>&- || fail_start kafka "$log" "storage format failed"
}

# The SCRAM user of the SASL listeners, created (or its password set) once per cluster and
# password: through the plaintext listener, with the password in a file, never on a command line.
# One mechanism per request: the broker refuses to alter one user twice in a request.
kafka_scram_user() {
    local data=$1 server=$2 log=$3 password stamp request mechanism
    password=$(keep_secret "$KAFKA_SCRAM_PASSWORD_FILE")
    stamp="$data/.meterline-scram-$(printf '%s' "$password" | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return
    request=$(umask 077 && mktemp "$LOCAL_DIR/scram.XXXXXX")
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
        # A properties file takes the value without the brackets --add-config needs.
        printf '%s=iterations=8192,password=%s\n' "$mechanism" "$password" >"$request"
        if ! "${KAFKA_JVM[@]}" kafka.admin.ConfigCommand --bootstrap-server "$server" --alter \
            --entity-type users --entity-name "$KAFKA_SCRAM_USER" --add-config-file "$request" \
            >>"$log" 2>&1 9>&-; then
            rm -f "$request"
            fail_start kafka "$log" "could not create the SCRAM user $KAFKA_SCRAM_USER"
        fi
    done
    rm -f "$request" "$data"/.meterline-scram-*
    touch "$stamp"
    say "kafka: SCRAM user $KAFKA_SCRAM_USER ready on the SASL_PLAINTEXT listeners"
}

# Wait until a broker at host:port $2 answers metadata with a leader for every partition (not just
# an open port). Returns 2 if the broker exited while starting.
kafka_wait() {
    local name=$1 address=$2 pidcheck=$3 pidfile=$4 log=$5 deadline
    deadline=$((SECONDS + METERLINE_START_TIMEOUT))
    until probe kafka "$address" 2>/dev/null; do
        sleep 0.3
        # The pid file is written by the child: give it a moment before taking its absence as a death.
        if ! "$pidcheck" >/dev/null && [ -s "$pidfile" ]; then
            return 2
        fi
        if ((SECONDS >= deadline)); then
            probe kafka "$address" || true
            fail_start "$name" "$log" "did not answer within ${METERLINE_START_TIMEOUT}s"
        fi
    done
    say "$name: answering on $address"
}

# The single broker's ports may lie in the kernel's ephemeral range, where a passing client
# connection (or its TIME_WAIT, up to 60 s) can hold one of them when the broker starts; such a
# start is tried again until METERLINE_START_TIMEOUT. Any other exit is a failure.
bind_clash() { tail -n 400 "$1" 2>/dev/null | grep -q "BindException: Address already in use"; }

kafka_write_config() {
    sed -e "s|@PORT@|$METERLINE_KAFKA_PORT|g" \
        -e "s|@SASL_PORT@|$KAFKA_SASL_PORT|g" \
        -e "s|@CONTROLLER_PORT@|$METERLINE_KAFKA_CONTROLLER_PORT|g" \
        -e "s|@DATA_DIR@|$KAFKA_DATA|g" \
        "$ROOT/deploy/local/kafka/server.properties" >"$1"
}

launch_single_kafka() {
    rm -f "$KAFKA_PID"
    launch "$KAFKA_PID" "$KAFKA_STDOUT" "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_CONFIG"
    say "kafka: starting on 127.0.0.1:$METERLINE_KAFKA_PORT (SASL_PLAINTEXT $KAFKA_SASL_PORT)"
}

start_single_kafka() {
    local pid deadline
    kafka_libs_present || die "no Kafka jars in $KAFKA_LIBS; run deploy/local/install.sh"
    ensure_state
    kafka_write_config "$KAFKA_CONFIG.next"
    if pid=$(kafka_pid); then
        grep -qF "PLAINTEXT://127.0.0.1:$METERLINE_KAFKA_PORT," "$KAFKA_CONFIG" ||
            wrong_port kafka "$METERLINE_KAFKA_PORT"
        if ! cmp -s "$KAFKA_CONFIG" "$KAFKA_CONFIG.next"; then
            # A broker started before the configuration changed (a new listener): restart it.
            say "kafka: running with an older configuration; restarting"
            stop_pid kafka "$pid" 120
            rm -f "$KAFKA_PID"
        else
            say "kafka: already running on 127.0.0.1:$METERLINE_KAFKA_PORT"
        fi
    fi
    if ! kafka_pid >/dev/null; then
        for port in "$METERLINE_KAFKA_PORT" "$METERLINE_KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT"; do
            port_taken "$port" && die "kafka: port $port is taken by another process" \
                "(set METERLINE_KAFKA_PORT / METERLINE_KAFKA_CONTROLLER_PORT)"
        done
        mv "$KAFKA_CONFIG.next" "$KAFKA_CONFIG"
        kafka_format "$KAFKA_CONFIG" "$KAFKA_DATA" "$(new_cluster_id)" "$KAFKA_STDOUT"
        launch_single_kafka
    fi
    rm -f "$KAFKA_CONFIG.next"
    deadline=$((SECONDS + METERLINE_START_TIMEOUT))
    until kafka_wait kafka "127.0.0.1:$METERLINE_KAFKA_PORT" kafka_pid "$KAFKA_PID" "$KAFKA_LOG"; do
        if ((SECONDS >= deadline)) || ! bind_clash "$KAFKA_LOG"; then
            fail_start kafka "$KAFKA_LOG" "exited while starting (also see $KAFKA_STDOUT)"
        fi
        say "kafka: a listener port is held by a client connection; starting again in 3s"
        sleep 3
        launch_single_kafka
    done
    kafka_scram_user "$KAFKA_DATA" "127.0.0.1:$METERLINE_KAFKA_PORT" "$KAFKA_STDOUT"
}

stop_single_kafka() {
    local pid
    if pid=$(kafka_pid); then
        stop_pid kafka "$pid" 120
        say "kafka: stopped"
    else
        say "kafka: not running"
    fi
    rm -f "$KAFKA_PID"
}

status_single_kafka() {
    local pid
    if pid=$(kafka_pid); then
        printf '%-12s running  pid %-8s 127.0.0.1:%-6s log %s\n' kafka "$pid" \
            "$METERLINE_KAFKA_PORT" "$KAFKA_LOG"
    else
        printf '%-12s stopped\n' kafka
        return 1
    fi
}

# --- the three-node cluster ---

node_config() { echo "$KAFKA_CLUSTER_CONF_DIR/node$1.properties"; }
node_pidfile() { echo "$KAFKA_CLUSTER_CONF_DIR/node$1.pid"; }
node_logs() { echo "$LOG_DIR/kafka-node$1"; }
node_pid() { live_pid "$(node_pidfile "$1")" "$(node_config "$1")"; }
node1_pid() { node_pid 1; }
node2_pid() { node_pid 2; }
node3_pid() { node_pid 3; }

node_write_config() {
    local n=$1 voters=() m
    for m in "${KAFKA_CLUSTER_NODES[@]}"; do
        voters+=("$m@$(kafka_node_host "$m"):$(kafka_node_controller_port "$m")")
    done
    mkdir -p "$KAFKA_CLUSTER_CONF_DIR" "$KAFKA_CLUSTER_DATA" "$(node_logs "$n")"
    sed -e "s|@NODE_ID@|$n|g" \
        -e "s|@HOST@|$(kafka_node_host "$n")|g" \
        -e "s|@VOTERS@|$(IFS=,; echo "${voters[*]}")|g" \
        -e "s|@PORT@|$(kafka_node_port "$n")|g" \
        -e "s|@SASL_PORT@|$(kafka_node_sasl_port "$n")|g" \
        -e "s|@CONTROLLER_PORT@|$(kafka_node_controller_port "$n")|g" \
        -e "s|@DATA_DIR@|$KAFKA_CLUSTER_DATA/node$n|g" \
        "$ROOT/deploy/local/kafka/cluster.properties" >"$(node_config "$n")"
}

# Launch one node without waiting for it (a node answers only once a quorum of controllers runs).
launch_node() {
    local n=$1 cluster_id port
    if node_pid "$n" >/dev/null; then
        say "kafka-$n: already running on $(kafka_node_host "$n"):$(kafka_node_port "$n")"
        return
    fi
    for port in "$(kafka_node_port "$n")" "$(kafka_node_sasl_port "$n")" "$(kafka_node_controller_port "$n")"; do
        port_taken "$port" "$(kafka_node_host "$n")" &&
            die "kafka-$n: $(kafka_node_host "$n"):$port is taken by another process"
    done
    node_write_config "$n"
    if [ ! -s "$KAFKA_CLUSTER_DATA/cluster.id" ]; then
        new_cluster_id >"$KAFKA_CLUSTER_DATA/cluster.id"
    fi
    cluster_id=$(cat "$KAFKA_CLUSTER_DATA/cluster.id")
    kafka_format "$(node_config "$n")" "$KAFKA_CLUSTER_DATA/node$n" "$cluster_id" \
        "$(node_logs "$n")/stdout.log"
    local jvm
    kafka_jvm jvm "$(node_logs "$n")" "$KAFKA_NODE_HEAP"
    rm -f "$(node_pidfile "$n")"
    launch "$(node_pidfile "$n")" "$(node_logs "$n")/stdout.log" \
        "${jvm[@]}" kafka.Kafka "$(node_config "$n")"
    say "kafka-$n: starting on $(kafka_node_host "$n"):$(kafka_node_port "$n")"
}

start_nodes() {
    local n
    kafka_libs_present || die "no Kafka jars in $KAFKA_LIBS; run deploy/local/install.sh"
    ensure_state
    for n in "$@"; do launch_node "$n"; done
    for n in "$@"; do
        kafka_wait "kafka-$n" "$(kafka_node_host "$n"):$(kafka_node_port "$n")" "node${n}_pid" \
            "$(node_pidfile "$n")" "$(node_logs "$n")/kafka.log" ||
            fail_start "kafka-$n" "$(node_logs "$n")/kafka.log" "exited while starting"
    done
    kafka_scram_user "$KAFKA_CLUSTER_DATA" "$(METERLINE_KAFKA_BROKERS=3 kafka_servers plain)" \
        "$(node_logs 1)/stdout.log"
}

# TERM every node at once: a node stopped last would wait for a controller quorum that is gone.
stop_nodes() {
    local n pid pids=() deadline
    for n in "$@"; do
        if pid=$(node_pid "$n"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$n:$pid")
        else
            say "kafka-$n: not running"
        fi
    done
    deadline=$((SECONDS + 60))
    for entry in "${pids[@]}"; do
        n=${entry%%:*}
        pid=${entry#*:}
        while pid_running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if pid_running "$pid"; then
            say "kafka-$n: still running 60s after TERM; sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "kafka-$n: stopped"
        rm -f "$(node_pidfile "$n")"
    done
}

kill_nodes() {
    local n pid
    for n in "$@"; do
        if pid=$(node_pid "$n"); then
            kill -KILL "$pid"
            while pid_running "$pid"; do sleep 0.1; done
            say "kafka-$n: killed"
        else
            say "kafka-$n: not running"
        fi
        rm -f "$(node_pidfile "$n")"
    done
}

status_nodes() {
    local n pid status=0
    for n in "$@"; do
        if pid=$(node_pid "$n"); then
            printf '%-12s running  pid %-8s %s:%-6s log %s\n' "kafka-$n" "$pid" \
                "$(kafka_node_host "$n")" "$(kafka_node_port "$n")" "$(node_logs "$n")/kafka.log"
        else
            printf '%-12s stopped\n' "kafka-$n"
            status=1
        fi
    done
    return "$status"
}

cluster_mode() { [ "$METERLINE_KAFKA_BROKERS" = 3 ]; }

start_kafka() { if cluster_mode; then start_nodes "${KAFKA_CLUSTER_NODES[@]}"; else start_single_kafka; fi; }
stop_kafka() { if cluster_mode; then stop_nodes "${KAFKA_CLUSTER_NODES[@]}"; else stop_single_kafka; fi; }
status_kafka() { if cluster_mode; then status_nodes "${KAFKA_CLUSTER_NODES[@]}"; else status_single_kafka; fi; }
kill_kafka() {
    local pid
    if cluster_mode; then
        kill_nodes "${KAFKA_CLUSTER_NODES[@]}"
    elif pid=$(kafka_pid); then
        kill -KILL "$pid"
        while pid_running "$pid"; do sleep 0.1; done
        rm -f "$KAFKA_PID"
        say "kafka: killed"
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
check_kafka_mode
if [ "$action" = servers ]; then
    kafka_servers "${1:-plain}"
    exit 0
fi
components=("$@")
[ ${#components[@]} -gt 0 ] || components=("${ALL[@]}")
for component in "${components[@]}"; do
    case $component in postgres | kafka | stripe-mock | kafka-[123]) ;; *) usage ;; esac
done

if [ "$action" != status ] && [ "$action" != servers ]; then
    mkdir -p "$LOCAL_DIR"
    # One start or stop at a time per checkout: concurrent `make up`s must not start two brokers.
    exec 9>"$LOCAL_DIR/ctl.lock"
    flock 9
fi

status=0
for component in "${components[@]}"; do
    case $component in
    kafka-[123])
        node=${component#kafka-}
        case $action in
        start) start_nodes "$node" ;;
        stop) stop_nodes "$node" ;;
        restart) stop_nodes "$node" && start_nodes "$node" ;;
        kill) kill_nodes "$node" ;;
        status) status_nodes "$node" || status=3 ;;
        *) usage ;;
        esac
        continue
        ;;
    esac
    fn=${component//-/_}
    case $action in
    start) "start_$fn" ;;
    stop) "stop_$fn" ;;
    restart) "stop_$fn" && "start_$fn" ;;
    status) "status_$fn" || status=3 ;;
    kill) [ "$component" = kafka ] && kill_kafka || usage ;;
    *) usage ;;
    esac
done
exit "$status"
