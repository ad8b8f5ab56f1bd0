"""Shared fixtures-in-code for the core tests (tests/test_core_*.py).

Builds a small, real world: a genesis with one authority node, a patient
with per-stream key chains, devices enrolled with
``device_agents.simulate.enrollment`` and readings made by
``device_agents.device.Device``, batched by the real ``Batcher``.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from device_agents.device import Device
from device_agents.sensors import PatientPhysiology, samples
from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import block_hash, build_block, encode_body
from meshhealth.chain.verify import ChainReport, verify_chain
from meshhealth.config import Authority, Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.ingest.batcher import Batcher, BatchLimits
from meshhealth.ingest.commit import Commit
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.keychain import KeyChain
from meshhealth.store.lmdb_store import Store, chain_key
from meshhealth.wire import EnrollDevice, Grant, Reading, Rechain
from meshhealth.wire.types import (
    MAX_EPOCH_MS,
    MAX_GRANT,
    SEALED_OVERHEAD,
    GrantStream,
    SealedKey,
)

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
EPOCH_MS = 60_000  # one-minute key epochs, so a short chain crosses several
START_EPOCH = T0 // EPOCH_MS
STREAMS = ("bp", "hr")


@dataclass
class World:
    genesis: Genesis
    authority: Identity
    patient: Identity
    chains: dict[str, KeyChain]
    devices: list[Device] = field(default_factory=list)
    enrolments: list[EnrollDevice] = field(default_factory=list)

    @property
    def network(self) -> bytes:
        return self.genesis.network_id

    @property
    def node(self) -> bytes:
        return self.authority.public

    @property
    def authorities(self) -> set[bytes]:
        return {a.key for a in self.genesis.authorities}


def make_world(streams: tuple[str, ...] = STREAMS, epoch_ms: int = EPOCH_MS) -> World:
    authority = Identity.generate("node")
    genesis = Genesis("core-test", T0, (Authority("node-0", authority.public),))
    patient = Identity.generate("patient")
    chains = {s: KeyChain.new(s, T0 // epoch_ms, epoch_ms) for s in streams}
    return World(genesis, authority, patient, chains)


def new_device(
    world: World, *, streams: tuple[str, ...] | None = None, ts_ms: int = T0
) -> tuple[Device, EnrollDevice]:
    """A device and its patient-signed enrolment (which the device accepts)."""
    dev = Device(Identity.generate("device"), world.patient.public)
    chains = world.chains if streams is None else {s: world.chains[s] for s in streams}
    tx = enrollment(world.patient, chains, dev.id, START_EPOCH, ts_ms)
    dev.accept_enrollment(tx)
    return dev, tx


def device_readings(
    dev: Device, stream: str, t0: int, t1: int, *, max_samples: int = 15, seed: int = 7
) -> list[tuple[int, bytes]]:
    return dev.readings(
        stream, samples(PatientPhysiology(seed), stream, t0, t1), max_samples=max_samples
    )


def make_batcher(world: World, **limits: Any) -> Batcher:
    return Batcher(world.authority.signing, world.network, BatchLimits(**limits), AccessState(), {})


@dataclass
class BuiltChain:
    world: World
    commits: list[Commit]

    @property
    def blocks(self) -> int:
        return len(self.commits)

    @property
    def readings(self) -> int:
        return sum(len(c.readings) for c in self.commits)

    @property
    def txs(self) -> int:
        return sum(len(c.txs) for c in self.commits)


def build_chain(store: Store, world: World | None = None) -> BuiltChain:
    """Four blocks: enrolment + readings, readings, a second enrolment + readings, readings.

    Sample times span several one-minute key epochs; every block is sealed
    by the real batcher and committed with ``Store.commit_block``.
    """
    world = world or make_world()
    b = make_batcher(world, interval_ms=1_000, max_entries=1_000)
    dev_a, tx_a = new_device(world, ts_ms=T0)
    dev_b, tx_b = new_device(world, streams=("hr",), ts_ms=T0 + 120_000)
    world.devices += [dev_a, dev_b]
    world.enrolments += [tx_a, tx_b]
    commits: list[Commit] = []

    def seal(now: int) -> None:
        assert b.due(now)
        c = b.seal(now)
        store.commit_block(c)
        commits.append(c)

    minute = 60_000
    # block 0: enrolment of A, then A's readings of minute 0
    now = T0 + minute + 5_000
    b.admit_tx(tx_a.encode(), tx_a, now)
    for _, raw in device_readings(dev_a, "hr", T0, T0 + minute):
        b.admit_reading(raw, Reading.decode(raw), now)
    for _, raw in device_readings(dev_a, "bp", T0, T0 + minute):
        b.admit_reading(raw, Reading.decode(raw), now)
    seal(now + 1_000)
    # block 1: minute 1 of A (crosses into the next key epoch)
    now = T0 + 2 * minute + 5_000
    for _, raw in device_readings(dev_a, "hr", T0 + minute, T0 + 2 * minute):
        b.admit_reading(raw, Reading.decode(raw), now)
    seal(now + 1_000)
    # block 2: enrolment of B, readings of A and B for minute 2
    now = T0 + 3 * minute + 5_000
    b.admit_tx(tx_b.encode(), tx_b, now)
    for dev in (dev_a, dev_b):
        for _, raw in device_readings(dev, "hr", T0 + 2 * minute, T0 + 3 * minute):
            b.admit_reading(raw, Reading.decode(raw), now)
    seal(now + 1_000)
    # block 3: minute 3 of B only
    now = T0 + 4 * minute + 5_000
    for _, raw in device_readings(dev_b, "hr", T0 + 3 * minute, T0 + 4 * minute):
        b.admit_reading(raw, Reading.decode(raw), now)
    seal(now + 1_000)
    store.set_meta("genesis", world.genesis.dumps().encode())
    return BuiltChain(world, commits)


def verify_store(store: Store, world: World) -> ChainReport:
    """``verify_chain`` over the store's raw chain, against the stored head."""
    with contextlib.closing(store.iter_raw_chain(world.node)) as blocks:
        return verify_chain(
            world.node,
            blocks,
            network=world.network,
            authorities=world.authorities,
            expected_head=store.head(world.node),
        )


# --- raw LMDB surgery -----------------------------------------------------


def raw_get(store: Store, db: str, node: bytes, height: int) -> bytes | None:
    with store.env.begin() as txn:
        v = txn.get(chain_key(node, height), db=store.db[db])
    return None if v is None else bytes(v)


def raw_put(store: Store, db: str, node: bytes, height: int, value: bytes) -> None:
    with store.env.begin(write=True) as txn:
        txn.put(chain_key(node, height), value, db=store.db[db])


def raw_delete(store: Store, db: str, node: bytes, height: int) -> None:
    with store.env.begin(write=True) as txn:
        assert txn.delete(chain_key(node, height), db=store.db[db])


@contextlib.contextmanager
def tampered(store: Store, db: str, node: bytes, height: int, value: bytes) -> Iterator[None]:
    """Write ``value`` over one stored header/body, restoring the original afterwards."""
    orig = raw_get(store, db, node, height)
    assert orig is not None
    raw_put(store, db, node, height, value)
    try:
        yield
    finally:
        raw_put(store, db, node, height, orig)


def rewrite_chain(store: Store, world: World, bodies: list[list[bytes]], from_height: int) -> None:
    """What a malicious (key-holding) node could do: re-sign the chain from ``from_height``.

    Blocks below ``from_height`` are kept; the rest are rebuilt from ``bodies``
    with valid Merkle roots, prev links and node signatures, and the head moved.
    """
    if from_height == 0:
        prev = world.network
    else:
        hdr = store.header(world.node, from_height - 1)
        assert hdr is not None
        prev = block_hash(hdr)
    with store.env.begin(write=True) as txn:
        for height in range(from_height, len(bodies)):
            block = build_block(
                world.authority.signing,
                network=world.network,
                height=height,
                prev=prev,
                ts_ms=T0 + height,
                entries=bodies[height],
            )
            key = chain_key(world.node, height)
            txn.put(key, block.header.encode(), db=store.db["headers"])
            txn.put(key, encode_body(block.entries), db=store.db["bodies"])
            prev = block.hash
        txn.put(world.node, struct.pack(">Q", len(bodies) - 1) + prev, db=store.db["heads"])


def max_grant(patient: Identity, grantee: bytes, ts_ms: int) -> Grant:
    """A validly signed Grant as close to ``MAX_GRANT`` bytes as its fields allow (a bounded
    window of ~2,040 one-minute keys; the sealed bytes are random, nodes never open them)."""

    def make(k: int) -> Grant:
        s = GrantStream("hr", b"\1" * 8, 0, 60_000, 0, k - 1, os.urandom(SEALED_OVERHEAD + 32 * k))
        return Grant.create(
            patient.signing,
            grantee=grantee,
            ts_ms=ts_ms,
            from_ms=0,
            until_ms=k * 60_000,
            pseudonymous=0,
            streams=(s,),
        )

    k = (MAX_GRANT - len(make(1).encode())) // 32
    while len(make(k + 1).encode()) <= MAX_GRANT:
        k += 1
    while len(make(k).encode()) > MAX_GRANT:
        k -= 1
    return make(k)


# --- what one malicious authority can sign (issue 11) ---------------------------------


@dataclass
class Rogue:
    """A patient and a device of a malicious authority's own making, enrolled on a key
    chain of week-long epochs (so a reading may sit as far ahead as 10**17 ms)."""

    patient: Identity
    device: Identity
    chain: KeyChain
    enrolment: EnrollDevice

    def reading(self, seq: int, t_ms: int, *, stream: str = "hr") -> bytes:
        """A validly signed reading at ``t_ms`` (random ciphertext: nodes never open it)."""
        return Reading.create(
            self.device.signing,
            patient=self.patient.public,
            stream=stream,
            seq=seq,
            t_ms=t_ms,
            span_ms=0,
            chain_id=self.chain.chain_id,
            epoch=t_ms // self.chain.epoch_ms,
            nonce=os.urandom(24),
            ciphertext=os.urandom(32),
        ).encode()


def make_rogue(ts_ms: int) -> Rogue:
    patient, device = Identity.generate("patient"), Identity.generate("device")
    chain = KeyChain.new("hr", 0, MAX_EPOCH_MS)
    tx = enrollment(patient, {"hr": chain}, device.public, 0, ts_ms)
    return Rogue(patient, device, chain, tx)


def stranger_rechain(device: bytes, ts_ms: int) -> Rechain:
    """A near-maximal Rechain, signed by a throwaway patient key, that names ``device``
    (64 sealed keys to devices, the first ``device``, and 64 to grants: ~15 KiB)."""
    stranger = Identity.generate("patient")
    keys = [SealedKey(device, 0, os.urandom(80))]
    keys += [SealedKey(os.urandom(32), 0, os.urandom(80)) for _ in range(63)]
    grants = tuple(SealedKey(os.urandom(32), 0, os.urandom(80)) for _ in range(64))
    return Rechain.create(
        stranger.signing,
        ts_ms=ts_ms,
        stream="hr",
        chain_id=os.urandom(8),
        start_epoch=0,
        epoch_ms=60_000,
        devices=tuple(keys),
        grants=grants,
    )


def junk_grant(
    patient: Identity, keys: int, *, ts_ms: int = 1, until_ms: int | None = None
) -> Grant:
    """A bounded Grant of ``keys`` one-second epochs with random key bytes, about
    ``32 * keys`` bytes, to a random grantee: volume for the quota and budget tests."""
    s = GrantStream("hr", os.urandom(8), 0, 1000, 0, keys - 1, os.urandom(48 + 32 * keys))
    return Grant.create(
        patient.signing,
        grantee=os.urandom(32),
        ts_ms=ts_ms,
        from_ms=0,
        until_ms=keys * 1000 if until_ms is None else until_ms,
        pseudonymous=0,
        streams=(s,),
    )
