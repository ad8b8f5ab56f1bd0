"""The patient's side of enrolling a device: seal each stream's key chain to it."""

from __future__ import annotations

from meshhealth.crypto.keys import Identity, box_public_of
from meshhealth.sharing.keychain import KeyChain, seal
from meshhealth.wire import EnrollDevice, StreamKey


def enrollment(
    patient: Identity,
    chains: dict[str, KeyChain],
    device: bytes,
    key_epoch: int,
    now_ms: int,
    *,
    import_from_ms: int | None = None,
) -> EnrollDevice:
    """The patient's signed enrolment of ``device``, sealing ``K(key_epoch)`` per stream.
    Nodes take in its readings from ``now_ms`` on (E1), or, to import older data, from
    ``import_from_ms`` (E2)."""
    box = box_public_of(device)
    keys = tuple(
        StreamKey(
            s,
            c.chain_id,
            c.start_epoch,
            c.epoch_ms,
            max(key_epoch, c.start_epoch),
            seal(c.key(max(key_epoch, c.start_epoch)), box),
        )
        for s, c in sorted(chains.items())
    )
    return EnrollDevice.create(
        patient.signing, device=device, ts_ms=now_ms, streams=keys, import_from_ms=import_from_ms
    )
