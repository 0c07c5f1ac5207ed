"""Alembic environment and revisions: the only way Meterline's schema changes."""
