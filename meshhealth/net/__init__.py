"""aiohttp shells: the node API (and, later, gossip)."""
