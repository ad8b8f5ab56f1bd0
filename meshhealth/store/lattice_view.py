"""What a stored replica implies beyond its blocks: the access state, the faulty
nodes and each chain's confirmation (for the node at start-up, status pages and
the CLI)."""

from __future__ import annotations

from collections.abc import Collection

from meshhealth.chain.acl import AccessState
from meshhealth.chain.lattice import confirmed_height
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import EquivocationProof, decode_entry
from meshhealth.wire.types import CONTROL_CLASSES


def replay_control(
    store: Store, *, registrars: Collection[bytes] = ()
) -> tuple[AccessState, dict[bytes, int]]:
    """Every control transaction and equivocation proof the replica holds, replayed: the
    access state, and the authorities proven to have equivocated (node -> lowest height
    proven).  ``registrars``: whose patient registrations count (the authorities)."""
    access = AccessState(registrars=frozenset(registrars))
    faulty: dict[bytes, int] = {}
    for raw in store.control_entries():
        e = decode_entry(raw)
        if isinstance(e, EquivocationProof):
            a, _ = e.headers()
            faulty[a.node] = min(a.height, faulty.get(a.node, a.height))
        elif isinstance(e, CONTROL_CLASSES):
            access.apply(e)
    return access, faulty


def confirmed_heights(
    store: Store, authorities: Collection[bytes], faulty: Collection[bytes]
) -> dict[bytes, int]:
    """Each stored chain's highest confirmed height (-1 when none is confirmed yet)."""
    linked = store.link_heights()
    return {
        chain: confirmed_height(
            chain, head=head, linked=linked, authorities=authorities, faulty=faulty
        )
        for chain, (head, _) in store.heads().items()
    }
