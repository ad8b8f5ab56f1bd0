"""The mutual gossip handshake: both sides prove their key over both challenges."""

from __future__ import annotations

import os

import nacl.signing
import pytest

from meshhealth.errors import InvalidSignature, MalformedMessage
from meshhealth.gossip.handshake import (
    HandshakeError,
    Hello,
    Proof,
    check_hello,
    check_proof,
    prove,
)

NET = b"\x07" * 32


def keys() -> tuple[nacl.signing.SigningKey, bytes]:
    k = nacl.signing.SigningKey.generate()
    return k, bytes(k.verify_key)


def test_full_handshake_between_two_authorities() -> None:
    (ki, i), (kr, r) = keys(), keys()
    auth = {i, r}
    hi = Hello.decode(Hello(NET, i, os.urandom(32)).encode())
    peer_i = check_hello(hi, network=NET, me=r, authorities=auth, observers=False)
    hr = Hello.decode(Hello(NET, r, os.urandom(32)).encode())
    peer_r = check_hello(hr, network=NET, me=i, authorities=auth, observers=False)
    assert peer_i.authority and peer_r.authority
    pr = Proof.decode(prove(kr, "HR", NET, hi, hr).encode())
    check_proof(pr, r, "HR", NET, hi, hr)
    pi = prove(ki, "HI", NET, hi, hr)
    check_proof(pi, i, "HI", NET, hi, hr)
    # a responder proof cannot pass as an initiator proof, nor for other challenges
    with pytest.raises(InvalidSignature):
        check_proof(pr, r, "HI", NET, hi, hr)
    with pytest.raises(InvalidSignature):
        check_proof(pi, i, "HI", NET, hi, Hello(NET, r, os.urandom(32)))
    # nor can one node's proof be passed off as another's
    with pytest.raises(InvalidSignature):
        check_proof(pi, r, "HI", NET, hi, hr)


def test_outsiders_other_networks_and_garbage_are_refused() -> None:
    (_, i), (_, r), (_, x) = keys(), keys(), keys()
    auth = {i, r}
    with pytest.raises(HandshakeError, match="another network"):
        check_hello(
            Hello(b"\x08" * 32, i, os.urandom(32)),
            network=NET,
            me=r,
            authorities=auth,
            observers=False,
        )
    with pytest.raises(HandshakeError, match="not an authority"):
        check_hello(
            Hello(NET, x, os.urandom(32)), network=NET, me=r, authorities=auth, observers=False
        )
    observer = check_hello(
        Hello(NET, x, os.urandom(32)), network=NET, me=r, authorities=auth, observers=True
    )
    assert not observer.authority
    with pytest.raises(HandshakeError, match="ourselves"):
        check_hello(
            Hello(NET, r, os.urandom(32)), network=NET, me=r, authorities=auth, observers=True
        )
    for junk in (b"", b"\x92\xa2H1\x00", os.urandom(100), Proof(b"\0" * 64).encode()):
        with pytest.raises(MalformedMessage):
            Hello.decode(junk)
