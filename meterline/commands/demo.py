"""`meterline demo`: being written."""

from __future__ import annotations


def demo() -> None:
    """Run the pipeline end to end on the local components."""
