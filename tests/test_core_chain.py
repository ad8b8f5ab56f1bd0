"""Tamper detection on a real chain in a real LMDB store."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from core_helpers import (
    START_EPOCH,
    T0,
    BuiltChain,
    build_chain,
    device_readings,
    make_world,
    new_device,
    raw_delete,
    raw_get,
    raw_put,
    rewrite_chain,
    tampered,
    verify_store,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agents.device import Device
from meshhealth.chain.block import decode_body, encode_body
from meshhealth.chain.verify import verify_chain
from meshhealth.cli.chain_cmds import verify_stores
from meshhealth.errors import InvalidBlock
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import BlockHeader, EnrollDevice, Reading, decode_entry


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, BuiltChain]]:
    """One chain shared by the tamper properties; each example restores what it changed."""
    store = Store(tmp_path_factory.mktemp("chain"))
    built = build_chain(store)
    yield store, built
    store.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Store, BuiltChain]]:
    store = Store(tmp_path / "node")
    built = build_chain(store)
    yield store, built
    store.close()


def bodies_of(store: Store, built: BuiltChain) -> list[list[bytes]]:
    out = []
    for height in range(built.blocks):
        blk = store.block(built.world.node, height)
        assert blk is not None
        out.append(list(blk.entries))
    return out


def expect_invalid(
    store: Store, built: BuiltChain, heights: set[int], match: str | None = None
) -> None:
    with pytest.raises(InvalidBlock, match=match) as ei:
        verify_store(store, built.world)
    assert ei.value.height in heights, (ei.value.height, heights, str(ei.value))
    assert ei.value.node == built.world.node


# --- the untouched chain ----------------------------------------------------


def test_chain_verifies(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    w = built.world
    rep = verify_store(store, w)
    assert rep.blocks == built.blocks == 4
    assert rep.readings == built.readings > 0
    assert rep.txs == built.txs == 2
    assert rep.entries == built.readings + built.txs
    head = store.head(w.node)
    assert head is not None
    assert head == (3, rep.head)
    assert head[1] == built.commits[-1].block.hash
    # what the store holds is exactly what the batcher sealed
    for c in built.commits:
        raw = store.raw_block(w.node, c.block.header.height)
        assert raw == (c.block.header.encode(), encode_body(c.block.entries))
    # heights and prev links chain from the network id
    prev = w.network
    for c in built.commits:
        assert c.block.header.prev == prev
        prev = c.block.hash
    # readings really span several key epochs
    epochs = {
        decode_entry(e).epoch
        for c in built.commits
        for e in c.block.entries
        if isinstance(decode_entry(e), Reading)
    }
    assert len(epochs) >= 3
    assert min(epochs) == START_EPOCH


def test_verify_chain_refuses_non_authority_and_wrong_network(
    fresh: tuple[Store, BuiltChain],
) -> None:
    store, built = fresh
    w = built.world
    with pytest.raises(InvalidBlock, match="not an authority"):
        verify_chain(
            w.node, store.iter_raw_chain(w.node), network=w.network, authorities={b"\0" * 32}
        )
    with (
        pytest.raises(InvalidBlock, match="another network") as ei,
        contextlib.closing(store.iter_raw_chain(w.node)) as blocks,
    ):
        verify_chain(w.node, blocks, network=b"\1" * 32, authorities=w.authorities)
    assert ei.value.height == 0


# --- single-byte corruption (property) --------------------------------------


def expect_caught(
    store: Store, built: BuiltChain, data: st.DataObject, corrupt: Callable[[bytes], bytes]
) -> None:
    """Corrupt one drawn stored header or body; verification must name that block, or the
    next one (whose prev link no longer matches); then the store is restored."""
    node = built.world.node
    height = data.draw(st.integers(0, built.blocks - 1), label="height")
    db = data.draw(st.sampled_from(["headers", "bodies"]), label="db")
    orig = raw_get(store, db, node, height)
    assert orig is not None
    with tampered(store, db, node, height, corrupt(orig)):
        expect_invalid(store, built, {height, height + 1})
    verify_store(store, built.world)  # restored


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_byte_flip_is_caught(
    shared: tuple[Store, BuiltChain], data: st.DataObject
) -> None:
    def flip(orig: bytes) -> bytes:
        bad = bytearray(orig)
        bad[data.draw(st.integers(0, len(orig) - 1), label="offset")] ^= data.draw(
            st.integers(1, 255), label="mask"
        )
        return bytes(bad)

    expect_caught(*shared, data, flip)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_truncation_or_extension_is_caught(
    shared: tuple[Store, BuiltChain], data: st.DataObject
) -> None:
    def resize(orig: bytes) -> bytes:
        if data.draw(st.booleans(), label="truncate"):
            return orig[: data.draw(st.integers(0, len(orig) - 1), label="keep")]
        return orig + data.draw(st.binary(min_size=1, max_size=8), label="extra")

    expect_caught(*shared, data, resize)


# --- structural tampering ---------------------------------------------------


@pytest.mark.parametrize("height", [0, 1, 2])
def test_deleting_an_inner_block_is_caught(fresh: tuple[Store, BuiltChain], height: int) -> None:
    store, built = fresh
    raw_delete(store, "headers", built.world.node, height)
    raw_delete(store, "bodies", built.world.node, height)
    expect_invalid(store, built, {height}, match="missing block")


def test_deleting_the_last_block_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    last = built.blocks - 1
    raw_delete(store, "headers", built.world.node, last)
    raw_delete(store, "bodies", built.world.node, last)
    expect_invalid(store, built, {last}, match="head")


def test_deleting_a_body_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    raw_delete(store, "bodies", built.world.node, 1)
    expect_invalid(store, built, {1}, match="body missing")


def test_swapping_two_readings_in_a_body_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    node = built.world.node
    for height, entries in enumerate(bodies_of(store, built)):
        for i in range(len(entries) - 1):
            swapped = list(entries)
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            with tampered(store, "bodies", node, height, encode_body(swapped)):
                expect_invalid(store, built, {height}, match="Merkle root")


def test_swapping_blocks_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    node = built.world.node
    h1, b1 = raw_get(store, "headers", node, 1), raw_get(store, "bodies", node, 1)
    h2, b2 = raw_get(store, "headers", node, 2), raw_get(store, "bodies", node, 2)
    assert h1 and b1 and h2 and b2
    raw_put(store, "headers", node, 1, h2)
    raw_put(store, "bodies", node, 1, b2)
    raw_put(store, "headers", node, 2, h1)
    raw_put(store, "bodies", node, 2, b1)
    expect_invalid(store, built, {1, 2}, match="expected height 1")


@pytest.mark.parametrize("how", ["swap", "flip"])
def test_misplaced_header_is_reported_at_its_stored_height(
    fresh: tuple[Store, BuiltChain], how: str
) -> None:
    store, built = fresh
    node = built.world.node
    h1, h2 = raw_get(store, "headers", node, 1), raw_get(store, "headers", node, 2)
    assert h1 and h2
    if how == "swap":  # block 2's header stored at height 1
        raw_put(store, "headers", node, 1, h2)
    else:  # one bit flipped in block 1's height field: it now claims height 3
        hdr = BlockHeader.decode(h1)
        i = h1.index(bytes([0x01]) + b"\xc4\x20" + hdr.prev)  # height fixint, then prev
        bad = bytearray(h1)
        bad[i] ^= 0x02
        assert BlockHeader.decode(bytes(bad)).height == 3
        raw_put(store, "headers", node, 1, bytes(bad))
    with pytest.raises(InvalidBlock, match="expected height 1") as ei:
        verify_store(store, built.world)
    assert ei.value.height == 1  # the CLI prints "block <height>": it must name the bad one


def _outsider_reading(built: BuiltChain) -> bytes:
    """A properly encrypted, validly signed reading from a device never enrolled on the chain."""
    outsider, _tx = new_device(built.world)  # its enrolment is never submitted
    (_, raw), *_ = device_readings(outsider, "hr", T0 + 60_000, T0 + 70_000)
    r = Reading.decode(raw)
    assert r.verify() is r
    return raw


def _reading_indexes(entries: list[bytes]) -> list[int]:
    return [i for i, e in enumerate(entries) if isinstance(decode_entry(e), Reading)]


def test_replacing_a_reading_by_an_outsiders_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    node = built.world.node
    raw = _outsider_reading(built)
    bodies = bodies_of(store, built)
    for height, entries in enumerate(bodies):
        i = _reading_indexes(entries)[-1]
        swapped = [*entries[:i], raw, *entries[i + 1 :]]
        with tampered(store, "bodies", node, height, encode_body(swapped)):
            expect_invalid(store, built, {height}, match="Merkle root")


def test_resigned_outsider_reading_is_caught_by_the_acl(fresh: tuple[Store, BuiltChain]) -> None:
    """Even a node that re-signs the chain can't slip in an unenrolled device's reading."""
    store, built = fresh
    bodies = bodies_of(store, built)
    i = _reading_indexes(bodies[1])[0]
    bodies[1][i] = _outsider_reading(built)
    rewrite_chain(store, built.world, bodies, 1)
    expect_invalid(store, built, {1}, match="unknown_device")


def test_resigned_chain_without_tampering_still_verifies(fresh: tuple[Store, BuiltChain]) -> None:
    # the control for the re-signing tests: rewrite_chain itself yields a valid chain
    store, built = fresh
    rewrite_chain(store, built.world, bodies_of(store, built), 1)
    assert verify_store(store, built.world).readings == built.readings


def test_resigned_reading_before_its_enrolment_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    bodies = bodies_of(store, built)
    assert isinstance(decode_entry(bodies[0][0]), EnrollDevice)
    bodies[0][0], bodies[0][1] = bodies[0][1], bodies[0][0]
    rewrite_chain(store, built.world, bodies, 0)
    expect_invalid(store, built, {0}, match="unknown_device")


def test_resigned_duplicate_reading_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    bodies = bodies_of(store, built)
    bodies[2].append(bodies[1][_reading_indexes(bodies[1])[0]])
    rewrite_chain(store, built.world, bodies, 2)
    expect_invalid(store, built, {2}, match="twice")


def test_resigned_reading_for_a_stream_not_enrolled_is_caught(
    fresh: tuple[Store, BuiltChain],
) -> None:
    # device B is enrolled for "hr" only; a "bp" reading from it is refused
    store, built = fresh
    w = built.world
    dev_b = w.devices[1]
    assert {s.stream for s in w.enrolments[1].streams} == {"hr"}
    spare, _ = new_device(w, streams=("bp",))  # only lends its "bp" key cursor
    forger = Device(dev_b.identity, dev_b.patient, {"bp": spare.cursors["bp"]}, next_seq=999)
    (_, raw), *_ = device_readings(forger, "bp", T0 + 300_000, T0 + 301_000)
    r = Reading.decode(raw)
    assert r.device == dev_b.id
    assert r.stream == "bp"
    assert r.verify() is r
    bodies = bodies_of(store, built)
    bodies[3].append(raw)
    rewrite_chain(store, w, bodies, 3)
    expect_invalid(store, built, {3}, match="not_enrolled")


def test_resigned_block_by_another_key_is_caught(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    other = make_world()
    other_w = dataclasses.replace(built.world, authority=other.authority)
    bodies = bodies_of(store, built)
    # same node field, signed by another key
    hdr = store.header(built.world.node, 2)
    assert hdr is not None
    forged = BlockHeader.create(
        other.authority.signing,
        **{n: getattr(hdr, n) for n, _ in BlockHeader.FIELDS if n != "node"},
    )
    forged = dataclasses.replace(forged, node=built.world.node)
    raw_put(store, "headers", built.world.node, 2, forged.encode())
    expect_invalid(store, built, {2}, match="signature")
    # a whole chain re-signed by a non-authority is refused at once
    rewrite_chain(store, other_w, bodies, 0)
    assert (
        verify_chain(
            other_w.node,
            store.iter_raw_chain(other_w.node),
            network=other_w.network,
            authorities={other_w.node},
        ).blocks
        == built.blocks
    )  # valid in itself
    with pytest.raises(InvalidBlock, match="not an authority"):
        verify_store(store, other_w)


def test_stored_body_decodes_to_the_committed_entries(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    for c in built.commits:
        raw = raw_get(store, "bodies", built.world.node, c.block.header.height)
        assert raw is not None
        assert decode_body(raw) == c.block.entries


# --- the CLI ----------------------------------------------------------------


def test_cli_verify_stores_before_and_after_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node-0"
    store = Store(path)
    built = build_chain(store)
    store.close()
    assert verify_stores(path) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and f"{built.readings} readings" in out
    assert verify_stores(tmp_path) == 0  # found under a parent directory too
    capsys.readouterr()

    store = Store(path)
    body = raw_get(store, "bodies", built.world.node, 2)
    assert body is not None
    bad = bytearray(body)
    bad[len(bad) // 2] ^= 0x40
    raw_put(store, "bodies", built.world.node, 2, bytes(bad))
    store.close()
    assert verify_stores(path) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "block 2" in out


def test_store_block_hash_is_the_header_hash(fresh: tuple[Store, BuiltChain]) -> None:
    store, built = fresh
    node = built.world.node
    for height, commit in enumerate(built.commits):
        assert store.block_hash(node, height) == commit.block.hash
    assert store.block_hash(node, len(built.commits)) is None
