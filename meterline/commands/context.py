"""What every command needs: validated settings and an engine, built once per invocation."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.engine import Engine

from shared.db import check_database, create_sync_engine
from shared.settings import Settings, get_settings


def settings() -> Settings:
    return get_settings()


@lru_cache(maxsize=1)
def engine() -> Engine:
    """An engine whose database answered; DatabaseUnavailable (one clear line) otherwise."""
    built = create_sync_engine(settings())
    check_database(built)
    return built
