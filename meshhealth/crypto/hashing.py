"""BLAKE2b-256 everywhere a hash is needed (block ids, entry ids, network id)."""

from __future__ import annotations

import hashlib

HASH_LEN = 32


def h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_LEN).digest()


def short(key: bytes) -> str:
    """The short, human form of a 32-byte id: its first 8 hex characters."""
    return key.hex()[:8]
