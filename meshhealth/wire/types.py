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

from meshhealth.crypto.hashing import h
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
            tag = getattr(self, "tag", self.TAG)  # a type with two tags (E1/E2) says which
            raise InvalidSignature(f"bad {tag} signature") from exc
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


def _each_stream_once(streams: tuple[Any, ...], what: str) -> None:
    names = [s.stream for s in streams]
    if not names or len(set(names)) != len(names):
        raise MalformedMessage(f"{what} names each stream once, and at least one")


class Record:
    """Mixin for a record nested in a wire type: its ``FIELDS``, in order, as an array."""

    __slots__ = ()
    FIELDS: ClassVar[Fields]

    def to_wire(self) -> list[Any]:
        return [getattr(self, name) for name, _ in self.FIELDS]


# how a stream's key chain is described, to a device (StreamKey) and to a grantee (GrantStream)
KEY_CHAIN_FIELDS: Fields = (
    ("stream", name_str),
    ("chain_id", CHAIN_ID),
    ("start_epoch", u_int(0, MAX_U32)),
    ("epoch_ms", u_int(MIN_EPOCH_MS, MAX_EPOCH_MS)),
)


@dataclass(frozen=True, slots=True)
class StreamKey(Record):
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
        *KEY_CHAIN_FIELDS,
        ("key_epoch", u_int(0, MAX_U32)),
        ("sealed", b_exact(80)),
    )


@dataclass(frozen=True, slots=True)
class EnrollDevice(Signed):
    """Patient-signed: ``device`` may publish these streams for ``patient``.

    Nodes take in the device's readings from the enrolment's time ``ts_ms`` on:
    a stolen device key cannot backdate readings to the chain's start.  An
    enrolment that imports older data (a device's history, files synced later)
    names the start of that window, ``import_from_ms``: it is then tagged
    ``E2`` (the fields of E1, then ``import_from_ms``); without one it is ``E1``,
    the form every older chain holds, which still decodes and verifies.
    """

    TAG: ClassVar[str] = "E1"
    TAG_IMPORT: ClassVar[str] = "E2"
    MAX_LEN: ClassVar[int] = MAX_TX
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (
        ("patient", KEY),
        ("device", KEY),
        ("ts_ms", u_int()),
        ("streams", array(record(StreamKey.FIELDS, StreamKey), 32)),
    )

    patient: bytes
    device: bytes
    ts_ms: int
    streams: tuple[StreamKey, ...]
    sig: bytes
    import_from_ms: int | None = None  # E2: readings from this time on (else from ts_ms)

    def __post_init__(self) -> None:
        _each_stream_once(self.streams, "an enrolment")
        for s in self.streams:
            if s.key_epoch < s.start_epoch:
                raise MalformedMessage("key_epoch precedes the chain's start")
        if self.import_from_ms is not None and not 0 <= self.import_from_ms <= self.ts_ms:
            raise MalformedMessage("an import window starts before the enrolment, at >= 0")

    @property
    def tag(self) -> str:
        return self.TAG if self.import_from_ms is None else self.TAG_IMPORT

    @property
    def floor_ms(self) -> int:
        """The earliest reading time this enrolment lets in."""
        return self.ts_ms if self.import_from_ms is None else self.import_from_ms

    def body(self) -> list[Any]:
        out = Signed.body(self)
        return out if self.import_from_ms is None else [*out, self.import_from_ms]

    def signing_bytes(self) -> bytes:
        return signing_bytes(self.tag, self.body())

    def encode(self) -> bytes:
        return pack([self.tag, *self.body(), self.sig])

    @classmethod
    def decode(cls, data: bytes) -> EnrollDevice:
        if len(data) > cls.MAX_LEN or data[1:4] != b"\xa2E2":  # E1 (or its errors)
            return cls(
                *decode_fields(data, cls.TAG, (*cls.FIELDS, ("sig", SIG)), max_len=cls.MAX_LEN)
            )
        patient, device, ts_ms, streams, since, sig = decode_fields(
            data,
            cls.TAG_IMPORT,
            (*cls.FIELDS, ("import_from_ms", u_int()), ("sig", SIG)),
            max_len=cls.MAX_LEN,
        )
        return cls(patient, device, ts_ms, streams, sig, since)


@dataclass(frozen=True, slots=True)
class Link(Record):
    """A cross-link: the latest validated head ``(node, height, hash)`` of another chain."""

    node: bytes
    height: int
    hash: bytes

    FIELDS: ClassVar[Fields] = (("node", KEY), ("height", u_int()), ("hash", KEY))


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
        ("links", array(record(Link.FIELDS, Link), MAX_LINKS)),
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
class ReceiptV2(Signed):
    """Node-signed (v2): every reading of ``device`` up to ``seq`` is stored, and the block
    ``(chain, height, hash)`` holds one of them: the reading whose commit brought the
    node's contiguous mark up to ``seq``.

    A device deletes readings only on this receipt, and only up to the highest seq it
    sent.  Naming the block makes the claim checkable (the block is on the named
    chain, or the signer lied, provably: it signed the hash), and lets a device wait
    for that block's confirmation.  ``Receipt`` (A1) named only the signer's own height.
    """

    TAG: ClassVar[str] = "A2"
    MAX_LEN: ClassVar[int] = 1024
    SIGNER: ClassVar[str] = "node"
    FIELDS: ClassVar[Fields] = (
        ("network", KEY),
        ("node", KEY),
        ("device", KEY),
        ("seq", u_int()),
        ("chain", KEY),
        ("height", u_int()),
        ("hash", KEY),
        ("ts_ms", u_int()),
    )

    network: bytes
    node: bytes
    device: bytes
    seq: int
    chain: bytes
    height: int
    hash: bytes
    ts_ms: int
    sig: bytes


def decode_receipt(data: bytes) -> Receipt | ReceiptV2:
    """A receipt of either version (not yet verified)."""
    tag = peek_tag(data)
    if tag == ReceiptV2.TAG:
        return ReceiptV2.decode(data)
    if tag == Receipt.TAG:
        return Receipt.decode(data)
    raise MalformedMessage("not a receipt")


MAX_GRANT = 65_536
OPEN = MAX_U32  # ``last_epoch`` of an open grant: it follows the chain forward
SEALED_OVERHEAD = 48  # X25519 SealedBox: ephemeral key + MAC


@dataclass(frozen=True, slots=True)
class GrantStream(Record):
    """One stream of a grant, and the key material sealed to the grantee.

    Bounded (``last_epoch`` < ``OPEN``): ``sealed`` holds the message keys
    ``M(first_epoch..last_epoch)``, concatenated, in one SealedBox, so the
    grantee can decrypt exactly that window and nothing else.  Open
    (``last_epoch == OPEN``): ``sealed`` holds the ratchet key
    ``K(first_epoch)``, which the grantee ratchets forward until the chain
    is replaced (Rechain).
    """

    stream: str
    chain_id: bytes
    start_epoch: int
    epoch_ms: int
    first_epoch: int
    last_epoch: int
    sealed: bytes

    FIELDS: ClassVar[Fields] = (
        *KEY_CHAIN_FIELDS,
        ("first_epoch", u_int(0, MAX_U32)),
        ("last_epoch", u_int(0, MAX_U32)),
        ("sealed", b_max(MAX_GRANT)),
    )

    @property
    def open(self) -> bool:
        return self.last_epoch == OPEN


@dataclass(frozen=True, slots=True)
class Grant(Signed):
    """Patient-signed: ``grantee`` may read these streams in [from_ms, until_ms].

    ``until_ms == 0`` is an open grant (from ``from_ms`` on, until revoked).
    ``pseudonymous``: exports made under this grant carry a per-grant
    pseudonym instead of the patient's key (research sharing).
    """

    TAG: ClassVar[str] = "G1"
    MAX_LEN: ClassVar[int] = MAX_GRANT
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (
        ("patient", KEY),
        ("grantee", KEY),
        ("ts_ms", u_int()),
        ("from_ms", u_int()),
        ("until_ms", u_int()),
        ("pseudonymous", u_int(0, 1)),
        ("streams", array(record(GrantStream.FIELDS, GrantStream), 32)),
    )

    patient: bytes
    grantee: bytes
    ts_ms: int
    from_ms: int
    until_ms: int
    pseudonymous: int
    streams: tuple[GrantStream, ...]
    sig: bytes

    def __post_init__(self) -> None:
        _each_stream_once(self.streams, "a grant")
        if self.until_ms and self.until_ms < self.from_ms:
            raise MalformedMessage("a grant's window ends before it starts")
        if self.grantee == self.patient:
            raise MalformedMessage("a patient needs no grant to their own data")
        for s in self.streams:
            if s.first_epoch < s.start_epoch:
                raise MalformedMessage("a grant starts before its key chain")
            if s.open != (self.until_ms == 0):
                raise MalformedMessage("open and bounded grants carry different keys")
            keys = 1 if s.open else s.last_epoch - s.first_epoch + 1
            if keys < 1 or len(s.sealed) != SEALED_OVERHEAD + 32 * keys:
                raise MalformedMessage("sealed keys do not match the grant's epochs")

    @property
    def open(self) -> bool:
        return self.until_ms == 0

    def covers(self, t_ms: int) -> bool:
        return self.from_ms <= t_ms and (self.open or t_ms <= self.until_ms)


@dataclass(frozen=True, slots=True)
class Revoke(Signed):
    """Patient-signed: the grant whose transaction hash is ``grant`` is over."""

    TAG: ClassVar[str] = "V1"
    MAX_LEN: ClassVar[int] = 512
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (("patient", KEY), ("grant", KEY), ("ts_ms", u_int()))

    patient: bytes
    grant: bytes
    ts_ms: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class RemoveDevice(Signed):
    """Patient-signed: ``device`` no longer writes for ``patient`` from ``ts_ms`` on.

    Nodes refuse the device's readings of this patient timed at or after
    ``ts_ms`` (which may be in the past: when the device was lost).  Removal
    is final for that (device, patient); the patient rechains every stream the
    device wrote, so the key it holds opens nothing written from then on.
    """

    TAG: ClassVar[str] = "D1"
    MAX_LEN: ClassVar[int] = 512
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (("patient", KEY), ("device", KEY), ("ts_ms", u_int()))

    patient: bytes
    device: bytes
    ts_ms: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class Erase(Signed):
    """Patient-signed: delete every payload of ``patient`` up to ``ts_ms`` (crypto-shredding:
    the patient has dropped the seeds; nodes prune the ciphertext)."""

    TAG: ClassVar[str] = "X1"
    MAX_LEN: ClassVar[int] = 512
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (("patient", KEY), ("ts_ms", u_int()))

    patient: bytes
    ts_ms: int
    sig: bytes


@dataclass(frozen=True, slots=True)
class SealedKey(Record):
    """``K(epoch)`` of a key chain sealed to one recipient: a device (by its key) or the
    grantee of an open grant (by the grant's id)."""

    to: bytes
    epoch: int
    sealed: bytes

    FIELDS: ClassVar[Fields] = (("to", KEY), ("epoch", u_int(0, MAX_U32)), ("sealed", b_exact(80)))


@dataclass(frozen=True, slots=True)
class Rechain(Signed):
    """Patient-signed: ``stream`` moves to a fresh key chain from ``ts_ms`` on.

    The new chain's key is sealed to each device that keeps publishing the
    stream and to the grantee of each open grant that stays in force; whoever
    is left out (a revoked grantee) holds no key for anything the new chain
    encrypts.  Nodes stop taking in readings on the old chain from ``ts_ms``.
    """

    TAG: ClassVar[str] = "K1"
    MAX_LEN: ClassVar[int] = MAX_TX
    SIGNER: ClassVar[str] = "patient"
    FIELDS: ClassVar[Fields] = (
        ("patient", KEY),
        ("ts_ms", u_int()),
        *KEY_CHAIN_FIELDS,
        ("devices", array(record(SealedKey.FIELDS, SealedKey), 64)),
        ("grants", array(record(SealedKey.FIELDS, SealedKey), 64)),
    )

    patient: bytes
    ts_ms: int
    stream: str
    chain_id: bytes
    start_epoch: int
    epoch_ms: int
    devices: tuple[SealedKey, ...]
    grants: tuple[SealedKey, ...]
    sig: bytes

    def __post_init__(self) -> None:
        if not self.devices:
            raise MalformedMessage("a rechain hands the new key to at least one device")
        for k in (*self.devices, *self.grants):
            if k.epoch < self.start_epoch:
                raise MalformedMessage("a sealed key precedes its chain's start")


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


def _check_access_log(outcome: str, grant: bytes) -> None:
    """What both access log versions require of their outcome and grant."""
    if outcome not in ("read", "denied"):
        raise MalformedMessage("an access log's outcome is read or denied")
    if len(grant) not in (0, 32):
        raise MalformedMessage("an access log names a grant by its 32-byte id, or none")


@dataclass(frozen=True, slots=True)
class AccessLog(Signed):
    """Node-signed: ``reader`` asked this node for ``patient``'s ``stream`` in
    [from_ms, to_ms] at ``ts_ms``; ``outcome`` is ``read`` or ``denied``.

    The node that answered puts the entry in its own next block, so the
    patient's audit trail is replicated and tamper-evident like the data.
    ``grant`` names the grant that allowed the read (empty for the patient
    reading their own data, or for a denial); ``reason`` says why a request
    was denied; ``request`` is the digest of the signed request, so two
    identical reads are still two entries.
    """

    TAG: ClassVar[str] = "L1"
    MAX_LEN: ClassVar[int] = 1024
    SIGNER: ClassVar[str] = "node"
    FIELDS: ClassVar[Fields] = (
        ("network", KEY),
        ("node", KEY),
        ("reader", KEY),
        ("patient", KEY),
        ("stream", name_str),
        ("from_ms", u_int()),
        ("to_ms", u_int()),
        ("ts_ms", u_int()),
        ("outcome", name_str),
        ("reason", b_max(64)),
        ("grant", b_max(32)),
        ("readings", u_int(0, MAX_U32)),
        ("request", KEY),
    )

    network: bytes
    node: bytes
    reader: bytes
    patient: bytes
    stream: str
    from_ms: int
    to_ms: int
    ts_ms: int
    outcome: str
    reason: bytes
    grant: bytes
    readings: int
    request: bytes
    sig: bytes

    def __post_init__(self) -> None:
        _check_access_log(self.outcome, self.grant)


MAX_REQUEST_PATH = 1024  # a logged read's path and query (the API refuses longer ones)
MAX_QUERY_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the latest time a read may name


def path_str(v: Any) -> str:
    if type(v) is not str or not 0 < len(v.encode()) <= MAX_REQUEST_PATH or not v.isprintable():
        raise MalformedMessage(f"expected a printable path of at most {MAX_REQUEST_PATH} bytes")
    return v


def method_str(v: Any) -> str:
    if type(v) is not str or v not in ("GET", "POST"):
        raise MalformedMessage("expected an HTTP method")
    return v


@dataclass(frozen=True, slots=True)
class AccessLogV2(Signed):
    """Node-signed, with the reader's own signed request inside (replaces ``L1``).

    As :class:`AccessLog`, plus the request the reader signed
    (:mod:`meshhealth.net.signed_request`): ``method``, ``path`` (with its
    query), the body's digest, the reader's time and nonce, and the
    reader's signature over them for this node (the audience is ``node``).
    Anyone holding the log can check that ``reader`` really asked this node
    for this; a node cannot invent a read, only misreport its answer.

    ``count`` > 1 is a summary: that many refusals (or answers with no
    reading, or reads past the logging budget of an unregistered patient, then
    ``readings`` is their total) of this reader, patient and reason in one
    period, carrying the first of them as evidence
    (:class:`meshhealth.net.limits.RefusalLog`).
    """

    TAG: ClassVar[str] = "L2"
    MAX_LEN: ClassVar[int] = 2048
    SIGNER: ClassVar[str] = "node"
    FIELDS: ClassVar[Fields] = (
        *AccessLog.FIELDS[:-1],  # L1's, up to ``readings``; L1's ``request`` is derived here
        ("count", u_int(1, MAX_U32)),
        ("method", method_str),
        ("path", path_str),
        ("body_hash", KEY),
        ("req_ts_ms", u_int()),
        ("req_nonce", b_exact(16)),
        ("req_sig", SIG),
    )

    network: bytes
    node: bytes
    reader: bytes
    patient: bytes
    stream: str
    from_ms: int
    to_ms: int
    ts_ms: int
    outcome: str
    reason: bytes
    grant: bytes
    readings: int
    count: int
    method: str
    path: str
    body_hash: bytes
    req_ts_ms: int
    req_nonce: bytes
    req_sig: bytes
    sig: bytes

    def __post_init__(self) -> None:
        _check_access_log(self.outcome, self.grant)

    @property
    def request(self) -> bytes:
        """The request's digest (the audit index keys on it, as on L1's ``request``)."""
        return h(self.req_sig)


@dataclass(frozen=True, slots=True)
class RegisterPatient(Signed):
    """Authority-signed: ``patient`` is a patient of this network (registered by
    ``authority``).  A registered patient's transactions are admitted under their
    own quota; an unregistered key shares the strangers' budget."""

    TAG: ClassVar[str] = "P1"
    MAX_LEN: ClassVar[int] = 512
    SIGNER: ClassVar[str] = "authority"
    FIELDS: ClassVar[Fields] = (
        ("network", KEY),
        ("authority", KEY),
        ("patient", KEY),
        ("ts_ms", u_int()),
    )

    network: bytes
    authority: bytes
    patient: bytes
    ts_ms: int
    sig: bytes


Control = EnrollDevice | Grant | Revoke | Erase | Rechain | RemoveDevice | RegisterPatient
CONTROL_CLASSES = (EnrollDevice, Grant, Revoke, Erase, Rechain, RemoveDevice, RegisterPatient)
CONTROL_TYPES: dict[str, Any] = {c.TAG: c for c in CONTROL_CLASSES}
CONTROL_TYPES[EnrollDevice.TAG_IMPORT] = EnrollDevice
MAX_CONTROL = max(c.MAX_LEN for c in CONTROL_TYPES.values())
ACCESS_LOGS = (AccessLog, AccessLogV2)
AnyAccessLog = AccessLog | AccessLogV2
Entry = Reading | Control | EquivocationProof | AccessLog | AccessLogV2
ENTRY_TYPES: dict[str, Any] = {
    "R1": Reading,
    "Q1": EquivocationProof,
    "L1": AccessLog,
    "L2": AccessLogV2,
    **CONTROL_TYPES,
}


def decode_control(data: bytes) -> Control:
    """Decode a patient-signed control transaction (not yet verified)."""
    if len(data) > MAX_CONTROL:
        raise MalformedMessage(f"a control transaction is at most {MAX_CONTROL} bytes")
    cls = CONTROL_TYPES.get(peek_tag(data))
    if cls is None:
        raise MalformedMessage("not a control transaction")
    tx: Control = cls.decode(data)
    return tx


def decode_entry(data: bytes) -> Entry:
    """Decode one block entry (a reading or a control transaction)."""
    cls = ENTRY_TYPES.get(peek_tag(data))
    if cls is None:
        raise MalformedMessage("unknown entry type")
    entry: Entry = cls.decode(data)
    return entry
