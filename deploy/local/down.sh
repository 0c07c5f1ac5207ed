#!/usr/bin/env bash
# Stops the local stack of this checkout. Keeps its data and secrets, unless given --purge, which also
# deletes the PostgreSQL and Kafka data and everything in .local/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"

case ${1:-} in
"" | --purge) ;;
*)
    say "usage: $0 [--purge]" >&2
    exit 2
    ;;
esac

# The nodes of the three-broker cluster too, whichever mode this shell is in.
"$ROOT/deploy/local/ctl.sh" stop stripe-mock kafka kafka-1 kafka-2 kafka-3 postgres

if [ "${1:-}" = --purge ]; then
    say "purging $STATE_DIR and $LOCAL_DIR"
    rm -rf "$STATE_DIR" "$LOCAL_DIR"
fi
