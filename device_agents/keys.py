"""Devices follow their patient's key chains on their own.

When a patient revokes a grant they move the stream to a new key chain
(a Rechain transaction sealing the new key to each device).  A device asks
a node, now and then, for the transactions naming it, checks the patient's
signature on each, and switches to any new chain it finds, so readings it
encrypts from then on are out of the revoked party's reach.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import aiohttp

from device_agents.device import Device
from meshhealth.errors import MalformedMessage, NetworkError, RemoteError
from meshhealth.net.client import get_first
from meshhealth.wire import Rechain, decode_control
from meshhealth.wire.codec import unpack

log = logging.getLogger(__name__)
MAX_ANSWER = 1 << 22  # a node's listing is at most 1 MiB; more is not read


def latest_rechains(raws: Iterable[bytes], patient: bytes) -> dict[str, Rechain]:
    """Per stream, the patient's latest validly signed rechain among ``raws`` (an older
    one names a chain since retired; a forged one must not hide the real latest)."""
    latest: dict[str, Rechain] = {}
    for raw in raws:
        try:
            tx = decode_control(raw)
            if not isinstance(tx, Rechain) or tx.patient != patient:
                continue
            tx.verify()
        except RemoteError as exc:
            log.warning("ignoring a bad transaction: %s", exc)
            continue
        best = latest.get(tx.stream)
        if best is None or (tx.ts_ms, tx.chain_id) > (best.ts_ms, best.chain_id):
            latest[tx.stream] = tx
    return latest


async def follow_rechains(
    session: aiohttp.ClientSession, node_urls: list[str], devices: Iterable[Device]
) -> int:
    """Take up, per stream, the latest rechain the first answering node holds for each
    device (after a restart the device sees earlier ones again, which name chains since
    retired); returns how many device streams switched."""
    switched = 0
    for d in devices:
        try:
            path = f"/v1/devices/{d.id.hex()}/enrollments?patient={d.patient.hex()}"
            body = await get_first(session, node_urls, path, max_bytes=MAX_ANSWER)
            txs = unpack(body, max_len=MAX_ANSWER, max_arrays=1)
            if type(txs) is not list or not all(type(t) is bytes for t in txs):
                raise MalformedMessage("an enrolment listing is a list of transactions")
        except (NetworkError, RemoteError) as exc:
            log.debug("device %s: %s", d.id.hex()[:8], exc)
            continue
        latest = latest_rechains(txs, d.patient)
        for tx in latest.values():
            try:
                if d.accept_rechain(tx):
                    switched += 1
                    log.info(
                        "device %s: stream %s moved to a new key chain", d.id.hex()[:8], tx.stream
                    )
            except RemoteError as exc:
                log.warning("device %s: ignoring a bad rechain: %s", d.id.hex()[:8], exc)
    return switched
