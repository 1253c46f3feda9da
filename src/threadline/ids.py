"""Identifiers and secrets.

Session ids sort by creation time (48-bit millisecond prefix, like a ULID) so that new rows
land at the right edge of the primary-key index instead of scattering across it.
"""

from __future__ import annotations

import os
import secrets
import time

__all__ = ["SECRET_KEY_PREFIX", "new_id", "new_secret_key", "new_signing_secret"]

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
SECRET_KEY_PREFIX = "tl_sk_"


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """``<prefix>_`` + 10 chars of milliseconds + 16 chars of randomness (26 chars, sortable)."""
    millis = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_base32(millis, 10)}{_base32(random_bits, 16)}"


def new_secret_key() -> str:
    return SECRET_KEY_PREFIX + secrets.token_urlsafe(32)


def new_signing_secret() -> str:
    return secrets.token_urlsafe(48)
