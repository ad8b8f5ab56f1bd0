"""Blocks, Merkle trees, chain verification and the access-control state."""
