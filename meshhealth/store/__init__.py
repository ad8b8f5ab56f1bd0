"""LMDB storage of chains, indexes and node state (blocking; keep off the event loop)."""
