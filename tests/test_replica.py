"""Admitting another authority's block into a replica (pure core)."""

from __future__ import annotations

import dataclasses

import nacl.signing
import pytest
from core_helpers import T0, device_readings, make_world, new_device

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import build_block
from meshhealth.config import Authority, Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.errors import InvalidBlock
from meshhealth.ingest.batcher import Batcher, BatchLimits
from meshhealth.ingest.replica import MissingLinks, admit_remote
from meshhealth.ingest.verify import check_entries
from meshhealth.wire import Link, Reading


def two_nodes():  # type: ignore[no-untyped-def]
    world = make_world()
    other = Identity.generate("node")
    g = Genesis(
        "replica", T0, (Authority("a", world.authority.public), Authority("b", other.public))
    )
    world.genesis = g
    a = Batcher(world.authority.signing, g.network_id, BatchLimits(), AccessState(), {})
    b = Batcher(other.signing, g.network_id, BatchLimits(), AccessState(), {})
    return world, a, b


def produce(world, a):  # type: ignore[no-untyped-def]
    dev, tx = new_device(world)
    now = T0 + 120_000
    a.admit_tx(tx.encode(), tx, now)
    raws = [raw for _, raw in device_readings(dev, "hr", T0, T0 + 60_000)]
    for raw in raws:
        a.admit_reading(raw, Reading.decode(raw), now)
    return dev, raws, a.seal(now)


def test_replica_admits_a_valid_block_and_then_links_it() -> None:
    world, a, b = two_nodes()
    dev, raws, commit = produce(world, a)
    entries = commit.block.entries
    c = admit_remote(
        b,
        commit.block.header,
        entries,
        check_entries(list(entries)),
        block_hash_at=lambda n, h: None,
        now_ms=T0 + 121_000,
    )
    assert len(c.readings) == len(raws) and len(c.txs) == 1
    assert b.marks[dev.id].contiguous == len(raws)
    # the replica now knows the device: its own ingest accepts a later reading
    ((_, late),) = dev.readings("hr", [(T0 + 61_000, (70.0,))])
    b.admit_reading(late, Reading.decode(late), T0 + 122_000)
    # and a duplicate of a reading held via A's chain is refused locally
    with pytest.raises(Exception, match="duplicate"):
        b.admit_reading(raws[0], Reading.decode(raws[0]), T0 + 122_000)
    own = b.seal(T0 + 123_000)
    assert own.block.header.links == (Link(world.node, 0, commit.block.hash),)


def test_tampered_entry_or_unknown_device_or_missing_link_is_not_admitted() -> None:
    world, a, b = two_nodes()
    _, _, commit = produce(world, a)
    hdr, entries = commit.block.header, list(commit.block.entries)
    forged = bytearray(entries[1])
    forged[-5] ^= 1
    bad = [*entries[:1], bytes(forged), *entries[2:]]
    with pytest.raises(InvalidBlock, match="Merkle"):
        admit_remote(b, hdr, bad, check_entries(bad), block_hash_at=lambda n, h: None, now_ms=T0)
    # a block re-signed by its (compromised) producer over a forged entry: the signature catches it
    key = world.authority.signing
    reblock = build_block(
        key, network=hdr.network, height=0, prev=hdr.prev, ts_ms=hdr.ts_ms, entries=bad
    )
    with pytest.raises(InvalidBlock, match="bad_signature"):
        admit_remote(
            b, reblock.header, bad, check_entries(bad), block_hash_at=lambda n, h: None, now_ms=T0
        )
    # readings without their enrolment
    no_tx = entries[1:]
    block = build_block(
        key, network=hdr.network, height=0, prev=hdr.prev, ts_ms=hdr.ts_ms, entries=no_tx
    )
    with pytest.raises(InvalidBlock, match="unknown_device"):
        admit_remote(
            b, block.header, no_tx, check_entries(no_tx), block_hash_at=lambda n, h: None, now_ms=T0
        )
    # a link to a block we do not hold yet
    stranger = nacl.signing.SigningKey.generate()
    linked = dataclasses.replace(hdr, links=(Link(bytes(stranger.verify_key), 3, b"\1" * 32),))
    with pytest.raises(MissingLinks):
        admit_remote(
            b, linked, entries, check_entries(entries), block_hash_at=lambda n, h: None, now_ms=T0
        )
    assert not b.access.known_devices and not b.marks  # nothing changed


def test_a_removed_devices_later_readings_are_pruned_in_a_valid_block() -> None:
    """A's block holds readings sealed before A saw the patient's RemoveDevice; B, which
    holds it, admits the block (its validity may not depend on arrival order) but keeps
    only the leaf hashes of the readings from the removal on, and counts them."""
    from meshhealth.wire import RemoveDevice

    world, a, b = two_nodes()
    dev, tx = new_device(world)
    now = T0 + 120_000
    a.admit_tx(tx.encode(), tx, now)
    raws = [raw for _, raw in device_readings(dev, "hr", T0, T0 + 60_000)]
    for raw in raws:
        a.admit_reading(raw, Reading.decode(raw), now)
    commit = a.seal(now)
    cut = T0 + 30_000
    removal = RemoveDevice.create(world.patient.signing, device=dev.id, ts_ms=cut)
    b.admit_tx(removal.encode(), removal, now)
    entries = commit.block.entries
    c = admit_remote(
        b,
        commit.block.header,
        entries,
        check_entries(list(entries)),
        block_hash_at=lambda n, h: None,
        now_ms=now + 1000,
    )
    late = {i for i, e in enumerate(entries) if i and Reading.decode(e).t_last_ms >= cut}
    assert late and c.prune == frozenset(late) and len(late) < len(raws)
    assert b.rejects["removed_device"] == len(late)
    # and B's own ingest refuses the device from the removal on
    ((_, after),) = dev.readings("hr", [(T0 + 61_000, (70.0,))])
    with pytest.raises(Exception, match="removed"):
        b.admit_reading(after, Reading.decode(after), now + 2000)
