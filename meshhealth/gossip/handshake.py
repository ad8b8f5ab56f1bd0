"""The mutual, signed gossip handshake (pure).

Both ends prove they hold an authority key of the same network, over fresh
challenges from *both* sides, so a recorded handshake cannot be replayed:

    initiator -> responder   Hello(network, initiator id, challenge_i)
    responder -> initiator   Hello(network, responder id, challenge_r)
                             Proof(sig_r over transcript)
    initiator -> responder   Proof(sig_i over transcript)

The transcript is both ids and both challenges, in a fixed order, under the
network id.  An initiator signs it with the tag ``"HI"`` and a responder
with ``"HR"``, so one side's proof can never pass as the other's.  A peer
outside the authority set may connect only if ``observers`` is allowed.
It is then marked read-only: it receives blocks, and its blocks are never
accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

import nacl.exceptions
import nacl.signing

from meshhealth.errors import HandshakeError, InvalidSignature
from meshhealth.wire.codec import b_exact, decode_fields, pack, signing_bytes

CHALLENGE_LEN = 32


@dataclass(frozen=True, slots=True)
class Hello:
    TAG: ClassVar[str] = "H1"
    network: bytes
    node: bytes
    challenge: bytes

    def encode(self) -> bytes:
        return pack([self.TAG, self.network, self.node, self.challenge])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        f = (("network", b_exact(32)), ("node", b_exact(32)), ("challenge", b_exact(CHALLENGE_LEN)))
        return cls(*decode_fields(data, cls.TAG, f, max_len=256))


@dataclass(frozen=True, slots=True)
class Proof:
    TAG: ClassVar[str] = "H2"
    sig: bytes

    def encode(self) -> bytes:
        return pack([self.TAG, self.sig])

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*decode_fields(data, cls.TAG, (("sig", b_exact(64)),), max_len=128))


def transcript(role: str, network: bytes, initiator: Hello, responder: Hello) -> bytes:
    body: list[Any] = [
        network,
        initiator.node,
        initiator.challenge,
        responder.node,
        responder.challenge,
    ]
    return signing_bytes(role, body)


@dataclass(frozen=True)
class Peer:
    id: bytes
    authority: bool  # False: a read-only observer


def check_hello(
    hello: Hello, *, network: bytes, me: bytes, authorities: set[bytes], observers: bool
) -> Peer:
    if hello.network != network:
        raise HandshakeError("peer belongs to another network")
    if hello.node == me:
        raise HandshakeError("connected to ourselves")
    if hello.node in authorities:
        return Peer(hello.node, True)
    if observers:
        return Peer(hello.node, False)
    raise HandshakeError("peer is not an authority of this network")


def prove(
    key: nacl.signing.SigningKey, role: str, network: bytes, initiator: Hello, responder: Hello
) -> Proof:
    return Proof(key.sign(transcript(role, network, initiator, responder)).signature)


def check_proof(
    proof: Proof, signer: bytes, role: str, network: bytes, initiator: Hello, responder: Hello
) -> None:
    try:
        nacl.signing.VerifyKey(signer).verify(
            transcript(role, network, initiator, responder), proof.sig
        )
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise InvalidSignature("handshake proof does not verify") from exc


__all__ = [
    "HandshakeError",
    "Hello",
    "Peer",
    "Proof",
    "check_hello",
    "check_proof",
    "prove",
]
