"""Wire types and their one canonical msgpack encoding."""

from meshhealth.wire.types import (
    AccessLog,
    BlockHeader,
    Control,
    EnrollDevice,
    EquivocationProof,
    Erase,
    Grant,
    GrantStream,
    Link,
    Reading,
    Receipt,
    Revoke,
    StreamKey,
    decode_control,
    decode_entry,
)

__all__ = [
    "AccessLog",
    "BlockHeader",
    "Control",
    "EnrollDevice",
    "EquivocationProof",
    "Erase",
    "Grant",
    "GrantStream",
    "Link",
    "Reading",
    "Receipt",
    "Revoke",
    "StreamKey",
    "decode_control",
    "decode_entry",
]
