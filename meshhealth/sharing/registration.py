"""Registering a patient: an authority's ``P1`` entry (pure).

A registered patient's control transactions are admitted under a budget
of their own; unregistered keys share the strangers' budget
(:mod:`meshhealth.net.admission`).  Only an authority of the network can
register: the entry is signed with its node key, and every replica counts
it only if that key is in the genesis.
"""

from __future__ import annotations

from meshhealth.crypto.keys import Identity
from meshhealth.wire import RegisterPatient


def registration(
    authority: Identity, network: bytes, patient: bytes, now_ms: int
) -> RegisterPatient:
    """``authority`` (a node of ``network``) registers ``patient``."""
    return RegisterPatient.create(authority.signing, network=network, patient=patient, ts_ms=now_ms)
