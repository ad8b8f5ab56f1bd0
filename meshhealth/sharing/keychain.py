"""The patient's per-stream key chain (ARCHITECTURE §5).

Theory of operation
-------------------
Time is cut into epochs of ``epoch_ms`` aligned to the Unix epoch, so epoch
``i`` covers ``[i*epoch_ms, (i+1)*epoch_ms)``.  A chain starts at
``start_epoch`` with a random 32-byte seed ``K(start)``; each epoch's key is
the previous one ratcheted by a personalised BLAKE2b:

    K(i+1) = BLAKE2b(K(i), person="mh/ratchet")      one-way
    M(i)   = BLAKE2b(K(i), person="mh/message")      encrypts epoch i

Whoever holds ``K(a)`` can derive every ``M(i)`` for ``i >= a`` and nothing
before ``a``; whoever holds only ``M(a..b)`` can read exactly that window.
Samples are encrypted with XChaCha20-Poly1305 (PyNaCl's AEAD) under
``M(epoch)``, the reading's clear header as associated data.

Plaintext of a reading (msgpack): ``[unit, exp, deltas, values]``.  Values
are integers scaled by ``10**exp`` (``366, -1`` is 36.6); ``deltas`` are the
sample times as millisecond offsets from the reading's ``t_ms``, either one
integer (a regular period) or a list of successive differences.  Blood
pressure and other multi-component values are lists of integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.encoding
import nacl.hash
import nacl.public
import nacl.utils

from meshhealth.errors import MalformedMessage
from meshhealth.wire.codec import pack, unpack

KEY_LEN = 32
NONCE_LEN = 24
DEFAULT_EPOCH_MS = 3_600_000
MAX_RATCHET_STEPS = 24 * 366 * 20  # twenty years of hourly epochs


def _b2(data: bytes, person: bytes) -> bytes:
    return nacl.hash.blake2b(
        data, digest_size=KEY_LEN, person=person, encoder=nacl.encoding.RawEncoder
    )


def ratchet(key: bytes, steps: int = 1) -> bytes:
    if not 0 <= steps <= MAX_RATCHET_STEPS:
        raise ValueError(f"cannot ratchet {steps} steps")
    for _ in range(steps):
        key = _b2(key, b"mh/ratchet")
    return key


def message_key(ratchet_key: bytes) -> bytes:
    return _b2(ratchet_key, b"mh/message")


def epoch_of(t_ms: int, epoch_ms: int) -> int:
    return t_ms // epoch_ms


@dataclass
class ChainCursor:
    """A ratchet position that only moves forward (what a device or open grantee holds)."""

    chain_id: bytes
    epoch_ms: int
    epoch: int
    key: bytes

    def key_at(self, epoch: int) -> bytes:
        """``K(epoch)``; advances the cursor (old keys are forgotten)."""
        if epoch < self.epoch:
            raise KeyError(f"epoch {epoch} precedes this key ({self.epoch})")
        if epoch > self.epoch:
            self.key = ratchet(self.key, epoch - self.epoch)
            self.epoch = epoch
        return self.key

    def message_key(self, epoch: int) -> bytes:
        return message_key(self.key_at(epoch))


@dataclass(frozen=True)
class KeyChain:
    """The patient's full chain for one stream: the seed and where it starts."""

    stream: str
    chain_id: bytes
    seed: bytes
    start_epoch: int
    epoch_ms: int = DEFAULT_EPOCH_MS

    @classmethod
    def new(cls, stream: str, start_epoch: int, epoch_ms: int = DEFAULT_EPOCH_MS) -> KeyChain:
        return cls(stream, nacl.utils.random(8), nacl.utils.random(KEY_LEN), start_epoch, epoch_ms)

    def key(self, epoch: int) -> bytes:
        if epoch < self.start_epoch:
            raise KeyError(f"epoch {epoch} precedes chain start {self.start_epoch}")
        return ratchet(self.seed, epoch - self.start_epoch)

    def cursor(self, epoch: int) -> ChainCursor:
        return ChainCursor(self.chain_id, self.epoch_ms, epoch, self.key(epoch))

    def to_doc(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "chain_id": self.chain_id.hex(),
            "seed": self.seed.hex(),
            "start_epoch": self.start_epoch,
            "epoch_ms": self.epoch_ms,
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> KeyChain:
        return cls(
            d["stream"],
            bytes.fromhex(d["chain_id"]),
            bytes.fromhex(d["seed"]),
            int(d["start_epoch"]),
            int(d["epoch_ms"]),
        )


def seal(key: bytes, recipient: nacl.public.PublicKey) -> bytes:
    """Seal a 32-byte key to an X25519 public key (80 bytes out)."""
    return nacl.public.SealedBox(recipient).encrypt(key)


def unseal(sealed: bytes, recipient: nacl.public.PrivateKey) -> bytes:
    return nacl.public.SealedBox(recipient).decrypt(sealed)


# --- samples ---------------------------------------------------------------

Value = tuple[float, ...]


def encode_samples(unit: str, decimals: int, t0_ms: int, samples: list[tuple[int, Value]]) -> bytes:
    """Plaintext of a reading: compact, integer-scaled, delta-coded."""
    if not samples:
        raise ValueError("a reading carries at least one sample")
    scale = 10**decimals
    times = [t for t, _ in samples]
    deltas = [b - a for a, b in zip([t0_ms, *times[:-1]], times, strict=True)]
    if any(d < 0 for d in deltas):
        raise ValueError("samples must be in time order")
    dt: int | list[int]
    dt = deltas[1] if len(deltas) > 1 and deltas[0] == 0 and len(set(deltas[1:])) == 1 else deltas
    if len(deltas) == 1 and deltas[0] == 0:
        dt = 0
    vals: list[Any] = [
        round(v[0] * scale) if len(v) == 1 else [round(x * scale) for x in v] for _, v in samples
    ]
    return pack([unit, -decimals, dt, vals])


def decode_samples(plain: bytes, t0_ms: int) -> tuple[str, list[tuple[int, Value]]]:
    try:
        unit, exp, dt, vals = unpack(plain, max_len=1 << 16)
        if type(exp) is not int or not -18 <= exp <= 18:
            raise ValueError("decimal exponent out of range")
        scale = 10.0**exp
        if isinstance(dt, int):
            times = [t0_ms + i * dt for i in range(len(vals))]
        else:
            times, t = [], t0_ms
            for d in dt:
                t += d
                times.append(t)
        out = [
            (t, (v * scale,) if isinstance(v, int) else tuple(x * scale for x in v))
            for t, v in zip(times, vals, strict=True)
        ]
        return str(unit), out
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise MalformedMessage(f"bad sample plaintext: {exc}") from exc


def encrypt(
    message_key_: bytes, plaintext: bytes, aad: bytes, nonce: bytes | None = None
) -> tuple[bytes, bytes]:
    nonce = nonce or nacl.utils.random(NONCE_LEN)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, aad, nonce, message_key_
    )
    return nonce, ct


def decrypt(message_key_: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ciphertext, aad, nonce, message_key_
    )
