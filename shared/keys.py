"""API key format, generation and keyed hashing (DESIGN.md section 3). Pure: no database here.

A key reads `ml_<env>_<prefix>_<secret><check>`: the prefix is public and shown in lists; the secret
carries 256 bits from `secrets`; a 6-character checksum lets a mistyped key be refused without a
database round trip. Only HMAC-SHA-256(pepper, key) is stored.

Operator tokens (the console and admin API) read `mlop_<prefix>_<secret><check>` and are built and
hashed the same way; the two formats never parse as each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

_PREFIX_BYTES = 6  # 8 base32 characters of public prefix
_SECRET_BYTES = 32  # 256 bits
_KEY_RE = re.compile(
    r"^ml_(live|test)_(?P<prefix>[a-z2-7]{8})_([a-z2-7]{52})(?P<check>[a-z2-7]{6})$"
)
_OPERATOR_RE = re.compile(r"^mlop_(?P<prefix>[a-z2-7]{8})_([a-z2-7]{52})(?P<check>[a-z2-7]{6})$")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def _checksum(body: str) -> str:
    # The first 6 base32 characters of the big-endian CRC-32 (its top 30 bits), computed
    # without base64's machinery: every request's key is checked before anything else.
    crc = zlib.crc32(body.encode())
    return "".join(_B32[(crc >> shift) & 31] for shift in (27, 22, 17, 12, 7, 2))


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly minted key. `plaintext` exists only here, to be shown once."""

    plaintext: str
    prefix: str


def _mint(head: str) -> NewKey:
    prefix = _b32(secrets.token_bytes(_PREFIX_BYTES))[:8]
    secret = _b32(secrets.token_bytes(_SECRET_BYTES))
    body = f"{head}_{prefix}_{secret}"
    return NewKey(plaintext=body + _checksum(body), prefix=prefix)


def _checked_prefix(plaintext: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.match(plaintext)
    if match is None:
        return None
    body = plaintext[:-6]
    if not hmac.compare_digest(_checksum(body), match.group("check")):
        return None
    return match.group("prefix")


def generate_key(environment: str = "live") -> NewKey:
    return _mint(f"ml_{environment}")


def parse_prefix(plaintext: str) -> str | None:
    """The public prefix of a well-formed key with a valid checksum, else None."""
    return _checked_prefix(plaintext, _KEY_RE)


def generate_operator_token() -> NewKey:
    return _mint("mlop")


def parse_operator_prefix(plaintext: str) -> str | None:
    """The public prefix of a well-formed operator token with a valid checksum, else None."""
    return _checked_prefix(plaintext, _OPERATOR_RE)


def hash_key(plaintext: str, pepper: bytes) -> bytes:
    # hmac.digest: the one-shot C path (a third of hmac.new's cost; every request pays it).
    return hmac.digest(pepper, plaintext.encode(), hashlib.sha256)


def hashes_match(stored: bytes, presented: bytes) -> bool:
    return hmac.compare_digest(stored, presented)
