"""Every kind of bad input is rejected, counted, stores nothing, and the node keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request

import aiomqtt
import nacl.signing
import pytest

from device_agents.device import Device
from meshhealth.config import Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.keychain import KeyChain, epoch_of
from meshhealth.wire import Reading

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(
        f"{url}/v1/tx", data=body, method="POST", headers={"Content-Type": "application/msgpack"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def resign(r: Reading, key: nacl.signing.SigningKey, **changes: object) -> bytes:
    fields = {
        f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("device", "sig")
    }
    fields.update(changes)
    return Reading.create(key, **fields).encode()


async def wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("condition not reached")


@pytest.mark.timeout(120)
async def test_each_bad_input_is_rejected_counted_and_harmless(mosquitto, node_factory):
    node = node_factory(mosquitto.url)
    now = time.time_ns() // 1_000_000
    patient = Identity.generate("patient")
    chains = {"hr": KeyChain.new("hr", epoch_of(now, 3_600_000) - 1)}
    dev = Device(Identity.generate("device"), patient.public)
    tx = enrollment(patient, chains, dev.id, epoch_of(now, 3_600_000) - 1, now)
    assert post(node.url, tx.encode())[0] == 202
    dev.accept_enrollment(tx)

    # control-transaction path: malformed, bad signature, replay
    assert post(node.url, b"\x93garbage")[0] == 400
    raw_tx = bytearray(tx.encode())
    raw_tx[-1] ^= 1
    code, body = post(node.url, bytes(raw_tx))
    assert code == 422 and body["reason"] == "bad_signature"
    assert post(node.url, tx.encode())[0] == 409

    ((_, good),) = dev.readings("hr", [(now - 5000, (71.0,))])
    good_r = Reading.decode(good)
    ((_, second),) = dev.readings("hr", [(now - 4000, (72.0,))])
    stranger = Identity.generate("device")
    bad_sig = bytearray(good)
    bad_sig[-3] ^= 0x40
    future_epoch = epoch_of(now + 3_600_000, 3_600_000)
    cur = dev.cursors["hr"]
    ((_, future),) = Device(
        dev.identity, dev.patient, {"hr": dataclasses.replace(cur)}, next_seq=500
    ).readings("hr", [(now + 3_600_000, (70.0,))])
    assert Reading.decode(future).epoch == future_epoch
    wrong_epoch = resign(good_r, dev.identity.signing, seq=600, epoch=good_r.epoch + 1)
    unknown_device = resign(good_r, stranger.signing)
    topic = f"mh/v1/readings/{dev.id.hex()}"
    sends = [
        (topic, good),  # accepted
        (topic, good),  # replayed seq -> duplicate
        (topic, b"\xc1\xc1\xc1"),  # malformed msgpack
        (topic, b"\x00" * 5000),  # oversized
        (topic, bytes(bad_sig)),  # bad signature
        (f"mh/v1/readings/{stranger.public.hex()}", unknown_device),  # unknown device
        (topic, future),  # future timestamp
        (topic, wrong_epoch),  # wrong stream key epoch
        (topic, b"garbage bytes on the topic"),
        (f"mh/v1/readings/{'ab' * 32}", second),  # published on another device's topic
    ]
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        for t, payload in sends:
            await client.publish(t, payload, qos=1)
    # garbage on the API port, raw TCP
    with socket.create_connection(("127.0.0.1", node.cfg.api.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http at all \r\n\r\n")
        s.recv(1024)

    def settled() -> bool:
        return node.status()["ingest"]["received"] >= len(sends)

    await wait_for(settled)
    await asyncio.sleep(1.5)  # one block interval
    st = node.status()
    rejects = st["ingest"]["rejects"]
    for reason in (
        "duplicate",
        "malformed",
        "oversized",
        "bad_signature",
        "unknown_device",
        "future_timestamp",
        "wrong_epoch",
        "topic_mismatch",
        "malformed_tx",
        "duplicate_tx",
    ):
        assert rejects.get(reason, 0) >= 1, f"{reason} not counted: {rejects}"
    assert rejects["malformed"] == 2  # the bad msgpack and the garbage
    assert st["ingest"]["readings_committed"] == 1  # only the one good reading

    # and the node still ingests good data afterwards
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish(topic, second, qos=1)
    await wait_for(lambda: node.status()["ingest"]["readings_committed"] == 2)
    node.stop()
    g = Genesis.load(node.cfg.genesis_path)
    from meshhealth.cli.chain_cmds import verify_stores

    assert g.network_id.hex() == st["network"]
    assert verify_stores(node.cfg.data_path) == 0
