"""Building and verifying blocks of one node's chain.

A chain is ``height 0, 1, 2, ...``; block 0's ``prev`` is the network id, so
a chain cannot be replayed into another network.  A block's hash is the
BLAKE2b of its full signed header; the header commits to its entries by
their Merkle root and count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nacl.signing

from meshhealth.chain import merkle
from meshhealth.crypto.hashing import h
from meshhealth.errors import InvalidBlock, MalformedMessage, RemoteError
from meshhealth.wire import BlockHeader, Link
from meshhealth.wire.codec import pack, unpack

MAX_BLOCK_BYTES = 8 * 1024 * 1024
MAX_BLOCK_ENTRIES = 65_535


def block_hash(header: BlockHeader) -> bytes:
    return h(header.encode())


@dataclass(frozen=True, slots=True)
class Block:
    header: BlockHeader
    entries: tuple[bytes, ...]

    @property
    def hash(self) -> bytes:
        return block_hash(self.header)


def encode_body(entries: Sequence[bytes]) -> bytes:
    return pack(list(entries))


def decode_body(data: bytes) -> tuple[bytes, ...]:
    # one array of at most MAX_BLOCK_ENTRIES bins: nothing else is walked or built
    raw = unpack(data, max_len=MAX_BLOCK_BYTES + 16, max_items=1 + MAX_BLOCK_ENTRIES, max_arrays=1)
    if type(raw) is not list or len(raw) > MAX_BLOCK_ENTRIES:
        raise MalformedMessage("a block body is a bounded list of entries")
    if not all(type(e) is bytes for e in raw):
        raise MalformedMessage("block entries are bytes")
    return tuple(raw)


def build_block(
    key: nacl.signing.SigningKey,
    *,
    network: bytes,
    height: int,
    prev: bytes,
    ts_ms: int,
    entries: Sequence[bytes],
    links: Sequence[Link] = (),
) -> Block:
    header = BlockHeader.create(
        key,
        network=network,
        height=height,
        prev=prev,
        ts_ms=ts_ms,
        root=merkle.root(entries),
        count=len(entries),
        links=tuple(links),
    )
    return Block(header, tuple(entries))


def verify_header(header: BlockHeader, *, network: bytes, prev: bytes, height: int) -> None:
    """Checks a header against its place in the chain (not its entries)."""
    if header.network != network:
        raise InvalidBlock("block belongs to another network", node=header.node, height=height)
    if header.height != height:
        raise InvalidBlock(f"expected height {height}", node=header.node, height=height)
    if header.prev != prev:
        raise InvalidBlock(
            "prev hash does not match the previous block", node=header.node, height=height
        )
    try:
        header.verify()
    except RemoteError as exc:
        raise InvalidBlock("bad node signature on header", node=header.node, height=height) from exc


def verify_body(
    header: BlockHeader,
    entries: Sequence[bytes],
    *,
    check_entry: Callable[[bytes], None] | None = None,
) -> None:
    """Count, Merkle root and (optionally) every entry, by ``check_entry``."""
    if len(entries) != header.count:
        raise InvalidBlock(
            f"{len(entries)} entries, header says {header.count}",
            node=header.node,
            height=header.height,
        )
    if merkle.root(entries) != header.root:
        raise InvalidBlock(
            "Merkle root does not match the entries", node=header.node, height=header.height
        )
    if check_entry is not None:
        for i, e in enumerate(entries):
            try:
                check_entry(e)
            except RemoteError as exc:
                raise InvalidBlock(
                    f"entry {i}: {exc}", node=header.node, height=header.height
                ) from exc
