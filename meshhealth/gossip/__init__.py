"""Block dissemination between nodes: a sans-I/O protocol core and a simulator."""
