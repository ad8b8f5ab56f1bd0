"""Erasure erases (issue 11 #11): after ``patient erase`` on a real three-node network
no byte of an erased reading's ciphertext is left in any file under any node's
directory (LMDB frees pages without blanking them), and the patient's key file keeps
no seed from which an erased epoch's key derives; the devices move to the new chain
and forget the old one."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from test_cli import mh
from test_network import hr_sim, start_nodes
from test_sharing_read import EPOCH, eventually, nodes_args, raw_readings

from meshhealth.cli.patient_cmds import all_chains
from meshhealth.crypto.keys import load_identity
from meshhealth.sharing.keychain import ratchet
from meshhealth.sharing.provider import chain_keys


def files_holding(root: Path, needles: list[bytes]) -> set[bytes]:
    """Which of ``needles`` occur in any file under ``root`` (data.mdb, lock.mdb, keys,
    configs, anything a node left there)."""
    blobs = [f.read_bytes() for f in root.rglob("*") if f.is_file()]
    return {n for n in needles if any(n in b for b in blobs)}


def store_status(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
        return json.loads(r.read())["store"]  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_erase_leaves_no_ciphertext_on_any_node_and_no_old_seed(mosquitto, tmp_path):
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    urls = [n.url for n in nodes]
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=60, epoch_ms=EPOCH)
        sim.rekey_poll_s = 0.5
        try:
            await sim.enroll()
            live = asyncio.create_task(sim.run(asyncio.Event(), duration_s=14, drain_timeout=5))
            pkey = next((tmp_path / "sim" / "patients").glob("*.key"))
            patient = load_identity(pkey).public
            other = next(p.identity.public for p in sim.patients if p.identity.public != patient)

            def stored_everywhere() -> bool:
                return all(len(raw_readings(c.data_path, patient)) >= 40 for c in cfgs)

            assert await eventually(stored_everywhere, 40)
            old_chains = all_chains(str(pkey))
            erased = {r.ciphertext: r for c in cfgs for r in raw_readings(c.data_path, patient)}
            r = mh(
                "patient", "erase", "--key", str(pkey), "--yes", "--switch-after", "3",
                *nodes_args(urls[1]),
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "sealed to 1 device(s)" in r.stdout, r.stdout
            await asyncio.wait_for(live, 90)
        finally:
            sim.close()

        upto = max(r.t_ms for r in erased.values())  # all stored before the erasure

        def erased_and_compacted() -> bool:
            return all(
                all(r.t_ms > upto for r in raw_readings(c.data_path, patient)) for c in cfgs
            ) and all(store_status(u)["compactions"] >= 1 for u in urls)

        assert await eventually(erased_and_compacted, 40), (
            [store_status(u) for u in urls],
            [sorted(r.t_ms - upto for r in raw_readings(c.data_path, patient))[:5] for c in cfgs],
            [n.log.read_text()[-3000:] for n in nodes],
        )
        gone = list(erased)
        assert len(gone) >= 40
        kept = [r.ciphertext for r in raw_readings(cfgs[0].data_path, other)][:50]
        assert kept
        for c in cfgs:
            root = c.data_path.parent  # the node's whole directory, store and all
            assert files_holding(root, gone) == set(), root
            assert files_holding(root, kept) == set(kept), root  # the control
            assert sorted(p.name for p in c.data_path.iterdir()) == ["data.mdb", "lock.mdb"]

        # the key file: no old seed, nothing that derives an erased reading's key
        text = pkey.read_bytes()
        for c in old_chains:
            assert c.seed not in text and c.seed.hex().encode() not in text
        now_chains = all_chains(str(pkey))
        keys = chain_keys(now_chains)({(r.chain_id, r.epoch) for r in erased.values()})
        assert keys == {}, "the key file still opens erased readings"
        for c in now_chains:  # a kept old chain starts after every erased epoch of it
            assert all(c.start_epoch > r.epoch for r in erased.values() if r.chain_id == c.chain_id)
        new_ids = {c.chain_id for c in now_chains} - {c.chain_id for c in old_chains}
        assert len(new_ids) == len({c.stream for c in old_chains})  # every stream rechained
        # no file of the devices' or patients' (outboxes, key files) holds a key of an
        # erased epoch: neither a seed nor any ratchet step up to the last erased epoch
        last = max(r.epoch for r in erased.values())
        old_keys = [
            ratchet(c.seed, e - c.start_epoch)
            for c in old_chains
            for e in range(c.start_epoch, last + 1)
        ]
        assert old_keys and files_holding(tmp_path / "sim", old_keys) == set()
        # the device switched and forgot the retired chain
        (dev,) = next(p for p in sim.patients if p.identity.public == patient).devices
        assert {c.chain_id for c in dev.cursors.values()} <= new_ids
        assert dev.previous == {}
    finally:
        for n in nodes:
            n.stop()


def test_erased_chains_keep_no_seed_of_an_erased_epoch() -> None:
    from meshhealth.cli.patient_cmds import erased_chains
    from meshhealth.sharing.keychain import KeyChain, ratchet

    ms = 1000
    hr, bp_old = KeyChain.new("hr", 100, ms), KeyChain.new("bp", 90, ms)
    bp = KeyChain.new("bp", 103, ms)
    bp_next = KeyChain.new("bp", 106, ms)  # a revoke's rechain, switching after the erasure
    new_hr = KeyChain.new("hr", 105, ms)  # the erasure's own rechain: starts in its epoch
    temp = KeyChain.new("temp", 100, ms)  # no device: no successor on chain
    upto = 105 * ms + 400  # the erasure cuts through epoch 105
    chains = [hr, bp_old, bp, temp, bp_next, new_hr]
    kept = erased_chains(chains, upto, frozenset({new_hr.chain_id}))
    by_id = {c.chain_id: c for c in kept}
    assert set(by_id) == {bp.chain_id, temp.chain_id, bp_next.chain_id, new_hr.chain_id}
    # hr: its successor takes over inside the erased epoch, so hr opens nothing left
    # bp_old: superseded long before
    assert by_id[new_hr.chain_id] == new_hr  # made by the erasure: kept whole
    assert by_id[bp_next.chain_id] == bp_next  # starts after it: nothing erased under it
    for old in (bp, temp):  # in use after the erasure: cut to epoch 106
        cut = by_id[old.chain_id]
        assert (cut.start_epoch, cut.seed) == (106, ratchet(old.seed, 106 - old.start_epoch))
        with pytest.raises(KeyError):
            cut.key(105)


def test_compacting_the_outbox_drops_a_forgotten_key_from_its_file(tmp_path: Path) -> None:
    """The device side of erasure: once a device forgot a retired chain, its outbox is
    rewritten, so the states written with that chain's key are gone from the file too."""
    import os as _os

    from device_agents.outbox import Outbox

    box = Outbox(tmp_path / "outbox")
    dev, old_key, new_key = b"d" * 32, _os.urandom(32), _os.urandom(32)
    box.put(dev, 1, b"reading-1", [b"seed", old_key])
    box.put(dev, 2, b"reading-2", [b"seed", new_key])  # the state that forgot it
    box.env.sync(True)
    assert files_holding(tmp_path, [old_key]) == {old_key}  # a freed page keeps it
    box.compact()
    assert files_holding(tmp_path, [old_key, new_key]) == {new_key}
    assert box.states() == {dev: [b"seed", new_key]}
    assert [s for s, _ in box.pending(dev)] == [1, 2] and box.count(dev) == 2
    assert box.ack(dev, 1) == 1 and box.count() == 1  # and it goes on working
    box.close()
