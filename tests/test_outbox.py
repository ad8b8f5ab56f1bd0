"""The device outbox (real LMDB) and device state survive a restart."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from device_agents.device import Device
from device_agents.outbox import Outbox
from meshhealth.crypto.keys import Identity
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.keychain import KeyChain, decode_samples, decrypt, epoch_of
from meshhealth.wire import Reading


def _device() -> tuple[Device, KeyChain]:
    now = time.time_ns() // 1_000_000
    patient = Identity.generate("patient")
    chain = KeyChain.new("hr", epoch_of(now, 3_600_000) - 2)
    dev = Device(Identity.generate("device"), patient.public)
    dev.accept_enrollment(enrollment(patient, {"hr": chain}, dev.id, chain.start_epoch, now))
    return dev, chain


def test_outbox_keeps_readings_until_acknowledged_across_reopen(tmp_path: Path) -> None:
    dev, chain = _device()
    t0 = (chain.start_epoch + 1) * chain.epoch_ms
    readings = dev.readings("hr", [(t0 + i * 1000, (60.0 + i,)) for i in range(30)], max_samples=3)
    box = Outbox(tmp_path / "ob")
    assert stat.S_IMODE(os.stat(tmp_path / "ob").st_mode) == 0o700
    box.put_many([(dev.id, s, r) for s, r in readings], {dev.id: dev.state()})
    assert box.count(dev.id) == 10
    assert box.ack(dev.id, 4) == 4
    box.close()

    box = Outbox(tmp_path / "ob")
    (state,) = box.states().values()
    again = Device.from_state(state)
    assert again.id == dev.id and again.next_seq == 11
    pending = list(box.pending(dev.id))
    assert [s for s, _ in pending] == list(range(5, 11))
    assert [s for s, _ in box.pending(dev.id, after=8)] == [9, 10]
    assert box.ack(dev.id, 100) == 6 and box.count() == 0
    # the restored device continues the sequence and still encrypts for the patient
    ((seq, raw),) = again.readings("hr", [(t0 + 60_000, (99.0,))])
    assert seq == 11
    r = Reading.decode(raw).verify()
    plain = decrypt(
        chain.cursor(r.epoch).message_key(r.epoch), r.nonce, r.ciphertext, r.associated_data()
    )
    assert decode_samples(plain, r.t_ms) == ("/min", [(t0 + 60_000, (99.0,))])
    box.close()


def test_readings_split_at_key_epochs_and_size(tmp_path: Path) -> None:
    dev, chain = _device()
    start = (chain.start_epoch + 1) * chain.epoch_ms - 5_000  # 5 s before an epoch boundary
    out = dev.readings("hr", [(start + i * 1000, (70.0,)) for i in range(10)])
    decoded = [Reading.decode(r) for _, r in out]
    assert [r.epoch for r in decoded] == [chain.start_epoch, chain.start_epoch + 1]
    assert (
        sum(
            len(
                decode_samples(
                    decrypt(
                        chain.cursor(r.epoch).message_key(r.epoch),
                        r.nonce,
                        r.ciphertext,
                        r.associated_data(),
                    ),
                    r.t_ms,
                )[1]
            )
            for r in decoded
        )
        == 10
    )
    big = dev.readings("hr", [(start + 10_000 + i * 10, (70.0,)) for i in range(1000)])
    assert all(len(r) <= 4096 for _, r in big) and len(big) >= 5


def test_a_restart_counts_only_what_was_published_as_sent(tmp_path: Path) -> None:
    """Issue 11: the highest published seq is persisted once each publish returns; after a
    restart with readings produced but never sent, a receipt above it (one lying authority)
    is refused and deletes nothing; one within it deletes what it covers."""
    import asyncio

    import aiomqtt
    import nacl.signing
    import pytest

    from device_agents.agent import Agent
    from meshhealth.wire import ReceiptV2

    net = b"\7" * 32
    auth = nacl.signing.SigningKey.generate()
    dev, chain = _device()
    t0 = (chain.start_epoch + 1) * chain.epoch_ms
    readings = dev.readings("hr", [(t0 + i * 1000, (60.0 + i,)) for i in range(10)], max_samples=1)
    box = Outbox(tmp_path / "ob")
    box.put_many([(dev.id, s, r) for s, r in readings], {dev.id: dev.state()})

    class Broken:  # the connection breaks after 4 publishes
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        async def publish(self, topic: str, raw: bytes, qos: int) -> None:
            if len(self.sent) == 4:
                raise aiomqtt.MqttError("connection lost")
            self.sent.append(raw)

    def agent_of(box: Outbox, d: Device) -> Agent:
        return Agent(
            box, [d], "mqtt://127.0.0.1:1", network=net, authorities={bytes(auth.verify_key)}
        )

    client = Broken()
    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(agent_of(box, dev)._send(client))  # type: ignore[arg-type]
    assert len(client.sent) == 4 and box.sent(dev.id) == 4
    box.close()

    box = Outbox(tmp_path / "ob")  # restart: 10 produced, 4 published
    (state,) = box.states().values()
    again = Device.from_state(state)
    assert again.next_seq == 11
    agent = agent_of(box, again)
    assert agent.track[dev.id].sent_max == 4

    def rc(seq: int) -> bytes:
        return ReceiptV2.create(
            auth, network=net, device=dev.id, seq=seq, chain=bytes(auth.verify_key),
            height=1, hash=b"\1" * 32, ts_ms=1,
        ).encode()  # fmt: skip

    asyncio.run(agent._on_receipt(rc(10)))  # a lie: seqs 5..10 were never sent
    assert box.count(dev.id) == 10 and agent.stats["receipts_beyond_sent"] == 1
    asyncio.run(agent._on_receipt(rc(4)))
    assert box.count(dev.id) == 6 and agent.stats["acked"] == 4
    box.close()
