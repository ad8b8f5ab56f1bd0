"""The MQTT side of a wearable or a gateway: publish from the outbox, clear it on receipts.

One :class:`Agent` serves one device (a wearable) or many (a gateway: one
MQTT connection for all of them).  It never forgets a reading before a
node-signed receipt covers it:

* every reading goes to the outbox first, then to MQTT (QoS 1);
* a receipt deletes the readings it covers only if it is an A2 receipt
  (:class:`~meshhealth.wire.ReceiptV2`) signed by an authority of our network,
  names the block holding them, and covers no seq above the highest this
  device sent (persisted in the outbox once each publish returns, so a restart
  does not count readings produced but never sent as sent).  Any other receipt
  is refused and counted, and never moves the outbox: an authority cannot make
  a device drop readings it never published
  (A1 receipts, from nodes before A2, name no block: refused as ``old_receipts``;
  upgrade the nodes before the devices).  The latest receipt that moved the
  outbox is kept per (device, authority), as signed evidence of what that
  authority claims to store;
* with ``confirmations=k > 1`` (only where the network has N >= 4 authorities)
  a reading is deleted only once receipts from ``k`` distinct authorities cover
  it, so one authority that receipts and then withholds cannot make a device
  drop anything alone.  With N = 3 that would let one authority that withholds
  its receipts freeze every outbox, so it is refused there (and off by default);
* when a device's receipts stop advancing for ``resend_after`` seconds, its
  unreceipted readings are re-sent (the interval backs off up to 60 s and
  resets on progress); after a reconnect everything unreceipted is re-sent.
  Nodes drop what they already stored, so the stored result is exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from device_agents.device import Device
from device_agents.outbox import Outbox
from meshhealth.errors import ConfigError, MeshHealthError
from meshhealth.ingest.mqtt import parse_broker_url
from meshhealth.wire import Receipt, decode_receipt

log = logging.getLogger(__name__)

READINGS_TOPIC = "mh/v1/readings/{device}"
RECEIPTS_TOPIC = "mh/v1/receipts/{device}"


@dataclass
class _Track:
    acked: int = 0  # highest seq a receipt covered
    sent_upto: int = 0  # highest seq published on the current connection
    # highest seq published (by this process, or by an earlier one: persisted in the
    # outbox after each publish returns): no receipt may go above it
    sent_max: int = 0
    saved: int = 0  # the sent_max the outbox holds
    held: dict[bytes, int] = field(default_factory=dict)  # authority -> seq it receipted
    progress_at: float = field(default_factory=time.monotonic)
    backoff: float = 0.0


class Agent:
    def __init__(
        self,
        outbox: Outbox,
        devices: Iterable[Device],
        broker_url: str,
        *,
        network: bytes,
        authorities: set[bytes],
        client_id: str = "",
        resend_after: float = 5.0,
        window: int = 2000,
        username: str = "",
        password: str = "",
        tls_context: ssl.SSLContext | None = None,
        confirmations: int = 1,
    ) -> None:
        if not 1 <= confirmations <= max(1, len(authorities)):
            raise ConfigError(f"confirmations must be in [1, {len(authorities)}] (the authorities)")
        if confirmations > 1 and len(authorities) < 4:
            raise ConfigError(
                "confirmations > 1 needs at least 4 authorities: with 3, one authority "
                "withholding its receipts would freeze every outbox"
            )
        self.confirmations = confirmations
        self.outbox = outbox
        self.devices = {d.id: d for d in devices}
        self.host, self.port, self.tls = parse_broker_url(broker_url)
        if tls_context is not None and not self.tls:
            raise ConfigError(f"broker URL {broker_url!r}: TLS settings need an mqtts:// URL")
        # mqtts://: our CA and client certificate, or by default the system roots
        self.tls_context = tls_context or (ssl.create_default_context() if self.tls else None)
        self.network, self.authorities = network, authorities
        self.client_id = client_id
        self.resend_after, self.window = resend_after, window
        self.username, self.password = username, password
        # what a previous run published (as the outbox recorded it), not all it produced:
        # a receipt above it would delete readings no node ever saw
        self.track = {}
        for d in self.devices.values():
            sent = outbox.sent(d.id)
            self.track[d.id] = _Track(sent_max=sent, saved=sent)
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.stats = {
            "published": 0,
            "resent": 0,
            "receipts": 0,
            "bad_receipts": 0,
            "old_receipts": 0,  # A1: names no block
            "receipts_beyond_sent": 0,  # a seq above the highest we sent: a lie
            "acked": 0,
            "connects": 0,
        }

    # --- producing ----------------------------------------------------------

    async def record(
        self, items: list[tuple[Device, int, bytes]], *, extra: dict[bytes, Any] | None = None
    ) -> None:
        """Persist new readings (and the devices' next seq) before anything is sent;
        ``extra`` states are written in the same transaction (the simulator's clock)."""
        if not items and not extra:
            return
        states = {d.id: d.state() for d, _, _ in items} | (extra or {})
        await asyncio.to_thread(self.outbox.put_many, [(d.id, s, r) for d, s, r in items], states)
        if any(d.forgot_retired for d, _, _ in items):  # the states above no longer hold it
            for d, _, _ in items:
                d.forgot_retired = False
            await asyncio.to_thread(self.outbox.compact)
        self._wake.set()

    async def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.outbox.count) == 0:
                return True
            await asyncio.sleep(0.2)
        return False

    # --- connection ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                async with asyncio.timeout(None) as guard:
                    await self._session(stop, guard)
                delay = 0.5
            except* TimeoutError:
                log.warning("agent %s: the broker connection did not close in time", self.client_id)
            except* aiomqtt.MqttError as eg:
                log.info(
                    "agent %s: broker connection lost (%s); retry in %.1fs",
                    self.client_id,
                    eg.exceptions[0],
                    delay,
                )
            self.connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30.0)

    async def _session(self, stop: asyncio.Event, guard: asyncio.Timeout) -> None:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id or None,
            username=self.username or None,
            password=self.password or None,
            tls_context=self.tls_context,
            max_queued_outgoing_messages=0,
            keepalive=30,
        ) as client:
            self.stats["connects"] += 1
            topics = [(RECEIPTS_TOPIC.format(device=d.hex()), 1) for d in self.devices]
            for i in range(0, len(topics), 200):
                await client.subscribe(topics[i : i + 200])
            for t in self.track.values():  # everything unreceipted goes again
                t.sent_upto = t.acked
            self.connected.set()
            async with asyncio.TaskGroup() as tg:
                rx = tg.create_task(self._receive(client))
                tx = tg.create_task(self._send(client))
                await stop.wait()
                # leaving must not hang on a broker that stopped answering
                guard.reschedule(asyncio.get_running_loop().time() + 5.0)
                rx.cancel()
                tx.cancel()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            if isinstance(msg.payload, bytes):
                await self._on_receipt(msg.payload)

    async def _on_receipt(self, payload: bytes) -> None:
        try:
            rc = decode_receipt(payload).verify()
        except MeshHealthError:
            self.stats["bad_receipts"] += 1
            return
        t = self.track.get(rc.device)
        if t is None or rc.network != self.network or rc.node not in self.authorities:
            self.stats["bad_receipts"] += 1
            return
        if isinstance(rc, Receipt):
            self.stats["old_receipts"] += 1
            return
        if rc.seq > t.sent_max:
            self.stats["receipts_beyond_sent"] += 1
            log.warning(
                "device %s: authority %s receipted seq %d, above the %d we sent: refused",
                rc.device.hex()[:8],
                rc.node.hex()[:8],
                rc.seq,
                t.sent_max,
            )
            return
        self.stats["receipts"] += 1
        upto = rc.seq
        if self.confirmations > 1:
            t.held[rc.node] = max(t.held.get(rc.node, 0), rc.seq)
            if len(t.held) < self.confirmations:
                return
            # the highest seq that `confirmations` distinct authorities each cover
            upto = sorted(t.held.values(), reverse=True)[self.confirmations - 1]
        if upto > t.acked:
            n = await asyncio.to_thread(self.outbox.ack, rc.device, upto, rc.node, payload)
            self.stats["acked"] += n
            t.acked = upto
            t.sent_upto = max(t.sent_upto, t.acked)
            t.progress_at, t.backoff = time.monotonic(), 0.0
            self._wake.set()

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            for dev, t in self.track.items():
                if t.sent_upto > t.acked and now - t.progress_at > self.resend_after + t.backoff:
                    self.stats["resent"] += t.sent_upto - t.acked
                    t.sent_upto = t.acked  # receipts stalled: send the unreceipted again
                    t.progress_at = now
                    t.backoff = min(60.0, max(1.0, t.backoff * 2))
                room = self.window - (t.sent_upto - t.acked)
                if room <= 0:
                    continue
                batch = await asyncio.to_thread(self._pending, dev, t.sent_upto, room)
                if batch and t.sent_upto == t.acked:
                    # nothing was in flight: the receipt clock starts now, not at the last
                    # receipt (else a device idle for a while re-sends at once)
                    t.progress_at = time.monotonic()
                topic = READINGS_TOPIC.format(device=dev.hex())
                try:
                    for seq, raw in batch:
                        await client.publish(topic, raw, qos=1)
                        t.sent_upto = seq
                        t.sent_max = max(t.sent_max, seq)
                        self.stats["published"] += 1
                finally:  # what was published, even if the connection broke mid-batch
                    if t.sent_max > t.saved:
                        self.outbox.mark_sent(dev, t.sent_max)
                        t.saved = t.sent_max
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)

    def _pending(self, device: bytes, after: int, limit: int) -> list[tuple[int, bytes]]:
        return list(self.outbox.pending(device, after, limit))

    def statistics(self) -> dict[str, Any]:
        return dict(self.stats, devices=len(self.devices))
