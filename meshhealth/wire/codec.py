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


# Decoding builds Python objects, far bigger than their bytes: an empty array is one
# byte on the wire and ~64 bytes decoded.  So a message past SCAN_FROM bytes is first
# walked without building anything, counting its objects and arrays against bounds.
SCAN_FROM = 64 * 1024  # below it, the worst decode is ~4 MiB: not worth a walk
ARRAY_BYTES = 32  # the default: at most one array per 32 bytes (+16), ~2x the input decoded
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin/str: length bytes


def scan(data: bytes | bytearray | memoryview, *, max_items: int, max_arrays: int) -> None:
    """Walk msgpack without decoding it: :class:`MalformedMessage` if it holds more than
    ``max_items`` objects or ``max_arrays`` arrays, or any map or ext (the wire has none),
    or is truncated.  Costs O(objects walked), allocates nothing per object."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    end, pos, todo, items, arrays = len(buf), 0, 1, 0, 0
    while todo:
        if pos >= end:
            raise MalformedMessage("truncated msgpack")
        b = buf[pos]
        pos += 1
        todo -= 1
        items += 1
        if items > max_items:
            raise MalformedMessage(f"more than {max_items} msgpack objects")
        if b < 0x80 or b >= 0xE0:
            continue
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            arrays += 1
            if arrays > max_arrays:
                raise MalformedMessage(f"more than {max_arrays} msgpack arrays")
            if b <= 0x9F:
                n = b & 0x0F
            else:
                w = 2 if b == 0xDC else 4
                n = int.from_bytes(buf[pos : pos + w], "big")
                pos += w
            if n > max_items:
                raise MalformedMessage(f"an array of {n} items (at most {max_items})")
            todo += n
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in _SIZED:
            w = _SIZED[b]
            pos += w + int.from_bytes(buf[pos : pos + w], "big")
        elif b in _FIXED:
            pos += _FIXED[b]
        else:
            raise MalformedMessage("msgpack map or ext (the wire has neither)")
    if pos > end:
        raise MalformedMessage("truncated msgpack")


def _no_map(pairs: Any) -> Any:
    raise ValueError("a msgpack map (the wire has none)")


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("a msgpack ext (the wire has none)")


def unpack(
    data: bytes, *, max_len: int, max_items: int | None = None, max_arrays: int | None = None
) -> Any:
    """Decode untrusted msgpack, bounded by ``max_len`` before any work, and by object
    counts: at most ``max_items`` objects (default: no bound past the bytes) and
    ``max_arrays`` arrays (default: one per :data:`ARRAY_BYTES` bytes, + 16), so that the
    decoded objects stay within a small multiple of the input bytes.  No maps, no ext."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("not bytes")
    if len(data) > max_len:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the {max_len}-byte bound")
    n = len(data)
    items = n if max_items is None else max_items
    if n > SCAN_FROM:
        arrays = n // ARRAY_BYTES + 16 if max_arrays is None else max_arrays
        scan(data, max_items=items, max_arrays=arrays)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=min(items, max(n, 1)),
            max_bin_len=max_len,
            max_str_len=max_len,
            max_map_len=0,
            max_ext_len=0,
            object_pairs_hook=_no_map,  # even an empty one
            ext_hook=_no_ext,
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
