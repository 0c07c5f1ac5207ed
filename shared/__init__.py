"""Meterline's common package: settings, models, database access, event schema and API keys."""
