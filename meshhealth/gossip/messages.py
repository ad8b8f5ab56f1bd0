"""Gossip protocol messages (the core's view: what, not how it is encoded).

Blocks are named by ``(chain, height)``; a chain is named by its producer's
node id.  The I/O shell attaches the block bytes to a :class:`Push` or a
:class:`Blocks` reply and encodes everything as canonical msgpack.
"""

from __future__ import annotations

from dataclasses import dataclass

NodeId = bytes
BlockId = tuple[NodeId, int]


@dataclass(frozen=True, slots=True)
class Push:
    """Eager push of one new block; ``hops`` counts gossip steps from its producer."""

    chain: NodeId
    height: int
    hops: int


@dataclass(frozen=True, slots=True)
class Heads:
    """Anti-entropy digest: recently advanced heads plus a digest of the whole vector.

    ``recent`` is bounded, so the message stays small however many chains
    exist; ``digest`` lets the receiver notice a difference hidden in the
    rest and ask for the full vector.
    """

    recent: tuple[tuple[NodeId, int], ...]
    digest: bytes
    reply: bool  # True when this answers a Heads (do not answer again)


@dataclass(frozen=True, slots=True)
class FullHeadsRequest:
    pass


@dataclass(frozen=True, slots=True)
class FullHeads:
    heads: tuple[tuple[NodeId, int], ...]


@dataclass(frozen=True, slots=True)
class Pull:
    """Ask for blocks ``from_height..to_height`` (inclusive) of ``chain``."""

    chain: NodeId
    from_height: int
    to_height: int


@dataclass(frozen=True, slots=True)
class Blocks:
    """Reply to a :class:`Pull` (the shell attaches the blocks' bytes)."""

    chain: NodeId
    from_height: int
    to_height: int
    hops: int


@dataclass(frozen=True, slots=True)
class PeerList:
    """Peer exchange: authorities and the URLs they can be dialed at (unauthenticated
    hints; the handshake on dialing proves who answers)."""

    peers: tuple[tuple[NodeId, str], ...]


Message = Push | Heads | FullHeadsRequest | FullHeads | Pull | Blocks | PeerList


@dataclass(frozen=True, slots=True)
class Send:
    """Action: deliver ``message`` to ``peer``."""

    peer: NodeId
    message: Message
