"""Canonical msgpack encoding and field validation for every wire type.

Theory of operation
-------------------
Every wire value is a msgpack *array* whose first element is a type tag with
a version (``"R1"``).  Bytes are ``bin``, integers use the smallest msgpack
form, there are no maps and no floats.  With those rules the Python packer
emits exactly one encoding for one value, so "canonical" can be checked
cheaply: decode, validate every field, re-encode, compare bytes.  Anything
that fails — bad msgpack, a wrong type, an out-of-bounds length, trailing
bytes, a non-minimal integer — raises the single :class:`MalformedMessage`.

Signed types sign ``DOMAIN + tag + b"\\0" + body`` where ``body`` is the
canonical encoding of the unsigned fields (everything but tag and
signature).  The tag in the signed bytes is domain separation: a reading's
signature can never pass as a block's or a transaction's.

A type declares its fields as ``(name, check)`` pairs; ``check`` validates
one decoded value and returns it in its Python form (lists become tuples).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from meshhealth.errors import MalformedMessage

DOMAIN = b"meshhealth/v1/"
MAX_U64 = 2**64 - 1
MAX_U32 = 2**32 - 1

Check = Callable[[Any], Any]
Fields = tuple[tuple[str, Check], ...]


def pack(value: Any) -> bytes:
    """Canonical msgpack of a value made of lists/tuples, ints, str and bytes."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes, *, max_len: int) -> Any:
    """Decode untrusted msgpack, bounded by ``max_len`` before any work."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("not bytes")
    if len(data) > max_len:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the {max_len}-byte bound")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises a zoo of types; translate once
        raise MalformedMessage(f"undecodable msgpack: {type(exc).__name__}") from exc


def bin_size(n: int) -> int:
    """Bytes of an ``n``-byte ``bin`` in :func:`pack`'s output: its header, then the bytes."""
    return n + (2 if n < 1 << 8 else 3 if n < 1 << 16 else 5)


def signing_bytes(tag: str, body: Sequence[Any]) -> bytes:
    return DOMAIN + tag.encode() + b"\0" + pack(list(body))


# --- field checks ---------------------------------------------------------


def b_exact(n: int) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes or len(v) != n:
            raise MalformedMessage(f"expected {n} bytes")
        return v

    return check


def b_max(n: int) -> Check:
    def check(v: Any) -> bytes:
        if type(v) is not bytes or len(v) > n:
            raise MalformedMessage(f"expected at most {n} bytes")
        return v

    return check


def u_int(lo: int = 0, hi: int = MAX_U64) -> Check:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise MalformedMessage(f"expected an integer in [{lo}, {hi}]")
        return v

    return check


_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")


def name_str(v: Any) -> str:
    if type(v) is not str or not _NAME.fullmatch(v):
        raise MalformedMessage("expected a short lowercase name")
    return v


def array(item: Check, max_items: int) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) is not list or len(v) > max_items:
            raise MalformedMessage(f"expected a list of at most {max_items} items")
        return tuple(item(x) for x in v)

    return check


def record(fields: Fields, build: Callable[..., Any]) -> Check:
    """A nested fixed-length array, built into a value by ``build(*fields)``."""

    def check(v: Any) -> Any:
        if type(v) is not list or len(v) != len(fields):
            raise MalformedMessage(f"expected a record of {len(fields)} fields")
        return build(*(chk(x) for (_, chk), x in zip(fields, v, strict=True)))

    return check


def decode_fields(data: bytes, tag: str, fields: Fields, *, max_len: int) -> list[Any]:
    """Decode ``[tag, *fields]`` and return the validated field values.

    Rejects trailing data and non-canonical encodings.
    """
    raw = unpack(data, max_len=max_len)
    if type(raw) is not list or len(raw) != len(fields) + 1:
        raise MalformedMessage(f"expected a {tag} array of {len(fields) + 1} elements")
    if raw[0] != tag:
        raise MalformedMessage(f"expected tag {tag!r}, got {str(raw[0])[:8]!r}")
    values = [chk(v) for (_, chk), v in zip(fields, raw[1:], strict=True)]
    if pack(raw) != bytes(data):
        raise MalformedMessage("non-canonical encoding")
    return values


def peek_tag(data: bytes) -> str:
    """The type tag of an encoded wire value, without decoding the rest."""
    if len(data) < 4 or (not 0x90 <= data[0] <= 0x9F and data[0] != 0xDC):
        raise MalformedMessage("not a tagged wire array")
    pos = 1 if data[0] <= 0x9F else 3
    if data[pos] != 0xA2:  # fixstr of length 2
        raise MalformedMessage("not a tagged wire array")
    try:
        return bytes(data[pos + 1 : pos + 3]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedMessage("bad tag") from exc
