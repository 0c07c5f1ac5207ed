#!/usr/bin/env bash
# Brings the whole local stack up (PostgreSQL, Kafka, stripe-mock) and writes .local/env, the settings
# that point the services and the tests at it. Idempotent: a second run finds everything up.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

check_kafka_mode
"$ROOT/deploy/local/ctl.sh" start postgres kafka stripe-mock

# Secrets are generated once per checkout and kept (stack.sh keep_secret), so that keys hashed with
# the pepper and webhooks signed with the secret stay valid across make down / make up.
pepper=$(keep_secret "$LOCAL_DIR/pepper")
webhook_secret=whsec_$(keep_secret "$LOCAL_DIR/stripe-webhook-secret")
scram_password=$(keep_secret "$KAFKA_SCRAM_PASSWORD_FILE")

# How the clients reach Kafka: METERLINE_KAFKA_BROKERS (1 or 3) and METERLINE_KAFKA_AUTH (none or
# scram). The SCRAM listeners are always there; METERLINE_LOCAL_KAFKA_SCRAM_* name them for tests.
kafka_settings="export KAFKA_BOOTSTRAP_SERVERS=$(kafka_servers plain)"
if [ "$METERLINE_KAFKA_AUTH" = scram ]; then
    kafka_settings="export KAFKA_BOOTSTRAP_SERVERS=$(kafka_servers sasl)
export KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT
export KAFKA_SASL_MECHANISM=SCRAM-SHA-512
export KAFKA_SASL_USERNAME=$KAFKA_SCRAM_USER
export KAFKA_SASL_PASSWORD=$scram_password"
fi
if [ "$METERLINE_KAFKA_BROKERS" = 3 ]; then
    kafka_settings="$kafka_settings
export METERLINE_TOPIC_REPLICATION_FACTOR=3
export METERLINE_TOPIC_MIN_INSYNC_REPLICAS=2"
fi

(
    umask 077
    cat >"$LOCAL_DIR/env.partial" <<EOF
# Written by deploy/local/up.sh: the local stack of this checkout. Use: . .local/env
export DATABASE_URL=postgresql+psycopg://meterline:meterline@127.0.0.1:$METERLINE_PG_PORT/meterline
$kafka_settings
export METERLINE_KAFKA_BROKERS=$METERLINE_KAFKA_BROKERS
export METERLINE_KAFKA_AUTH=$METERLINE_KAFKA_AUTH
export METERLINE_LOCAL_KAFKA_SCRAM_SERVERS=$(kafka_servers sasl)
export METERLINE_LOCAL_KAFKA_SCRAM_USERNAME=$KAFKA_SCRAM_USER
export METERLINE_LOCAL_KAFKA_SCRAM_PASSWORD=$scram_password
export STRIPE_API_BASE=http://127.0.0.1:$METERLINE_STRIPE_MOCK_PORT
export STRIPE_API_KEY=sk_test_123
export METERLINE_API_KEY_PEPPER=$pepper
export METERLINE_STRIPE_WEBHOOK_SECRET=$webhook_secret
export METERLINE_KAFKA_LIBS='$KAFKA_LIBS'
export METERLINE_LOCAL_CTL='$ROOT/deploy/local/ctl.sh'
EOF
    mv "$LOCAL_DIR/env.partial" "$LOCAL_DIR/env"
)

say ""
say "local stack of $ROOT:"
"$ROOT/deploy/local/ctl.sh" status
say "settings: $LOCAL_DIR/env (load with: . .local/env)"
