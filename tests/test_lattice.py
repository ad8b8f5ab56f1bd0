"""Confirmation across chains, equivocation proofs, and their path through a replica."""

from __future__ import annotations

import dataclasses
import random

import pytest
from core_helpers import T0
from hypothesis import given
from hypothesis import strategies as st
from test_replica import produce, two_nodes

from meshhealth.chain.block import build_block, encode_body
from meshhealth.chain.lattice import confirmed_height, equivocation, quorum
from meshhealth.chain.verify import verify_chain
from meshhealth.errors import InvalidBlock, MalformedMessage, RemoteError
from meshhealth.gossip import wire
from meshhealth.gossip.messages import FullHeadsRequest, PeerList, Send
from meshhealth.gossip.protocol import Gossip
from meshhealth.ingest.replica import admit_remote
from meshhealth.ingest.verify import check_block_entry, check_entries
from meshhealth.wire import EquivocationProof, decode_entry
from meshhealth.wire.codec import pack

N1, N2, N3, N4 = (bytes([i]) * 32 for i in range(1, 5))
FOUR = (N1, N2, N3, N4)


def test_quorum_is_more_than_two_thirds() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 6, 7, 10)] == [1, 2, 3, 3, 4, 5, 5, 7]


def test_block_is_confirmed_once_a_quorum_links_it_or_later() -> None:
    linked = {N2: {N1: 7}, N3: {N1: 5}}
    # N1 vouches for its head 9; N2 for 7; N3 for 5; N4 for nothing: quorum 3 -> height 5
    assert confirmed_height(N1, head=9, linked=linked, authorities=FOUR) == 5
    linked[N4] = {N1: 8}
    assert confirmed_height(N1, head=9, linked=linked, authorities=FOUR) == 7
    # a chain nobody links yet is not confirmed, however long it is
    assert confirmed_height(N2, head=50, linked=linked, authorities=FOUR) == -1


def test_faulty_authorities_do_not_vouch_but_still_count_in_the_quorum() -> None:
    linked = {N2: {N1: 7}, N3: {N1: 7}, N4: {N1: 7}}
    assert confirmed_height(N1, head=7, linked=linked, authorities=FOUR) == 7
    assert confirmed_height(N1, head=7, linked=linked, authorities=FOUR, faulty={N3}) == 7
    assert confirmed_height(N1, head=7, linked=linked, authorities=FOUR, faulty={N3, N4}) == -1


@given(st.lists(st.integers(-1, 100), min_size=3, max_size=10), st.integers(0, 100))
def test_confirmed_height_is_the_quorum_th_best_vote(votes: list[int], head: int) -> None:
    auth = tuple(bytes([i + 1]) * 32 for i in range(len(votes)))
    linked = {a: {auth[0]: v} for a, v in zip(auth[1:], votes[1:], strict=True) if v >= 0}
    got = confirmed_height(auth[0], head=head, linked=linked, authorities=auth)
    # at least a quorum vouch for >= got, and fewer than a quorum for anything higher
    vouch = [head, *votes[1:]]
    assert sum(v >= got for v in vouch) >= quorum(len(auth))
    assert sum(v >= got + 1 for v in vouch) < quorum(len(auth))


def forked(world, commit):  # type: ignore[no-untyped-def]
    """A second block at the same height, signed by the same node: an equivocation."""
    hdr = commit.block.header
    return build_block(
        world.authority.signing,
        network=hdr.network,
        height=hdr.height,
        prev=hdr.prev,
        ts_ms=hdr.ts_ms + 1,
        entries=(),
    )


def test_two_headers_at_one_height_make_a_checkable_proof() -> None:
    world, a, _ = two_nodes()
    _, _, commit = produce(world, a)
    held, other = commit.block.header.encode(), forked(world, commit).header.encode()
    net = commit.block.header.network
    assert equivocation(net, held, held) is None
    proof = equivocation(net, held, other)
    assert proof is not None and proof == equivocation(net, other, held)  # order-independent
    assert proof.accused == world.node
    assert decode_entry(proof.encode()).verify() == proof
    assert check_block_entry(proof.encode()) == (None,)


def test_a_forged_header_is_no_proof() -> None:
    world, a, _ = two_nodes()
    _, _, commit = produce(world, a)
    held = commit.block.header
    net = held.network
    forged = dataclasses.replace(held, ts_ms=held.ts_ms + 1)  # the old signature no longer fits
    with pytest.raises(InvalidBlock, match="forged"):
        equivocation(net, held.encode(), forged.encode())
    other_height = dataclasses.replace(held, height=held.height + 1)
    with pytest.raises(InvalidBlock, match="not a header"):
        equivocation(net, held.encode(), other_height.encode())
    with pytest.raises(RemoteError):
        equivocation(net, held.encode(), b"\x93garbage")
    # hand-built proofs: unsorted, identical, or with a forged half
    h1, h2 = sorted((held.encode(), forked(world, commit).header.encode()))
    with pytest.raises(MalformedMessage):
        EquivocationProof(h2, h1).headers()
    with pytest.raises(MalformedMessage):
        EquivocationProof(h1, h1).headers()
    bad = EquivocationProof.of(held.encode(), forged.encode())
    assert check_block_entry(bad.encode()) == ("bad_signature",)


def test_a_proof_travels_in_a_block_and_marks_the_node_faulty_in_the_replica() -> None:
    world, a, b = two_nodes()
    _, _, commit = produce(world, a)
    proof = EquivocationProof.of(
        commit.block.header.encode(), forked(world, commit).header.encode()
    )
    assert b.admit_proof(proof, T0) is True
    assert b.admit_proof(proof, T0) is False  # one proof per faulty node is enough
    assert b.faulty == {world.node: 0}
    carrier = b.seal(T0 + 1)
    assert carrier.txs and carrier.block.entries == (proof.encode(),)
    # a third replica admits B's block and learns the fault from it
    _, _, c = two_nodes()
    c.network = b.network
    entries = list(carrier.block.entries)
    admit_remote(
        c,
        carrier.block.header,
        entries,
        check_entries(entries),
        block_hash_at=lambda n, h: None,
        now_ms=T0 + 2,
    )
    assert c.faulty == {world.node: 0}
    # and a full verification of B's chain checks the proof's signatures
    rep = verify_chain(
        b.me,
        [(0, carrier.block.header.encode(), encode_body(entries))],
        network=b.network,
        authorities={b.me},
    )
    assert rep.proofs == 1


def test_a_proof_from_another_network_is_refused() -> None:
    world, a, b = two_nodes()
    _, _, commit = produce(world, a)
    hdr = commit.block.header
    foreign = [
        build_block(
            world.authority.signing,
            network=b"\7" * 32,
            height=0,
            prev=b"\7" * 32,
            ts_ms=t,
            entries=(),
        ).header.encode()
        for t in (hdr.ts_ms, hdr.ts_ms + 1)
    ]
    proof = EquivocationProof.of(*foreign)
    with pytest.raises(RemoteError, match="another network"):
        b.admit_proof(proof, T0)
    assert b.faulty == {} and b.pending == 0


def test_own_chain_fetched_back_moves_the_batcher_head_not_its_links() -> None:
    _, a, _ = two_nodes()
    a.note_remote_head(a.me, 4, b"\5" * 32, carries_entries=True, now_ms=T0)
    assert (a.height, a.prev) == (4, b"\5" * 32)
    assert a.pending == 0 and not a.due(T0 + 10**6)  # nothing to seal, no link to itself
    nxt = a.seal(T0 + 1)
    assert nxt.block.header.height == 5 and nxt.block.header.prev == b"\5" * 32


def test_connection_asks_for_the_full_head_vector() -> None:
    g = Gossip(N1, random.Random(1))
    assert g.on_connected(N2, 1.0) == [Send(N2, FullHeadsRequest())]
    assert N2 in g.peers


def test_peer_exchange_learns_each_address_once_and_never_its_own() -> None:
    g = Gossip(N1, random.Random(1))
    g.note_address(N2, "http://127.0.0.1:2")
    msg = PeerList(((N1, "http://me"), (N2, "http://other"), (N3, "http://127.0.0.1:3")))
    assert g.learn_addresses(msg) == [(N3, "http://127.0.0.1:3")]
    assert g.learn_addresses(msg) == []
    offered = g.peer_list("http://127.0.0.1:1")
    assert offered.peers[0] == (N1, "http://127.0.0.1:1")
    assert dict(offered.peers)[N2] == "http://127.0.0.1:2"  # not overwritten by hearsay
    assert wire.decode(wire.encode(offered)) == (offered, [])


def test_peer_list_on_the_wire_is_bounded_and_checked() -> None:
    good = wire.encode(PeerList(((N2, "http://a:1"),)))
    assert wire.decode(good)[0] == PeerList(((N2, "http://a:1"),))
    for bad in (
        pack(["GX", [[N2, b"ftp://a"]]]),
        pack(["GX", [[N2, b"http://" + b"a" * 300]]]),
        pack(["GX", [[N2[:5], b"http://a"]]]),
        pack(["GX", [[N2, b"http://\xff"]]]),
        pack(["GX", [[N2, b"http://a"]] * 300]),
    ):
        with pytest.raises(MalformedMessage):
            wire.decode(bad)
