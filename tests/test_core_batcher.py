"""The pure ingest core: admission policy, sealing, and the stateless reading check."""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.signing
import pytest
from core_helpers import (
    EPOCH_MS,
    START_EPOCH,
    T0,
    World,
    device_readings,
    make_batcher,
    make_world,
    new_device,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agents.device import Device
from meshhealth.chain import merkle
from meshhealth.chain.block import block_hash, encode_body
from meshhealth.chain.verify import verify_chain
from meshhealth.crypto.hashing import h
from meshhealth.errors import Rejected
from meshhealth.ingest import seqmarks
from meshhealth.ingest.batcher import Batcher, make_receipt
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.ingest.verify import check_chunk, check_one, rebuild
from meshhealth.sharing.keychain import encode_samples, encrypt
from meshhealth.wire import EnrollDevice, Reading, Receipt, ReceiptV2
from meshhealth.wire.types import MAX_READING

SKEW = 30_000


def signed_reading(dev: Device, world: World, **over: Any) -> Reading:
    """A reading signed by ``dev`` for its patient; fields default to a valid "hr" reading."""
    fields: dict[str, Any] = dict(
        patient=world.patient.public,
        stream="hr",
        seq=dev.next_seq,
        t_ms=T0,
        span_ms=0,
        chain_id=world.chains["hr"].chain_id,
        epoch=START_EPOCH,
        nonce=b"\0" * 24,
        ciphertext=b"ct",
    )
    fields.update(over)
    dev.next_seq = max(dev.next_seq, fields["seq"] + 1)
    return Reading.create(dev.identity.signing, **fields)


class Setup:
    def __init__(self, **limits: Any) -> None:
        self.world = make_world()
        self.b: Batcher = make_batcher(self.world, **limits)
        self.dev, self.tx = new_device(self.world, streams=("hr",))
        self.now = T0 + 10_000
        self.b.admit_tx(self.tx.encode(), self.tx, self.now)

    def admit(self, r: Reading, now: int | None = None, **kw: Any) -> None:
        self.b.admit_reading(r.encode(), r, self.now if now is None else now, **kw)

    def reason(self, r: Reading, now: int | None = None, **kw: Any) -> str:
        before = self.b.pending
        with pytest.raises(Rejected) as ei:
            self.admit(r, now, **kw)
        assert self.b.pending == before  # a rejected reading never enters the batch
        return ei.value.reason


@pytest.fixture
def s() -> Setup:
    return Setup()


# --- rejections -------------------------------------------------------------


def test_accepts_a_good_reading(s: Setup) -> None:
    s.admit(signed_reading(s.dev, s.world))
    assert s.b.pending == 2
    assert s.b.accepted == 2


def test_unknown_device(s: Setup) -> None:
    stranger, _ = new_device(s.world)  # enrolment never admitted
    assert s.reason(signed_reading(stranger, s.world)) == "unknown_device"


def test_not_enrolled_stream(s: Setup) -> None:
    r = signed_reading(s.dev, s.world, stream="bp", chain_id=s.world.chains["bp"].chain_id)
    assert s.reason(r) == "not_enrolled"
    other_patient = make_world()
    r = signed_reading(s.dev, s.world, patient=other_patient.patient.public)
    assert s.reason(r) == "not_enrolled"


def test_unknown_key_chain(s: Setup) -> None:
    assert s.reason(signed_reading(s.dev, s.world, chain_id=b"\x99" * 8)) == "unknown_key_chain"


def test_duplicate_pending_and_after_seal(s: Setup) -> None:
    r = signed_reading(s.dev, s.world, seq=1)
    s.admit(r)
    assert s.reason(r) == "duplicate"
    # the same seq with other bytes is still a duplicate
    assert s.reason(signed_reading(s.dev, s.world, seq=1, ciphertext=b"other")) == "duplicate"
    assert s.dev.id in s.b.want_receipt
    s.b.want_receipt.clear()
    c = s.b.seal(s.now + 1_000)
    assert c.seqmarks[s.dev.id] == SeqMark(1, set())
    assert s.reason(r, s.now + 2_000) == "duplicate"
    assert s.dev.id in s.b.want_receipt
    # out of order: 3 then 2 then 3 again
    s.admit(signed_reading(s.dev, s.world, seq=3))
    assert s.reason(signed_reading(s.dev, s.world, seq=3)) == "duplicate"
    s.admit(signed_reading(s.dev, s.world, seq=2))
    c = s.b.seal(s.now + 3_000)
    assert c.seqmarks[s.dev.id] == SeqMark(3, set())
    for seq in (1, 2, 3):
        assert s.reason(signed_reading(s.dev, s.world, seq=seq)) == "duplicate"


def test_future_timestamp(s: Setup) -> None:
    t = T0 + 20_000
    r = signed_reading(s.dev, s.world, t_ms=t - 5_000, span_ms=5_000)
    assert s.reason(r, now=t - SKEW - 1) == "future_timestamp"
    s.admit(r, now=t - SKEW)  # exactly at the allowed skew
    assert s.b.pending == 2


def test_wrong_epoch(s: Setup) -> None:
    # a reading signed with a tampered epoch field
    assert s.reason(signed_reading(s.dev, s.world, epoch=START_EPOCH + 1)) == "wrong_epoch"
    assert s.reason(signed_reading(s.dev, s.world, epoch=START_EPOCH - 1)) == "wrong_epoch"
    # or whose samples spill into the next epoch
    r = signed_reading(s.dev, s.world, t_ms=T0 + EPOCH_MS - 10, span_ms=10)
    assert s.reason(r, now=T0 + EPOCH_MS) == "wrong_epoch"
    # the start of the next epoch under the next epoch's number is fine
    s.admit(
        signed_reading(s.dev, s.world, t_ms=T0 + EPOCH_MS, epoch=START_EPOCH + 1), now=T0 + EPOCH_MS
    )


def test_topic_mismatch(s: Setup) -> None:
    r = signed_reading(s.dev, s.world)
    assert s.reason(r, topic_device=b"\x01" * 32) == "topic_mismatch"
    s.admit(r, topic_device=s.dev.id)
    assert s.b.pending == 2


def test_seq_window(monkeypatch: pytest.MonkeyPatch, s: Setup) -> None:
    monkeypatch.setattr(seqmarks, "MAX_ABOVE", 2)
    for seq in (5, 7):
        s.admit(signed_reading(s.dev, s.world, seq=seq))
    s.b.seal(s.now + 1)
    assert s.reason(signed_reading(s.dev, s.world, seq=9)) == "seq_window"
    s.admit(signed_reading(s.dev, s.world, seq=1))  # the gap itself is always welcome


def test_transaction_rejections(s: Setup) -> None:
    w = s.world
    assert _tx_reason(s.b, s.tx, s.now) == "duplicate_tx"
    _, tx2 = new_device(w)
    forged = dataclasses.replace(tx2, ts_ms=tx2.ts_ms + 1)
    assert _tx_reason(s.b, forged, s.now) == "bad_signature"
    _, late = new_device(w, ts_ms=s.now + SKEW + 1)
    assert _tx_reason(s.b, late, s.now) == "future_timestamp"
    selfie = EnrollDevice.create(
        w.patient.signing, device=w.patient.public, ts_ms=T0, streams=tx2.streams
    )
    assert _tx_reason(s.b, selfie, s.now) == "bad_tx"
    assert s.b.pending == 1
    assert s.b.admit_tx(tx2.encode(), tx2, s.now) == h(tx2.encode())
    assert s.b.pending == 2


def _tx_reason(b: Batcher, tx: EnrollDevice, now: int) -> str:
    with pytest.raises(Rejected) as ei:
        b.admit_tx(tx.encode(), tx, now)
    return ei.value.reason


# --- sealing ----------------------------------------------------------------


def test_due_by_interval() -> None:
    st_ = Setup(interval_ms=1_000, max_entries=100)
    b = st_.b
    started = st_.now  # the enrolment started the batch
    assert b.deadline_ms() == started + 1_000
    st_.admit(signed_reading(st_.dev, st_.world), now=started + 500)
    assert b.deadline_ms() == started + 1_000  # later entries don't move the deadline
    assert not b.due(started + 999)
    assert b.due(started + 1_000)
    b.seal(started + 1_000)
    assert b.pending == 0
    assert b.deadline_ms() is None
    assert not b.due(started + 10**9)  # nothing pending, never due


def test_due_by_max_entries() -> None:
    st_ = Setup(interval_ms=10**9, max_entries=3)
    st_.admit(signed_reading(st_.dev, st_.world))
    assert not st_.b.full()
    assert not st_.b.due(st_.now)
    st_.admit(signed_reading(st_.dev, st_.world))
    assert st_.b.full()
    assert st_.b.due(st_.now)


def test_due_by_bytes() -> None:
    st_ = Setup(interval_ms=10**9, max_bytes=4096 + 600)
    assert not st_.b.due(st_.now)
    st_.admit(signed_reading(st_.dev, st_.world, ciphertext=b"\0" * 400))
    assert st_.b.due(st_.now)


def test_seal_chains_heights_and_prev_links() -> None:
    st_ = Setup(interval_ms=1, max_entries=10_000)
    w, b = st_.world, st_.b
    commits = []
    now = st_.now
    for i in range(4):
        raws = device_readings(st_.dev, "hr", T0 + i * 10_000, T0 + (i + 1) * 10_000, max_samples=4)
        now = T0 + (i + 1) * 10_000
        for _, raw in raws:
            b.admit_reading(raw, Reading.decode(raw), now)
        commits.append(b.seal(now + 5))
    prev = w.network
    for height, c in enumerate(commits):
        hdr = c.block.header
        assert hdr.height == height
        assert hdr.prev == prev
        assert hdr.network == w.network and hdr.node == w.node
        assert hdr.ts_ms == T0 + (height + 1) * 10_000 + 5
        assert hdr.count == len(c.block.entries)
        assert hdr.root == merkle.root(c.block.entries)
        assert hdr.verify() is hdr
        for ir in c.readings:
            r = Reading.decode(c.block.entries[ir.index])
            assert (ir.patient, ir.stream, ir.t_ms) == (r.patient, r.stream, r.t_ms)
        prev = block_hash(hdr)
    assert (b.height, b.prev) == (3, prev)
    assert [len(c.txs) for c in commits] == [1, 0, 0, 0]
    tid, idx = commits[0].txs[0]
    assert tid == h(st_.tx.encode()) and commits[0].block.entries[idx] == st_.tx.encode()
    assert commits[-1].seqmarks[st_.dev.id].contiguous == st_.dev.next_seq - 1
    rep = verify_chain(
        w.node,
        [
            (c.block.header.height, c.block.header.encode(), encode_body(c.block.entries))
            for c in commits
        ],
        network=w.network,
        authorities=w.authorities,
        expected_head=(3, prev),
    )
    assert rep.readings == sum(len(c.readings) for c in commits)
    # a receipt for the device covers its contiguous seqs
    head = (w.node, b.height, b.prev)
    rc = make_receipt(w.authority.signing, w.network, st_.dev.id, b.marks[st_.dev.id], head, now)
    assert ReceiptV2.decode(rc.encode()).verify() == rc
    assert rc.seq == st_.dev.next_seq - 1 and rc.height == 3
    assert (rc.chain, rc.hash) == (w.node, commits[-1].block.hash)


# --- the stateless verifier -------------------------------------------------


def _valid_raw() -> tuple[Reading, bytes]:
    w = make_world()
    dev, _ = new_device(w)
    (_, raw), *_ = device_readings(dev, "hr", T0, T0 + 5_000)
    return Reading.decode(raw), raw


def test_check_one_good_reading_rebuilds_exactly() -> None:
    r, raw = _valid_raw()
    res = check_one(raw)
    assert res[0] is None
    assert rebuild(res) == r
    assert rebuild(res).encode() == raw
    assert check_chunk([raw, b"", raw]) == [res, ("malformed",), res]


def test_check_one_reasons() -> None:
    r, raw = _valid_raw()
    assert check_one(b"\x00" * (MAX_READING + 1)) == ("oversized",)
    assert check_one(raw + b"\x00" * (MAX_READING + 1 - len(raw))) == ("oversized",)
    assert check_one(raw + b"\x00") == ("malformed",)
    assert check_one(b"") == ("malformed",)
    key = nacl.signing.SigningKey(b"\5" * 32)
    rc = Receipt.create(key, network=b"\0" * 32, device=r.device, seq=1, height=0, ts_ms=0)
    assert check_one(rc.encode()) == ("malformed",)
    # a flipped signature bit, a changed field, another signer
    bad_sig = dataclasses.replace(r, sig=bytes([r.sig[0] ^ 1]) + r.sig[1:])
    assert check_one(bad_sig.encode()) == ("bad_signature",)
    assert check_one(dataclasses.replace(r, seq=r.seq + 1).encode()) == ("bad_signature",)
    assert check_one(dataclasses.replace(r, device=b"\0" * 32).encode()) == ("bad_signature",)
    assert check_one(dataclasses.replace(r, device=b"\xff" * 32).encode()) == ("bad_signature",)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=MAX_READING + 50))
def test_check_one_random_bytes(data: bytes) -> None:
    res = check_one(data)
    if len(data) > MAX_READING:
        assert res == ("oversized",)
    else:
        assert res in {("malformed",), ("bad_signature",)} or rebuild(res).encode() == data


_SAMPLE = _valid_raw()


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 10**6), mask=st.integers(1, 255))
def test_check_one_flipped_byte_never_passes(pos: int, mask: int) -> None:
    _, raw = _SAMPLE
    bad = bytearray(raw)
    bad[pos % len(bad)] ^= mask
    assert check_one(bytes(bad)) in {("malformed",), ("bad_signature",)}


def test_batcher_accepts_device_made_readings_after_real_encryption() -> None:
    # readings built outside Device with the same key material are accepted too
    st_ = Setup()
    cur = st_.dev.cursors["hr"]
    hdr = Reading(
        st_.dev.id,
        st_.world.patient.public,
        "hr",
        1,
        T0,
        0,
        cur.chain_id,
        START_EPOCH,
        b"\0" * 24,
        b"",
        b"\0" * 64,
    )
    nonce, ct = encrypt(
        cur.message_key(START_EPOCH),
        encode_samples("/min", 0, T0, [(T0, (60.0,))]),
        hdr.associated_data(),
    )
    r = Reading.create(
        st_.dev.identity.signing,
        patient=hdr.patient,
        stream="hr",
        seq=1,
        t_ms=T0,
        span_ms=0,
        chain_id=cur.chain_id,
        epoch=START_EPOCH,
        nonce=nonce,
        ciphertext=ct,
    )
    res = check_one(r.encode())
    assert rebuild(res) == r
    st_.admit(rebuild(res))
    assert st_.b.pending == 2


def test_readings_batched_before_an_erasure_arrived_are_sealed_pruned(s: Setup) -> None:
    """A reading waits in the batch; its patient's erasure reaches the node in a peer's
    block meanwhile (applied to the ACL directly, not through this batch): the node seals
    the reading (its root covers it) but stores only its leaf hash."""
    from meshhealth.wire import Erase

    early = signed_reading(s.dev, s.world, seq=1, t_ms=T0)
    late = signed_reading(s.dev, s.world, seq=2, t_ms=T0 + 5_000)
    s.admit(early)
    s.admit(late)
    assert s.b.access.apply(Erase.create(s.world.patient.signing, ts_ms=T0 + 1_000))
    c = s.b.seal(s.now)
    indexes = {r.index: r.t_ms for r in c.readings}
    assert c.prune == {i for i, t in indexes.items() if t <= T0 + 1_000} and len(c.prune) == 1
