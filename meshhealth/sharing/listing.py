"""What a device reads to follow its patient's key chains: bounded, newest first (pure).

A device needs its enrolment and, per stream, its patient's *latest* rechain
naming it (an older one names a chain since retired: see
:func:`device_agents.keys.latest_rechains`).  Anyone may sign a rechain or an
enrolment naming any device with a key of their own, so listing every one
let 300 strangers' rechains push a device's listing past what the device
reads, and the device stopped following its real patient.  So the listing
holds at most the latest rechain per (patient, stream), is filtered to one
patient when the device names it (``?patient=``: then a stranger's
transactions are not in it at all), and stops at ``max_bytes`` encoded,
saying so (``truncated``).
"""

from __future__ import annotations

from meshhealth.chain.acl import AccessState
from meshhealth.wire import EnrollDevice, Rechain
from meshhealth.wire.codec import bin_size

MAX_LISTING_BYTES = 1 << 20  # a device reads up to 4 MiB: room to spare


def device_txs(
    access: AccessState,
    device: bytes,
    patient: bytes | None = None,
    *,
    max_bytes: int = MAX_LISTING_BYTES,
) -> tuple[list[bytes], bool]:
    """The encoded enrolments of ``device`` and the latest rechain per (patient, stream)
    naming it (only ``patient``'s, if given), newest first, at most ``max_bytes`` as a
    msgpack array; and whether any were left out for the bound."""
    latest: dict[tuple[bytes, str], Rechain] = {}
    for rc in access.rechains_to(device).values():
        if patient is not None and rc.patient != patient:
            continue
        if not any(k.to == device for k in rc.devices):
            continue
        best = latest.get((rc.patient, rc.stream))
        if best is None or (rc.ts_ms, rc.chain_id) > (best.ts_ms, best.chain_id):
            latest[(rc.patient, rc.stream)] = rc
    enrols: list[EnrollDevice] = [
        tx
        for tx in access.enrolments_of(device).values()
        if tx.device == device and (patient is None or tx.patient == patient)
    ]
    ordered = [
        *sorted(latest.values(), key=lambda t: (t.ts_ms, t.chain_id), reverse=True),
        *sorted(enrols, key=lambda t: (t.ts_ms, t.sig), reverse=True),
    ]
    out: list[bytes] = []
    size = 5  # the array header, at most
    for tx in ordered:
        raw = tx.encode()
        if size + bin_size(len(raw)) > max_bytes:
            return out, True
        size += bin_size(len(raw))
        out.append(raw)
    return out, False
