#!/usr/bin/env bash
# Installs what the local stack and the tests need, once: system packages, the Python venv, the Kafka
# jars and stripe-mock. Idempotent, and fast when everything is already there.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

mkdir -p "$LOCAL_DIR"
# Two engineers (or two make targets) installing at once would race on the venv and the cache.
exec 8>"$LOCAL_DIR/install.lock"
flock 8

# --- system packages --------------------------------------------------------------------------
missing=()
# An older server than PG_MIN_MAJOR counts as missing: Debian's `postgresql` is 15 or newer from
# bookworm on (on an older release, install postgresql-15 or newer from apt.postgresql.org).
[ -n "$(pg_usable_bindir)" ] || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v java >/dev/null 2>&1 || missing+=(default-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# The console's browser tests drive Debian's Chromium through Playwright (its own browser download
# is not used).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -eq 0 ]; then
    say "system packages: present"
elif is_root; then
    say "system packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "system packages: missing ${missing[*]}; not root, so skipping apt" \
        "(as root: apt-get install ${missing[*]})"
fi

# --- Python venv ------------------------------------------------------------------------------
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    say "venv: creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
fi
if [ -f "$ROOT/pyproject.toml" ]; then
    # The server depends on the client distribution, which lives in clients/python: pip installs
    # it from that folder in the same run, so it never looks for it on a package index.
    stamp="$ROOT/.venv/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" |
        sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        say "venv: up to date with pyproject.toml"
    else
        say "venv: pip install -e clients/python -e '.[dev]' (log: $LOG_DIR/pip.log)"
        mkdir -p "$LOG_DIR"
        if ! (cd "$ROOT" && "$ROOT/.venv/bin/python" -m pip install -e clients/python -e '.[dev]') \
            >"$LOG_DIR/pip.log" 2>&1; then
            tail -n 30 "$LOG_DIR/pip.log" >&2
            die "pip install failed; the whole log is $LOG_DIR/pip.log"
        fi
        rm -f "$ROOT"/.venv/.installed-*
        touch "$stamp"
    fi
else
    say "venv: no pyproject.toml yet; skipping pip install"
fi

# --- Kafka jars -------------------------------------------------------------------------------
if kafka_libs_present; then
    say "kafka $KAFKA_VERSION: jars present in $KAFKA_LIBS"
else
    say "kafka $KAFKA_VERSION: fetching jars from Maven Central into $KAFKA_LIBS"
    work="$CACHE_DIR/kafka-$KAFKA_VERSION"
    mkdir -p "$work"
    cp "$ROOT/deploy/local/kafka/pom.xml" "$work/pom.xml"
    rm -rf "$KAFKA_LIBS.partial"
    # Into a side folder first, so that an interrupted download is never taken for a complete one.
    # The plugin version is pinned so that every machine resolves the same jars the same way.
    mvn -q -B -Dstyle.color=never -f "$work/pom.xml" \
        org.apache.maven.plugins:maven-dependency-plugin:2.8:copy-dependencies \
        -DoutputDirectory="$KAFKA_LIBS.partial"
    rm -rf "$KAFKA_LIBS"
    mv "$KAFKA_LIBS.partial" "$KAFKA_LIBS"
    kafka_libs_present || die "maven finished but $KAFKA_LIBS lacks the Kafka jars"
fi

# --- stripe-mock ------------------------------------------------------------------------------
# stripe-mock reports no version of its own (`-version` prints "master"), so a stamp beside it
# records which one was installed; a binary without a stamp is taken as it is.
stamp="$STRIPE_MOCK_BIN.version"
if [ -x "$STRIPE_MOCK_BIN" ] && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" = "$STRIPE_MOCK_VERSION" ]; }; then
    say "stripe-mock $STRIPE_MOCK_VERSION: present at $STRIPE_MOCK_BIN"
else
    say "stripe-mock $STRIPE_MOCK_VERSION: go install into $CACHE_DIR/bin"
    mkdir -p "$CACHE_DIR/bin"
    GOBIN="$CACHE_DIR/bin" go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION"
    echo "$STRIPE_MOCK_VERSION" >"$stamp"
fi
