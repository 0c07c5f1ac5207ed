#!/usr/bin/env bash
# Brings the whole local stack up (PostgreSQL, Kafka, stripe-mock) and writes .local/env, the settings
# that point the services and the tests at it. Idempotent: a second run finds everything up.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

"$ROOT/deploy/local/ctl.sh" start postgres kafka stripe-mock

# Secrets are generated once per checkout and kept, so that keys hashed with the pepper and webhooks
# signed with the secret stay valid across make down / make up.
keep_secret() {
    local file=$1
    if [ ! -s "$file" ]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$file")
    fi
    cat "$file"
}
pepper=$(keep_secret "$LOCAL_DIR/pepper")
webhook_secret=whsec_$(keep_secret "$LOCAL_DIR/stripe-webhook-secret")

(
    umask 077
    cat >"$LOCAL_DIR/env.partial" <<EOF
# Written by deploy/local/up.sh: the local stack of this checkout. Use: . .local/env
export DATABASE_URL=postgresql+psycopg://meterline:meterline@127.0.0.1:$METERLINE_PG_PORT/meterline
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$METERLINE_KAFKA_PORT
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
