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
from meshhealth.errors import NetworkError, RemoteError
from meshhealth.net.client import get_first
from meshhealth.wire import Rechain, decode_control
from meshhealth.wire.codec import unpack

log = logging.getLogger(__name__)


async def follow_rechains(
    session: aiohttp.ClientSession, node_urls: list[str], devices: Iterable[Device]
) -> int:
    """Take up every rechain the first answering node holds for these devices; returns how
    many devices switched a stream."""
    switched = 0
    for d in devices:
        try:
            body = await get_first(session, node_urls, f"/v1/devices/{d.id.hex()}/enrollments")
            txs = unpack(body, max_len=1 << 22)
        except (NetworkError, RemoteError) as exc:
            log.debug("device %s: %s", d.id.hex()[:8], exc)
            continue
        for raw in txs:
            try:
                tx = decode_control(raw)
                if isinstance(tx, Rechain) and d.accept_rechain(tx):
                    switched += 1
                    log.info(
                        "device %s: stream %s moved to a new key chain", d.id.hex()[:8], tx.stream
                    )
            except RemoteError as exc:
                log.warning("device %s: ignoring a bad transaction: %s", d.id.hex()[:8], exc)
    return switched
