"""Simulated wearable device agents for MeshHealth."""
