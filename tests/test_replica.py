"""Admitting another authority's block into a replica (pure core)."""

from __future__ import annotations

import dataclasses
import struct

import nacl.signing
import pytest
from core_helpers import T0, device_readings, make_rogue, make_world, new_device

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import build_block
from meshhealth.config import Authority, Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.errors import InvalidBlock, Rejected, StorageError
from meshhealth.ingest.batcher import Batcher, BatchLimits
from meshhealth.ingest.commit import Commit, IndexedReading
from meshhealth.ingest.replica import MissingLinks, admit_remote
from meshhealth.ingest.seqmarks import MAX_ABOVE_STORED, MAX_RECORD, SeqMark
from meshhealth.ingest.verify import check_entries
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import AccessLog, EquivocationProof, Link, Reading


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
    our_now = commit.block.header.ts_ms + 1_000  # our clock, just after the seal
    hdr, entries = commit.block.header, list(commit.block.entries)
    forged = bytearray(entries[1])
    forged[-5] ^= 1
    bad = [*entries[:1], bytes(forged), *entries[2:]]
    with pytest.raises(InvalidBlock, match="Merkle"):
        admit_remote(
            b, hdr, bad, check_entries(bad), block_hash_at=lambda n, h: None, now_ms=our_now
        )
    # a block re-signed by its (compromised) producer over a forged entry: the signature catches it
    key = world.authority.signing
    reblock = build_block(
        key, network=hdr.network, height=0, prev=hdr.prev, ts_ms=hdr.ts_ms, entries=bad
    )
    with pytest.raises(InvalidBlock, match="bad_signature"):
        admit_remote(
            b,
            reblock.header,
            bad,
            check_entries(bad),
            block_hash_at=lambda n, h: None,
            now_ms=our_now,
        )
    # readings without their enrolment
    no_tx = entries[1:]
    block = build_block(
        key, network=hdr.network, height=0, prev=hdr.prev, ts_ms=hdr.ts_ms, entries=no_tx
    )
    with pytest.raises(InvalidBlock, match="unknown_device"):
        admit_remote(
            b,
            block.header,
            no_tx,
            check_entries(no_tx),
            block_hash_at=lambda n, h: None,
            now_ms=our_now,
        )
    # a link to a block we do not hold yet
    stranger = nacl.signing.SigningKey.generate()
    linked = dataclasses.replace(hdr, links=(Link(bytes(stranger.verify_key), 3, b"\1" * 32),))
    with pytest.raises(MissingLinks):
        admit_remote(
            b,
            linked,
            entries,
            check_entries(entries),
            block_hash_at=lambda n, h: None,
            now_ms=our_now,
        )
    assert not b.access.known_devices and not b.marks  # nothing changed


# --- a malicious authority's validly signed blocks (issue 11 #2, #3) ------------------


def rogue_block(world, key, entries, ts_ms, height=0, prev=None):  # type: ignore[no-untyped-def]
    return build_block(
        key,
        network=world.genesis.network_id,
        height=height,
        prev=world.genesis.network_id if prev is None else prev,
        ts_ms=ts_ms,
        entries=entries,
    )


def refused(b: Batcher, blk, now: int) -> str:  # type: ignore[no-untyped-def]
    before = (set(b.access.seen), {d: m.copy() for d, m in b.marks.items()}, b.height)
    with pytest.raises(InvalidBlock) as ei:
        admit_remote(
            b,
            blk.header,
            blk.entries,
            check_entries(list(blk.entries)),
            block_hash_at=lambda n, h: None,
            now_ms=now,
        )
    assert (set(b.access.seen), b.marks, b.height) == before  # nothing changed
    return str(ei.value)


SKEW = BatchLimits().max_future_skew_ms


@pytest.mark.parametrize(
    ("header_ts", "reading_t", "why"),
    [
        (10**17, 10**17, "future"),  # the reproduction: a 32-bit hour index overflow
        (T0 + SKEW, T0 + 2 * SKEW, "our clock"),  # within its own header's skew, not ours
        (T0 + 10 * SKEW, T0 + 10 * SKEW, "future"),
    ],
)
def test_readings_and_headers_ahead_of_our_clock_are_refused(
    header_ts: int, reading_t: int, why: str
) -> None:
    world, a, b = two_nodes()
    rogue = make_rogue(T0)
    entries = [rogue.enrolment.encode(), rogue.reading(1, reading_t)]
    blk = rogue_block(world, a.key, entries, header_ts)
    assert why in refused(b, blk, T0)
    # the same reading at a time within the skew of our clock is admitted
    ok = [rogue.enrolment.encode(), rogue.reading(1, T0 + SKEW // 2)]
    c = admit_remote(
        b,
        *(lambda x: (x.header, x.entries))(rogue_block(world, a.key, ok, T0)),
        check_entries(ok),
        block_hash_at=lambda n, h: None,
        now_ms=T0,
    )
    assert len(c.readings) == 1


def test_transactions_and_logs_ahead_of_our_clock_are_refused() -> None:
    world, a, b = two_nodes()
    rogue = make_rogue(T0 + 10 * SKEW)
    blk = rogue_block(world, a.key, [rogue.enrolment.encode()], T0)
    assert "transaction from the future" in refused(b, blk, T0)
    blk = rogue_block(world, a.key, [rogue.enrolment.encode()], T0 + 10 * SKEW)
    assert "future" in refused(b, blk, T0)
    log = AccessLog.create(
        a.key,
        network=world.genesis.network_id,
        reader=b"\2" * 32,
        patient=b"\3" * 32,
        stream="hr",
        from_ms=0,
        to_ms=0,
        ts_ms=T0 + 10 * SKEW,
        outcome="read",
        reason=b"",
        grant=b"",
        readings=0,
        request=b"\4" * 32,
    )
    blk = rogue_block(world, a.key, [log.encode()], T0)
    assert "access log from the future" in refused(b, blk, T0)
    assert b.rejects["peer_block_future"] == 3


def test_a_value_error_on_peer_data_is_an_invalid_block() -> None:
    world, a, b = two_nodes()
    _, _, commit = produce(world, a)
    linked = dataclasses.replace(commit.block.header, links=(Link(b"\7" * 32, 1, b"\1" * 32),))

    def broken(n: bytes, h: int) -> bytes:
        raise struct.error("argument out of range")

    with pytest.raises(InvalidBlock, match="unusable block data"):
        admit_remote(
            b,
            linked,
            commit.block.entries,
            check_entries(list(commit.block.entries)),
            block_hash_at=broken,
            now_ms=commit.block.header.ts_ms,
        )


def test_links_to_non_authorities_or_twice_to_one_chain_are_refused() -> None:
    world, a, b = two_nodes()
    b.authorities = frozenset({world.node, b.me})
    _, _, commit = produce(world, a)
    hdr = commit.block.header
    for links, why in (
        ((Link(b"\7" * 32, 1, b"\1" * 32),), "no authority"),
        ((Link(b.me, 1, b"\1" * 32), Link(b.me, 2, b"\1" * 32)), "twice"),
    ):
        with pytest.raises(InvalidBlock, match=why):
            admit_remote(
                b,
                dataclasses.replace(hdr, links=links),
                commit.block.entries,
                check_entries(list(commit.block.entries)),
                block_hash_at=lambda n, h: None,
                now_ms=hdr.ts_ms,
            )


def test_the_index_refuses_an_out_of_range_reading_time_as_invalid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The last line: a reading hour past 32 bits is an InvalidBlock, never struct.error."""
    world, a, _ = two_nodes()
    _, _, commit = produce(world, a)
    r = commit.readings[0]
    bad = dataclasses.replace(commit, readings=(dataclasses.replace(r, t_ms=10**17),))
    store = Store(tmp_path / "s")
    try:
        with pytest.raises(InvalidBlock, match="index"):
            store.commit_block(bad)
        assert store.head(world.node) is None  # the write was rolled back
    finally:
        store.close()


def test_gapped_seqs_past_the_stored_bound_are_refused() -> None:
    """Local ingest caps a device's seqs above a gap; a peer's block is held to the
    stored bound (4x), so a mark never outgrows its record's decode bound."""
    world, a, b = two_nodes()
    b.limits.max_seq_gap = 16  # the stored bound becomes 64
    cap = b.limits.max_seq_gap_stored
    rogue = make_rogue(T0)
    gapped = [rogue.reading(2 * i + 2, T0 + i) for i in range(2 * cap)]  # seq 1 never comes
    blk = rogue_block(world, a.key, [rogue.enrolment.encode(), *gapped], T0 + 5_000)
    assert "seqs above a gap" in refused(b, blk, T0 + 5_000)
    assert b.rejects["peer_block_seq_gap"] == 1
    # up to the bound, the same readings are admitted
    fits = [rogue.enrolment.encode(), *gapped[:cap]]
    blk = rogue_block(world, a.key, fits, T0 + 5_000)
    c = admit_remote(
        b,
        blk.header,
        blk.entries,
        check_entries(fits),
        block_hash_at=lambda n, h: None,
        now_ms=T0 + 5_000,
    )
    assert len(b.marks[rogue.device.public].above) == cap
    assert SeqMark.decode(c.seqmarks[rogue.device.public].encode()) == b.marks[rogue.device.public]


def test_a_seq_mark_record_never_exceeds_its_bound() -> None:
    mark = SeqMark(0, set(range(2, 2 + 2 * (MAX_ABOVE_STORED + 1), 2)))
    with pytest.raises(StorageError):
        mark.encode()
    full = SeqMark(2**64 - 1 - 2 * MAX_ABOVE_STORED, set())
    for i in range(MAX_ABOVE_STORED):
        full.above.add(2**64 - 1 - 2 * i)
    assert len(full.encode()) <= MAX_RECORD
    assert SeqMark.decode(full.encode()) == full


def test_an_equivocation_proof_against_no_authority_is_refused() -> None:
    world, a, b = two_nodes()
    b.authorities = frozenset({world.node, b.me})
    stranger = Identity.generate("node")
    twins = [rogue_block(world, stranger.signing, [], T0 + i).header.encode() for i in range(2)]
    proof = EquivocationProof.of(*twins)
    blk = rogue_block(world, a.key, [proof.encode()], T0)
    assert "no authority" in refused(b, blk, T0)
    assert stranger.public not in b.faulty


def test_three_hundred_stream_names_neither_stop_a_commit_nor_mix_streams(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The index gives a stream a one-byte id: 300 made-up stream names (a malicious
    authority's block, or a stranger's enrolments) once raised StorageError in the
    commit, which stops a node.  Past 254 names they share one id, and a read of one of
    them gets its own readings only."""
    from meshhealth.sharing.serve import Decision, collect
    from meshhealth.wire.codec import unpack

    world, a, _ = two_nodes()
    dev = Identity.generate("device")
    patient = world.patient.public

    def reading(stream: str, t: int) -> bytes:
        return Reading.create(
            dev.signing,
            patient=patient,
            stream=stream,
            seq=t - T0 + 1,
            t_ms=t,
            span_ms=0,
            chain_id=b"\1" * 8,
            epoch=0,
            nonce=b"\0" * 24,
            ciphertext=b"ct",
        ).encode()

    names = [f"s{i}" for i in range(300)]
    entries = [reading(n, T0 + i) for i, n in enumerate(names)]
    blk = rogue_block(world, a.key, entries, T0 + 1_000)
    commit = Commit(
        blk,
        tuple(IndexedReading(i, patient, n, T0 + i) for i, n in enumerate(names)),
        {dev.public: SeqMark(len(names), set())},
        (),
    )
    store = Store(tmp_path / "s")
    try:
        store.commit_block(commit)
        for n in ("s0", "s253", "s254", "s299"):
            body, count = collect(store, [], patient, n, Decision(((0, 2**62),), b"", ""))
            _, _, _, blocks = unpack(body, max_len=1 << 20)
            got = [Reading.decode(e).stream for _, picked, _ in blocks for _, e in picked]
            assert got == [n] and count == 1
        # the derived-database check agrees, and a reindex rebuilds the same records
        from meshhealth.store import derived

        assert derived.check(store, derived.scan(store)) == []
        before = store.raw_items("readings")
        derived.rebuild(store, derived.scan(store))
        assert store.raw_items("readings") == before
        assert derived.check(store, derived.scan(store)) == []
    finally:
        store.close()


def test_a_removed_devices_later_readings_are_pruned_in_a_valid_block() -> None:
    """A's block holds readings sealed before A saw the patient's RemoveDevice; B, which
    holds it, admits the block (its validity may not depend on arrival order) but keeps
    only the leaf hashes of the readings from the removal on, and counts them."""
    from meshhealth.wire import RemoveDevice

    world, a, b = two_nodes()
    dev, tx = new_device(world)
    now = T0 + 80_000  # sealed within REMOVAL_GRACE_MS of the removal: A may not know it
    # what a stolen key publishes after the removal, backdated before it (made now: the
    # device's key cursor forgets old epochs)
    ((_, backdated),) = dev.readings("hr", [(T0 + 1_000, (70.0,))])
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
    # and B's own ingest refuses the device's new readings, whatever their time
    ((_, after),) = dev.readings("hr", [(T0 + 61_000, (70.0,))])
    with pytest.raises(Exception, match="removed"):
        b.admit_reading(after, Reading.decode(after), now + 2000)
    with pytest.raises(Rejected, match="removed") as exc:
        b.admit_reading(backdated, Reading.decode(backdated), now + 2000)
    assert exc.value.reason == "removed_device"


def test_a_removed_devices_backdated_readings_in_a_late_block_are_pruned() -> None:
    """Issue 11: a stolen key publishes readings backdated into [enrolment, removal); in a
    block sealed REMOVAL_GRACE_MS or more after the removal (its producer should have
    known of it), every reading of that device is pruned, whatever its time; the block
    stays valid."""
    from meshhealth.chain.acl import REMOVAL_GRACE_MS
    from meshhealth.wire import RemoveDevice

    world, a, b = two_nodes()
    dev, tx = new_device(world)
    other, tx2 = new_device(world)
    cut = T0 + 60_000
    now = cut + REMOVAL_GRACE_MS
    a.admit_tx(tx.encode(), tx, now)
    a.admit_tx(tx2.encode(), tx2, now)
    raws = [raw for _, raw in device_readings(dev, "hr", T0, cut - 1_000)]  # all backdated
    kept = [raw for _, raw in device_readings(other, "hr", T0, cut - 1_000)]
    for raw in raws + kept:
        a.admit_reading(raw, Reading.decode(raw), now)
    commit = a.seal(now)
    removal = RemoveDevice.create(world.patient.signing, device=dev.id, ts_ms=cut)
    b.admit_tx(removal.encode(), removal, now)
    entries = commit.block.entries
    c = admit_remote(
        b, commit.block.header, entries, check_entries(list(entries)),
        block_hash_at=lambda n, h: None, now_ms=now + 1000,
    )  # fmt: skip
    mine = {i for i, e in enumerate(entries) if e in raws}
    assert len(mine) == len(raws) and all(Reading.decode(entries[i]).t_last_ms < cut for i in mine)
    assert c.prune == frozenset(mine)
    assert b.rejects["removed_device"] == len(raws)
