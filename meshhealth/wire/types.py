"""The wire types: frozen, slotted dataclasses with one canonical encoding.

Sizes are bounded here, before any signature or state check runs:
a reading is at most ``MAX_READING`` bytes, a control transaction at most
``MAX_TX``, a block header at most ``MAX_HEADER``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

import nacl.exceptions
import nacl.signing

from meshhealth.errors import InvalidSignature, MalformedMessage
from meshhealth.wire.codec import (
    MAX_U32,
    Fields,
    array,
    b_exact,
    b_max,
    decode_fields,
    name_str,
    pack,
    peek_tag,
    record,
    signing_bytes,
    u_int,
)

MAX_READING = 4096
MAX_TX = 16384
MAX_HEADER = 32768  # room for MAX_LINKS links of up to 78 bytes
MAX_LINKS = 256
KEY = b_exact(32)
SIG = b_exact(64)
CHAIN_ID = b_exact(8)
MIN_EPOCH_MS = 1_000
MAX_EPOCH_MS = 7 * 86_400_000
MAX_SPAN_MS = 3_600_000  # a reading covers at most an hour (the index relies on it)

T = TypeVar("T", bound="Signed")


def _wire(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_wire(v) for v in value]
    if hasattr(value, "to_wire"):
        return value.to_wire()
    return value


class Signed:
    """Mixin for a signed wire type: fields, then a 64-byte signature."""

    TAG: ClassVar[str]
    FIELDS: ClassVar[Fields]
    MAX_LEN: ClassVar[int]
    SIGNER: ClassVar[str]  # name of the field holding the signer's public key
    sig: bytes

    def body(self) -> list[Any]:
        return [_wire(getattr(self, name)) for name, _ in self.FIELDS]

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.TAG, self.body())

    def encode(self) -> bytes:
        return pack([self.TAG, *self.body(), self.sig])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        values = decode_fields(data, cls.TAG, (*cls.FIELDS, ("sig", SIG)), max_len=cls.MAX_LEN)
        return cls(*values)

    @classmethod
    def create(cls, key: nacl.signing.SigningKey, **fields: Any) -> Self:
        """Build and sign; the signer field is filled from ``key``."""
        fields[cls.SIGNER] = bytes(key.verify_key)
        unsigned = cls(**fields, sig=b"\0" * 64)  # type: ignore[call-arg]
        sig = key.sign(unsigned.signing_bytes()).signature
        return cls(**fields, sig=sig)  # type: ignore[call-arg]

    @property
    def signer(self) -> bytes:
        return getattr(self, self.SIGNER)  # type: ignore[no-any-return]

    def verify(self) -> Self:
        try:
            nacl.signing.VerifyKey(self.signer).verify(self.signing_bytes(), self.sig)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
            raise InvalidSignature(f"bad {self.TAG} signature") from exc
        return self


@dataclass(frozen=True, slots=True)
class Reading(Signed):
    """One device-signed batch of samples of one stream.

    ``ciphertext`` is XChaCha20-Poly1305 under the patient's message key of
    ``epoch``, with the encoded reading header as associated data; only
    stream, time span and key epoch are in clear.
    """

    TAG: ClassVar[str] = "R1"
    MAX_LEN: ClassVar[int] = MAX_READING
    SIGNER: ClassVar[str] = "device"
    FIELDS: ClassVar[Fields] = (
        ("device", KEY),
        ("patient", KEY),
        ("stream", name_str),
        ("seq", u_int(1)),
        ("t_ms", u_int()),
        ("span_ms", u_int(0, MAX_SPAN_MS)),
        ("chain_id", CHAIN_ID),
        ("epoch", u_int(0, MAX_U32)),
        ("nonce", b_exact(24)),
        ("ciphertext", b_max(MAX_READING)),
    )

    device: bytes
    patient: bytes
    stream: str
    seq: int
    t_ms: int
    span_ms: int
    chain_id: bytes
    epoch: int
    nonce: bytes
    ciphertext: bytes
    sig: bytes

    @property
    def t_last_ms(self) -> int:
        return self.t_ms + self.span_ms

    def associated_data(self) -> bytes:
        """What the AEAD binds the ciphertext to: every clear header field."""
        return pack(
            [
                self.TAG,
                self.device,
                self.patient,
                self.stream,
                self.seq,
                self.t_ms,
                self.span_ms,
                self.chain_id,
                self.epoch,
            ]
        )


def _streamkey(*v: Any) -> StreamKey:
    return StreamKey(*v)


@dataclass(frozen=True, slots=True)
class StreamKey:
    """A patient's key chain for one stream, as handed to a device.

    ``sealed`` is ``K(key_epoch)`` sealed (X25519 SealedBox) to the device.
    """

    stream: str
    chain_id: bytes
    start_epoch: int
    epoch_ms: int
    key_epoch: int
    sealed: bytes

    FIELDS: ClassVar[Fields] = (
        ("stream", name_str),
        ("chain_id", CHAIN_ID),
        ("start_epoch", u_int(0, MAX_U32)),
        ("epoch_ms", u_int(MIN_EPOCH_MS, MAX_EPOCH_MS)),
        ("key_epoch", u_int(0, MAX_U32)),
        ("sealed", b_exact(80)),
    )

    def to_wire(self) -> list[Any]:
        return [
            self.stream,
            self.chain_id,
            self.start_epoch,
            self.epoch_ms,
            self.key_epoch,
            self.sealed,
        ]


@dataclass(frozen=True, slots=True)
class EnrollDevice(Signed):
    """Patient-signed: ``device`` may publish these streams for ``patient``."""

    TAG: ClassVar[str] = "E1"
    MAX_LEN: ClassVar[int] = MAX_TX
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (
        ("patient", KEY),
        ("device", KEY),
        ("ts_ms", u_int()),
        ("streams", array(record(StreamKey.FIELDS, _streamkey), 32)),
    )

    patient: bytes
    device: bytes
    ts_ms: int
    streams: tuple[StreamKey, ...]
    sig: bytes

    def __post_init__(self) -> None:
        names = [s.stream for s in self.streams]
        if not names or len(set(names)) != len(names):
            raise MalformedMessage("an enrolment names each stream once, and at least one")
        for s in self.streams:
            if s.key_epoch < s.start_epoch:
                raise MalformedMessage("key_epoch precedes the chain's start")


def _link(*v: Any) -> Link:
    return Link(*v)


@dataclass(frozen=True, slots=True)
class Link:
    """A cross-link: the latest validated head ``(node, height, hash)`` of another chain."""

    node: bytes
    height: int
    hash: bytes

    FIELDS: ClassVar[Fields] = (("node", KEY), ("height", u_int()), ("hash", KEY))

    def to_wire(self) -> list[Any]:
        return [self.node, self.height, self.hash]


@dataclass(frozen=True, slots=True)
class BlockHeader(Signed):
    """Node-signed header; it commits to the body's entries by Merkle root."""

    TAG: ClassVar[str] = "B1"
    MAX_LEN: ClassVar[int] = MAX_HEADER
    SIGNER: ClassVar[str] = "node"
    FIELDS: ClassVar[Fields] = (
        ("network", KEY),
        ("node", KEY),
        ("height", u_int()),
        ("prev", KEY),
        ("ts_ms", u_int()),
        ("root", KEY),
        ("count", u_int(0, MAX_U32)),
        ("links", array(record(Link.FIELDS, _link), MAX_LINKS)),
    )

    network: bytes
    node: bytes
    height: int
    prev: bytes
    ts_ms: int
    root: bytes
    count: int
    links: tuple[Link, ...]
    sig: bytes


@dataclass(frozen=True, slots=True)
class Receipt(Signed):
    """Node-signed: every reading of ``device`` up to ``seq`` is committed."""

    TAG: ClassVar[str] = "A1"
    MAX_LEN: ClassVar[int] = 1024
    SIGNER: ClassVar[str] = "node"
    FIELDS: ClassVar[Fields] = (
        ("network", KEY),
        ("node", KEY),
        ("device", KEY),
        ("seq", u_int()),
        ("height", u_int()),
        ("ts_ms", u_int()),
    )

    network: bytes
    node: bytes
    device: bytes
    seq: int
    height: int
    ts_ms: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class EquivocationProof:
    """Two different headers one node signed for one height of its chain.

    It needs no signature of its own: the two header signatures are the
    evidence, and anyone can check them.  A node that finds such a pair
    puts the proof in its next block, so the proof travels, and is kept,
    like every other entry.
    """

    TAG: ClassVar[str] = "Q1"
    MAX_LEN: ClassVar[int] = 2 * MAX_HEADER + 16
    FIELDS: ClassVar[Fields] = (("first", b_max(MAX_HEADER)), ("second", b_max(MAX_HEADER)))

    first: bytes
    second: bytes

    def encode(self) -> bytes:
        return pack([self.TAG, self.first, self.second])

    @classmethod
    def decode(cls, data: bytes) -> EquivocationProof:
        return cls(*decode_fields(data, cls.TAG, cls.FIELDS, max_len=cls.MAX_LEN))

    @classmethod
    def of(cls, a: bytes, b: bytes) -> EquivocationProof:
        """The proof for two header encodings, in a canonical (sorted) order."""
        return cls(*sorted((a, b)))

    def headers(self) -> tuple[BlockHeader, BlockHeader]:
        """Both headers, decoded and checked: one node, one network, one height, two blocks."""
        if self.first >= self.second:
            raise MalformedMessage("an equivocation proof holds two different, sorted headers")
        a, b = BlockHeader.decode(self.first), BlockHeader.decode(self.second)
        if (a.node, a.network, a.height) != (b.node, b.network, b.height):
            raise MalformedMessage("the headers are not of one node, network and height")
        return a, b

    @property
    def accused(self) -> bytes:
        return self.headers()[0].node

    def verify(self) -> EquivocationProof:
        for hdr in self.headers():
            hdr.verify()
        return self


Entry = Reading | EnrollDevice | EquivocationProof
ENTRY_TYPES: dict[str, Any] = {"R1": Reading, "E1": EnrollDevice, "Q1": EquivocationProof}


def decode_entry(data: bytes) -> Entry:
    """Decode one block entry (a reading or a control transaction)."""
    cls = ENTRY_TYPES.get(peek_tag(data))
    if cls is None:
        raise MalformedMessage("unknown entry type")
    entry: Entry = cls.decode(data)
    return entry
