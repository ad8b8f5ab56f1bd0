"""Confirmation and faults of a stored replica, for status pages and the CLI."""

from __future__ import annotations

from collections.abc import Collection

from meshhealth.chain.lattice import confirmed_height
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import EquivocationProof, decode_entry


def faulty_nodes(store: Store) -> dict[bytes, int]:
    """Authorities proven to have equivocated (node -> height of the first proof held)."""
    out: dict[bytes, int] = {}
    for raw in store.control_entries():
        e = decode_entry(raw)
        if isinstance(e, EquivocationProof):
            a, _ = e.headers()
            out[a.node] = min(a.height, out.get(a.node, a.height))
    return out


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
