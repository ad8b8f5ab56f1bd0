"""Keys, hashes and key files (PyNaCl underneath; nothing hand-rolled)."""
