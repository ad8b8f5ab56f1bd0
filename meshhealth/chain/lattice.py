"""The block lattice across chains: confirmation and equivocation (pure).

**Confirmation.**  Block ``(X, h)`` is *confirmed* once more than 2/3 of
the authorities vouch for ``(X, h')`` with ``h' >= h``.  Authority ``A``
vouches for chain X up to the highest height any of A's blocks links to;
X's producer vouches for its own chain up to its head (it signed every
block of it).  Rewriting a confirmed block would need a quorum of
authorities to have signed links to a chain that no longer exists, so
from then on a replica that disagrees is provably wrong.

Faulty authorities (caught equivocating) do not vouch for anything, but
still count in the size of the authority set: a quorum stays a quorum of
the whole genesis set, never of whoever is left.

**Equivocation.**  :func:`equivocation` turns two headers one node signed
for one height into an :class:`EquivocationProof`, or returns ``None``
when there is nothing to prove.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from meshhealth.errors import InvalidBlock, RemoteError
from meshhealth.wire import BlockHeader, EquivocationProof


def quorum(authorities: int) -> int:
    """The smallest number that is more than 2/3 of ``authorities``."""
    return 2 * authorities // 3 + 1


def confirmed_height(
    chain: bytes,
    *,
    head: int,
    linked: Mapping[bytes, Mapping[bytes, int]],
    authorities: Collection[bytes],
    faulty: Collection[bytes] = (),
) -> int:
    """The highest confirmed height of ``chain`` (-1: none yet).

    ``linked[A][X]`` is the highest height of X that A's blocks link to, in
    this replica; ``head`` is the replica's head of ``chain``.
    """
    votes = sorted(
        (
            head if a == chain else linked.get(a, {}).get(chain, -1)
            for a in authorities
            if a not in faulty
        ),
        reverse=True,
    )
    q = quorum(len(authorities))
    return votes[q - 1] if len(votes) >= q else -1


def equivocation(network: bytes, held: bytes, other: bytes) -> EquivocationProof | None:
    """Compare a stored header with another one received for the same chain and height.

    Returns the proof when ``other`` is a different, validly signed header of
    the same node, network and height; ``None`` when the two are the same
    block.  Raises :class:`InvalidBlock` when ``other`` is not a genuine
    header (a forgery proves nothing about its claimed signer).
    """
    if held == other:
        return None
    mine = BlockHeader.decode(held)
    try:
        theirs = BlockHeader.decode(other)
        if (theirs.node, theirs.network, theirs.height) != (mine.node, network, mine.height):
            raise InvalidBlock(
                "not a header of this chain and height", node=mine.node, height=mine.height
            )
        theirs.verify()
    except InvalidBlock:
        raise
    except RemoteError as exc:
        raise InvalidBlock(f"forged header: {exc}", node=mine.node, height=mine.height) from exc
    return EquivocationProof.of(held, other)
