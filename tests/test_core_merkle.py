"""RFC 6962 Merkle tree: known answers, an independent reference, audit paths."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshhealth.chain import merkle


def H(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


# --- an independent reference, straight from RFC 6962 §2.1 -----------------


def _k(n: int) -> int:
    """The largest power of two strictly less than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def ref_root_entries(entries: list[bytes]) -> bytes:
    n = len(entries)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + entries[0])
    k = _k(n)
    return H(b"\x01" + ref_root_entries(entries[:k]) + ref_root_entries(entries[k:]))


def ref_root(leaves: list[bytes]) -> bytes:
    """MTH over leaf *hashes* (what ``root_of_leaves`` takes)."""
    n = len(leaves)
    if n == 0:
        return H(b"")
    if n == 1:
        return leaves[0]
    k = _k(n)
    return H(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:]))


def ref_path(leaves: list[bytes], m: int) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(leaves[:k], m), ref_root(leaves[k:])]
    return [*ref_path(leaves[k:], m - k), ref_root(leaves[:k])]


def ref_sides(m: int, n: int) -> list[str]:
    """Which side each audit-path sibling sits on, leaf upwards: the shape of a proof."""
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_sides(m, k), "R"]
    return [*ref_sides(m - k, n - k), "L"]


def entries_of(n: int, salt: bytes = b"") -> list[bytes]:
    return [salt + b"entry-%d" % i for i in range(n)]


# --- known answers -----------------------------------------------------------


def test_empty_root_is_hash_of_nothing() -> None:
    assert H(b"") == merkle.EMPTY_ROOT
    assert merkle.root([]) == H(b"")
    assert merkle.root_of_leaves([]) == H(b"")
    assert H(b"").hex() == ("0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8")


def test_one_leaf_root_is_its_leaf_hash() -> None:
    for e in (b"", b"a", b"\x00" * 100):
        assert merkle.leaf_hash(e) == H(b"\x00" + e)
        assert merkle.root([e]) == merkle.leaf_hash(e)


def test_two_and_three_leaves() -> None:
    a, b, c = (merkle.leaf_hash(x) for x in (b"a", b"b", b"c"))
    assert merkle.node_hash(a, b) == H(b"\x01" + a + b)
    assert merkle.root([b"a", b"b"]) == H(b"\x01" + a + b)
    assert merkle.root([b"a", b"b", b"c"]) == H(b"\x01" + H(b"\x01" + a + b) + c)


def test_leaf_and_node_domains_differ() -> None:
    # a two-leaf tree's root can't be passed off as the leaf hash of the concatenation
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.root([b"a", b"b"]) != merkle.leaf_hash(a + b)
    assert merkle.root([a + b]) != merkle.root([b"a", b"b"])


@pytest.mark.parametrize("n", range(0, 70))
def test_root_matches_rfc6962_reference(n: int) -> None:
    entries = entries_of(n)
    leaves = [merkle.leaf_hash(e) for e in entries]
    assert merkle.root(entries) == ref_root_entries(entries)
    assert merkle.root_of_leaves(leaves) == ref_root(leaves)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(st.binary(max_size=40), max_size=140))
def test_root_matches_reference_for_any_entries(entries: list[bytes]) -> None:
    assert merkle.root(entries) == ref_root_entries(entries)


# --- audit paths -------------------------------------------------------------


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]


def check_proofs(leaves: list[bytes], other_sizes: range | list[int]) -> None:
    n = len(leaves)
    root = merkle.root_of_leaves(leaves)
    for i in range(n):
        path = merkle.inclusion_proof(leaves, i)
        assert path == ref_path(leaves, i)
        assert merkle.verify_inclusion(leaves[i], i, n, path, root)
        # any other leaf at this index fails
        for j in range(n):
            if leaves[j] != leaves[i]:
                assert not merkle.verify_inclusion(leaves[j], i, n, path, root)
        assert not merkle.verify_inclusion(_flip(leaves[i]), i, n, path, root)
        # the same leaf and path at any other index fails
        for j in range(-1, n + 2):
            if j != i:
                assert not merkle.verify_inclusion(leaves[i], j, n, path, root)
        # another tree size verifies only when the audit path has exactly the same shape
        # (RFC 9162 binds size only through the shape; e.g. index 0 of 3 and of 4)
        for m in other_sizes:
            if m == n:
                continue
            same_shape = 0 <= i < m and ref_sides(i, m) == ref_sides(i, n)
            assert merkle.verify_inclusion(leaves[i], i, m, path, root) == same_shape
        # a tampered, dropped or extra path element fails, and so does another root
        for p in range(len(path)):
            for byte in (0, 31):
                bad = [*path[:p], _flip(path[p], byte), *path[p + 1 :]]
                assert not merkle.verify_inclusion(leaves[i], i, n, bad, root)
        if path:
            assert not merkle.verify_inclusion(leaves[i], i, n, path[:-1], root)
            assert not merkle.verify_inclusion(leaves[i], i, n, path[1:], root)
        assert not merkle.verify_inclusion(leaves[i], i, n, [*path, root], root)
        assert not merkle.verify_inclusion(leaves[i], i, n, [*path, H(b"x")], root)
        assert not merkle.verify_inclusion(leaves[i], i, n, path, _flip(root))


@pytest.mark.parametrize("n", range(1, 65))
def test_inclusion_proofs_every_leaf(n: int) -> None:
    leaves = [merkle.leaf_hash(e) for e in entries_of(n)]
    check_proofs(leaves, range(0, n + 3) if n <= 24 else [n - 1, n + 1, n + 2, 2 * n])


@settings(max_examples=25, deadline=None)
@given(
    entries=st.lists(st.binary(max_size=8), min_size=1, max_size=64, unique=True),
    sizes=st.lists(st.integers(1, 130), max_size=4),
)
def test_inclusion_proofs_random_entries(entries: list[bytes], sizes: list[int]) -> None:
    check_proofs([merkle.leaf_hash(e) for e in entries], sizes)


def test_shape_coincidence_example_is_real() -> None:
    # documents the RFC behaviour the size check above allows for
    leaves = [merkle.leaf_hash(e) for e in entries_of(3)]
    path = merkle.inclusion_proof(leaves, 0)
    root = merkle.root_of_leaves(leaves)
    assert merkle.verify_inclusion(leaves[0], 0, 4, path, root)
    assert not merkle.verify_inclusion(leaves[2], 2, 4, merkle.inclusion_proof(leaves, 2), root)


def test_proof_index_bounds() -> None:
    leaves = [merkle.leaf_hash(e) for e in entries_of(5)]
    for bad in (-1, 5, 6):
        with pytest.raises(IndexError):
            merkle.inclusion_proof(leaves, bad)
    with pytest.raises(IndexError):
        merkle.inclusion_proof([], 0)
    root = merkle.root_of_leaves(leaves)
    assert not merkle.verify_inclusion(leaves[0], 0, 0, [], root)
    assert merkle.verify_inclusion(leaves[0], 0, 1, [], leaves[0])
    assert not merkle.verify_inclusion(leaves[0], 0, 1, [leaves[1]], leaves[0])


# --- proofs for many leaves of one block ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data())
def test_multiproof_proves_exactly_the_chosen_leaves(n: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(n)]
    tree = merkle.levels(leaves)
    root = tree[-1][0]
    assert root == merkle.root_of_leaves(leaves)
    chosen = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))
    proof = merkle.multiproof(tree, sorted(chosen))
    assert merkle.verify_multiproof({i: leaves[i] for i in chosen}, n, proof, root)
    # a swapped leaf, a truncated or a padded proof fails (the size comes from the signed
    # header's entry count, so it is not the proof's to bind)
    victim = min(chosen)
    forged = {i: leaves[i] for i in chosen} | {victim: merkle.leaf_hash(b"forged")}
    assert not merkle.verify_multiproof(forged, n, proof, root)
    assert not merkle.verify_multiproof({i: leaves[i] for i in chosen}, n, [*proof, root], root)
    if proof:
        assert not merkle.verify_multiproof({i: leaves[i] for i in chosen}, n, proof[:-1], root)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.data())
def test_multiproof_of_one_leaf_is_the_audit_path(n: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(n)]
    i = data.draw(st.integers(0, n - 1))
    path = merkle.multiproof(merkle.levels(leaves), [i])
    assert path == merkle.inclusion_proof(leaves, i)
    assert merkle.verify_inclusion(leaves[i], i, n, path, merkle.root_of_leaves(leaves))
