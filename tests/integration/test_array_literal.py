"""shared.db.array_literal: the text PostgreSQL parses back into exactly the values given."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from shared.db import array_literal

# What PostgreSQL can store as text: no NUL, no lone surrogates (ingest and the aggregator refuse
# both before any statement).
storable = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
)

ROUND_TRIP = sa.text(
    "SELECT v FROM unnest(CAST(:values AS text[])) WITH ORDINALITY AS a(v, n) ORDER BY n"
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(storable, st.none()), max_size=20))
def test_any_storable_text_comes_back_as_it_was(engine: Engine, values: list[str | None]) -> None:
    with engine.connect() as connection:
        back = connection.execute(ROUND_TRIP, {"values": array_literal(values)}).scalars().all()

    assert back == values


def test_the_characters_of_array_syntax_stay_text(engine: Engine) -> None:
    values = ["a,b", "{x}", 'q"uote', "back\\slash", "\\", '"', " sp ", "NULL", "", "ü€"]

    with engine.connect() as connection:
        back = connection.execute(ROUND_TRIP, {"values": array_literal(values)}).scalars().all()

    assert back == values


def test_uuids_cast_to_uuid_arrays(engine: Engine) -> None:
    ids = [uuid.uuid4() for _ in range(3)]

    with engine.connect() as connection:
        back = connection.execute(
            sa.text("SELECT CAST(:ids AS uuid[])"), {"ids": array_literal(ids)}
        ).scalar_one()

    assert back == ids
