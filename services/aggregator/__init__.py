"""The aggregator: Kafka usage events -> event ledger + usage_records windows (Faust)."""
