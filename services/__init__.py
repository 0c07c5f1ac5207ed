"""The services: ingest, aggregator, billing."""
