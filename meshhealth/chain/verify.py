"""Full verification of a stored chain, block by block, from raw bytes.

Recomputes every block hash, prev link, Merkle root, node signature and
entry signature, replays enrolments so every reading must come from a
device enrolled for that patient and stream *earlier* in the chain, and
checks that no (device, seq) appears twice.  The first failure is raised as
:class:`InvalidBlock` naming the chain and height.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import block_hash, decode_body, verify_body, verify_header
from meshhealth.chain.merkle import is_pruned
from meshhealth.errors import InvalidBlock, RemoteError
from meshhealth.wire import BlockHeader, EquivocationProof, Reading, decode_entry
from meshhealth.wire.types import ACCESS_LOGS, CONTROL_CLASSES


@dataclass
class ChainReport:
    node: bytes
    blocks: int = 0
    entries: int = 0
    readings: int = 0
    txs: int = 0
    proofs: int = 0
    logs: int = 0
    pruned: int = 0  # erased entries: only their leaf hashes are left
    head: bytes = b""


def verify_chain(
    node: bytes,
    blocks: Iterable[tuple[int, bytes, bytes | None]],
    *,
    network: bytes,
    authorities: set[bytes],
    expected_head: tuple[int, bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    lattice: AccessState | None = None,
) -> ChainReport:
    """Verify one chain.  ``lattice``: the access state from the control transactions of
    *every* chain in the replica (a reading's enrolment may sit in another chain; admission
    already checked that it came first, through the block's links)."""
    if node not in authorities:
        raise InvalidBlock("chain of a node that is not an authority", node=node, height=0)
    rep = ChainReport(node)
    access = AccessState()
    seen: set[tuple[bytes, int]] = set()
    prev, expect = network, 0
    for height, raw_header, raw_body in blocks:
        if height != expect:
            raise InvalidBlock(f"missing block {expect}", node=node, height=expect)
        try:
            header = BlockHeader.decode(raw_header)
        except RemoteError as exc:
            raise InvalidBlock(f"undecodable header: {exc}", node=node, height=height) from exc
        if header.node != node:
            raise InvalidBlock("header signed by another node", node=node, height=height)
        verify_header(header, network=network, prev=prev, height=height)
        if raw_body is None:
            raise InvalidBlock("block body missing", node=node, height=height)
        try:
            entries = decode_body(raw_body)
        except RemoteError as exc:
            raise InvalidBlock(f"undecodable body: {exc}", node=node, height=height) from exc
        verify_body(header, entries)
        for i, raw in enumerate(entries):
            if is_pruned(raw):
                rep.pruned += 1
                continue
            try:
                e = decode_entry(raw).verify()
                if isinstance(e, CONTROL_CLASSES):
                    access.apply(e)
                    rep.txs += 1
                elif isinstance(e, EquivocationProof):
                    if e.headers()[0].network != network:
                        raise InvalidBlock(
                            f"entry {i}: equivocation proof of another network",
                            node=node,
                            height=height,
                        )
                    rep.proofs += 1
                elif isinstance(e, ACCESS_LOGS):
                    if e.node != node or e.network != network:
                        raise InvalidBlock(
                            f"entry {i}: an access log of another node", node=node, height=height
                        )
                    rep.logs += 1
                elif isinstance(e, Reading):
                    (lattice or access).check_reading(e)
                    if (e.device, e.seq) in seen:
                        raise InvalidBlock(
                            f"entry {i}: seq {e.seq} of a device stored twice",
                            node=node,
                            height=height,
                        )
                    seen.add((e.device, e.seq))
                    rep.readings += 1
            except RemoteError as exc:
                if isinstance(exc, InvalidBlock):
                    raise
                raise InvalidBlock(f"entry {i}: {exc}", node=node, height=height) from exc
        prev = block_hash(header)
        rep.blocks += 1
        rep.entries += len(entries)
        expect += 1
        if progress is not None:
            progress(len(entries))
    if expected_head is not None and expected_head != (expect - 1, prev):
        raise InvalidBlock(
            "stored head does not match the last block", node=node, height=expected_head[0]
        )
    rep.head = prev
    return rep
