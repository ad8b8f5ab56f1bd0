"""MeshHealth: patient-controlled sharing of wearable health data.

Layering (inner to outer; imports only point inward):

* ``errors``, ``wire``, ``crypto``, ``chain``, ``sharing``: the pure core.
  No asyncio, aiohttp, MQTT or LMDB in here; time and randomness come in as
  parameters.
* ``store`` (LMDB), ``ingest`` (MQTT + batching), ``net`` (aiohttp): shells.
* ``node``: the composition root of a running node; ``cli``: the commands.
"""

__version__ = "0.1.0"
