"""API key format, checksum and keyed hashing (DESIGN.md section 3)."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from shared.keys import generate_key, hash_key, hashes_match, parse_prefix

PEPPER = b"p" * 32


def test_key_has_documented_format_and_public_prefix() -> None:
    new = generate_key("live")
    assert new.plaintext.startswith(f"ml_live_{new.prefix}_")
    assert parse_prefix(new.plaintext) == new.prefix
    assert generate_key("test").plaintext.startswith("ml_test_")


def test_secret_carries_at_least_256_bits() -> None:
    new = generate_key()
    secret = new.plaintext.split("_")[3][:-6]
    decoded = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    assert len(decoded) * 8 >= 256


def test_keys_are_unique() -> None:
    assert len({generate_key().plaintext for _ in range(500)}) == 500


@given(st.integers(min_value=9, max_value=80), st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"))
def test_mistyped_key_fails_checksum(position: int, replacement: str) -> None:
    key = generate_key().plaintext
    mutated = key[:position] + replacement + key[position + 1 :]
    if mutated != key:
        assert parse_prefix(mutated) is None


def test_hash_is_keyed_by_pepper() -> None:
    key = generate_key().plaintext
    assert hash_key(key, PEPPER) != hash_key(key, b"q" * 32)
    assert hashes_match(hash_key(key, PEPPER), hash_key(key, PEPPER))
    assert key.encode() not in hash_key(key, PEPPER)
    assert len(hash_key(key, PEPPER)) == 32


def test_garbage_is_not_a_key() -> None:
    for text in ("", "Bearer x", "ml_live_", "ml_prod_abcdefgh_" + "a" * 58, "x" * 500):
        assert parse_prefix(text) is None


def test_operator_tokens_and_api_keys_never_parse_as_each_other() -> None:
    from shared.keys import generate_key, generate_operator_token, parse_operator_prefix

    token = generate_operator_token()
    key = generate_key()
    assert parse_operator_prefix(token.plaintext) == token.prefix
    assert parse_prefix(token.plaintext) is None
    assert parse_operator_prefix(key.plaintext) is None


def test_a_mistyped_operator_token_fails_its_checksum() -> None:
    from shared.keys import generate_operator_token, parse_operator_prefix

    token = generate_operator_token().plaintext
    typo = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert parse_operator_prefix(typo) is None
