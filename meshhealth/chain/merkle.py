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
# An erased entry is stored, and gossiped, as this byte and its leaf hash.  0xC1 is
# the one byte msgpack never uses, so no real entry (a msgpack array) starts with it.
PRUNED = b"\xc1"


def leaf_hash(entry: bytes) -> bytes:
    return h(b"\x00" + entry)


def pruned(entry: bytes) -> bytes:
    """The stand-in for an erased entry: it keeps the entry's place in the tree, not its bytes."""
    return PRUNED + leaf_hash(entry)


def is_pruned(entry: bytes) -> bool:
    return len(entry) == 33 and entry[:1] == PRUNED


def leaf_of(entry: bytes) -> bytes:
    """The leaf hash of an entry as stored: computed, or kept if the entry was pruned."""
    return entry[1:] if is_pruned(entry) else leaf_hash(entry)


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
    return root_of_leaves([leaf_of(e) for e in entries])


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


# --- proofs for many leaves of one tree --------------------------------------
#
# Built bottom-up, the tree of ``n`` leaves has levels of ceil(n / 2**k)
# nodes; node ``i`` of a level pairs with ``i ^ 1`` when that exists, and
# the last node of an odd level is promoted unchanged.  A proof for a set of
# leaves is the sibling hashes the verifier cannot compute itself, level by
# level, in increasing position: with one leaf it is exactly the RFC 9162
# audit path, and with many leaves of one block it shares the upper levels,
# so a provider fetching a patient's readings checks each block's root once.


def levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first and the root last."""
    out = [list(leaves)]
    while len(out[-1]) > 1:
        lv = out[-1]
        nxt = [node_hash(lv[i], lv[i + 1]) for i in range(0, len(lv) - 1, 2)]
        if len(lv) % 2:
            nxt.append(lv[-1])
        out.append(nxt)
    return out


def _walk(size: int, positions: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Per level: (node count, positions known before the level is combined)."""
    out = []
    known, n = sorted(set(positions)), size
    while n > 1:
        out.append((n, known))
        known = sorted({i // 2 for i in known})
        n = (n + 1) // 2
    return out


def multiproof(tree: list[list[bytes]], indexes: Sequence[int]) -> list[bytes]:
    """The sibling hashes that prove the leaves at ``indexes`` (see above)."""
    size = len(tree[0])
    if not indexes or not all(0 <= i < size for i in indexes):
        raise IndexError("leaf index out of range")
    proof = []
    for depth, (n, known) in enumerate(_walk(size, indexes)):
        have = set(known)
        for i in known:
            sib = i ^ 1
            if sib < n and sib not in have:
                proof.append(tree[depth][sib])
                have.add(sib)
    return proof


def verify_multiproof(
    leaves: dict[int, bytes], size: int, proof: Sequence[bytes], root_: bytes
) -> bool:
    """Do these leaf hashes (by index) sit in a tree of ``size`` leaves with root ``root_``?"""
    if not leaves or not all(0 <= i < size for i in leaves):
        return False
    nodes = dict(leaves)
    it = iter(proof)
    for n, known in _walk(size, list(leaves)):
        for i in known:
            sib = i ^ 1
            if sib < n and sib not in nodes:
                nxt = next(it, None)
                if nxt is None:
                    return False
                nodes[sib] = nxt
        up: dict[int, bytes] = {}
        for i in known:
            left = i & ~1
            if left + 1 < n:
                up[i // 2] = node_hash(nodes[left], nodes[left + 1])
            else:
                up[i // 2] = nodes[i]  # the unpaired last node moves up unchanged
        nodes = up
    return next(it, None) is None and nodes.get(0) == root_
