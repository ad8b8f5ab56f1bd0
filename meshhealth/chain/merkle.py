"""RFC 6962 / RFC 9162 Merkle tree over block entries.

Leaves are hashed ``H(0x00 || entry)`` and inner nodes ``H(0x01 || l || r)``,
so a leaf can never be passed off as an inner node.  The tree splits ``n``
leaves at the largest power of two below ``n``; built bottom-up this is
the same as promoting an unpaired last node one level unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshhealth.crypto.hashing import h

EMPTY_ROOT = h(b"")


def leaf_hash(entry: bytes) -> bytes:
    return h(b"\x00" + entry)


def node_hash(left: bytes, right: bytes) -> bytes:
    return h(b"\x01" + left + right)


def root_of_leaves(leaves: Sequence[bytes]) -> bytes:
    """Root from leaf *hashes* (a pruned entry is kept as its leaf hash alone)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root(entries: Sequence[bytes]) -> bytes:
    return root_of_leaves([leaf_hash(e) for e in entries])


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index`` (RFC 6962 §2.1.1), leaf hashes in."""
    if not 0 <= index < len(leaves):
        raise IndexError(index)
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    # Walk down from the root, remembering the sibling subtree at each split.
    siblings: list[tuple[int, int]] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            siblings.append((lo + k, hi))
            hi = lo + k
        else:
            siblings.append((lo, lo + k))
            lo = lo + k
    for a, b in reversed(siblings):
        path.append(root_of_leaves(leaves[a:b]))
    return path


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root_: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``leaf`` (a leaf hash) sit at ``index`` under ``root_``?"""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_
