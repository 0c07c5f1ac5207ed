"""Drop-in ingest for clients written against other metering APIs (OpenMeter, Lago): each wire
shape is translated into Meterline events and takes the /v1/events path from there (same keys,
same validation, all or nothing, same topic and ledger)."""
