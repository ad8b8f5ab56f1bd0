"""Issue 11 (fix3 #1): no access log can take another's audit index record.

The audit index key was patient + ts + request[:8]: a bad authority that copied
an honest L2 log's patient, ts_ms and req_sig into its own "denied, 0 readings"
log overwrote the honest "read 3000" on every replica.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from core_helpers import T0, make_world

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import build_block
from meshhealth.config import Authority, Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.errors import InvalidBlock
from meshhealth.ingest.batcher import Batcher, BatchLimits
from meshhealth.ingest.replica import admit_remote
from meshhealth.ingest.verify import check_entries
from meshhealth.store import derived
from meshhealth.store.lmdb_store import AUDIT_FORMAT, Store
from meshhealth.wire import AccessLog, AccessLogV2, decode_entry

NOW = T0 + 5_000


class Net:
    def __init__(self, tmp: Path) -> None:
        world = make_world()
        self.honest_id, self.replica, self.evil = (
            world.authority,
            Identity.generate("node"),
            Identity.generate("node"),
        )
        auths = (("a", self.honest_id), ("b", self.replica), ("m", self.evil))
        g = Genesis("x", T0, tuple(Authority(n, k.public) for n, k in auths))
        self.net = g.network_id
        self.honest = Batcher(self.honest_id.signing, self.net, BatchLimits(), AccessState(), {})
        self.b = Batcher(self.replica.signing, self.net, BatchLimits(), AccessState(), {})
        self.path = tmp / "store"
        self.store = Store(self.path)
        self.patient, self.reader = Identity.generate("patient"), Identity.generate("provider")

    def fields(self) -> dict[str, Any]:
        return dict(
            network=self.net, reader=self.reader.public, patient=self.patient.public,
            stream="hr", from_ms=T0, to_ms=T0 + 1000, ts_ms=NOW, outcome="read",
            reason=b"", grant=os.urandom(32), readings=3000, count=1, method="GET",
            path="/v1/patients/x/readings", body_hash=os.urandom(32), req_ts_ms=NOW,
            req_nonce=os.urandom(16), req_sig=os.urandom(64),
        )  # fmt: skip

    def admit(self, hdr: Any, entries: Any) -> None:
        cm = admit_remote(
            self.b, hdr, entries, check_entries(list(entries)),
            block_hash_at=self.store.block_hash, now_ms=NOW + 1000,
        )  # fmt: skip
        self.store.commit_block(cm)

    def trail(self) -> list[tuple[str, str, int]]:
        out = []
        for e, *_ in self.store.audit_trail(self.patient.public):
            log = decode_entry(e)
            who = "honest" if log.node == self.honest_id.public else "evil"
            out.append((who, log.outcome, log.readings))
        return sorted(out)

    def attack(self) -> dict[str, Any]:
        """The honest L2 log, then the bad authority's copy of its patient, ts and req_sig."""
        f = self.fields()
        self.honest.admit_log(AccessLogV2.create(self.honest_id.signing, **f), NOW)
        c = self.honest.seal(NOW)
        self.admit(c.block.header, c.block.entries)
        fake = AccessLogV2.create(
            self.evil.signing,
            **f | {"outcome": "denied", "reason": b"no_grant", "readings": 0, "grant": b""},
        )
        blk = build_block(
            self.evil.signing, network=self.net, height=0, prev=self.net, ts_ms=NOW,
            entries=[fake.encode()],
        )  # fmt: skip
        self.admit(blk.header, blk.entries)
        return f


@pytest.fixture
def net(tmp_path: Path) -> Any:
    n = Net(tmp_path)
    yield n
    n.store.close()


def test_a_colliding_forged_log_does_not_hide_the_honest_one(net: Net) -> None:
    net.attack()
    assert net.trail() == [("evil", "denied", 0), ("honest", "read", 3000)]
    # verify and reindex agree with the commit path
    assert derived.check(net.store, derived.scan(net.store)) == []
    derived.rebuild(net.store, derived.scan(net.store))
    assert derived.check(net.store, derived.scan(net.store)) == []
    assert net.trail() == [("evil", "denied", 0), ("honest", "read", 3000)]


def test_an_old_format_audit_index_is_rebuilt_when_the_store_opens(net: Net) -> None:
    net.attack()
    # make it look like a store of the old format: key patient + ts + request[:8]
    store = net.store

    def old(txn: Any) -> None:
        locs = [bytes(v) for _, v in txn.cursor(db=store.db["audit"])]
        txn.drop(store.db["audit"], delete=False)
        for loc in locs:
            log = decode_entry(store.entries_at([loc])[0])
            k = log.patient + struct.pack(">Q", log.ts_ms) + log.request[:8]
            txn.put(k, loc, db=store.db["audit"])
        txn.delete(AUDIT_FORMAT, db=store.db["meta"])

    store._write(old)
    assert len(net.trail()) == 1  # the collision, as main had it
    store.close()
    ro = Store(net.path, readonly=True)  # `chain verify` on it: one clear line
    try:
        problems = derived.check(ro, derived.scan(ro))
        assert len(problems) == 1 and "old key format" in problems[0], problems
    finally:
        ro.close()
    net.store = Store(net.path)  # start-up re-reads the blocks: both logs are back
    assert net.store.audit_migrated == 2
    assert net.trail() == [("evil", "denied", 0), ("honest", "read", 3000)]
    assert derived.check(net.store, derived.scan(net.store)) == []
    net.store.close()
    net.store = Store(net.path)  # once per store
    assert net.store.audit_migrated == 0


def test_an_l1_log_in_a_block_of_l2_logs_is_refused(net: Net) -> None:
    f = net.fields()
    l2 = AccessLogV2.create(net.evil.signing, **f)
    l1_fields = {
        k: v for k, v in f.items()
        if k not in ("count", "method", "path", "body_hash", "req_ts_ms", "req_nonce", "req_sig")
    }  # fmt: skip
    l1 = AccessLog.create(net.evil.signing, **l1_fields, request=os.urandom(32))
    blk = build_block(
        net.evil.signing, network=net.net, height=0, prev=net.net, ts_ms=NOW,
        entries=[l2.encode(), l1.encode()],
    )  # fmt: skip
    with pytest.raises(InvalidBlock, match="L1 access log"):
        net.admit(blk.header, blk.entries)
    assert net.b.rejects.get("peer_block_log_version") == 1
    assert net.trail() == []
