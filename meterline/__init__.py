"""Meterline's public face: the `meterline` command line and the Python client for services."""
