"""Wire types and their one canonical msgpack encoding."""

from meshhealth.wire.types import (
    BlockHeader,
    EnrollDevice,
    EquivocationProof,
    Link,
    Reading,
    Receipt,
    StreamKey,
    decode_entry,
)

__all__ = [
    "BlockHeader",
    "EnrollDevice",
    "EquivocationProof",
    "Link",
    "Reading",
    "Receipt",
    "StreamKey",
    "decode_entry",
]
