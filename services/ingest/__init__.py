"""HTTP ingest: authenticate by API key, validate usage events, publish them to Kafka."""
