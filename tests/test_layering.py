"""The pure core imports no I/O framework (STYLE: dependencies point inward)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "meshhealth.errors",
    "meshhealth.wire",
    "meshhealth.crypto.keys",
    "meshhealth.chain.merkle",
    "meshhealth.chain.block",
    "meshhealth.chain.acl",
    "meshhealth.chain.verify",
    "meshhealth.sharing.keychain",
    "meshhealth.sharing.enrollment",
    "meshhealth.ingest.seqmarks",
    "meshhealth.ingest.commit",
    "meshhealth.ingest.batcher",
    "meshhealth.ingest.verify",
    "meshhealth.ingest.replica",
    "meshhealth.gossip.messages",
    "meshhealth.gossip.protocol",
    "meshhealth.gossip.handshake",
    "meshhealth.gossip.sim",
    "meshhealth.gossip.wire",
    "meshhealth.net.limits",
    "meshhealth.net.admission",
    "meshhealth.net.signed_request",
    "meshhealth.sharing.audit",
    "meshhealth.sharing.registration",
]
FORBIDDEN = ("asyncio", "aiohttp", "aiomqtt", "gmqtt", "amqtt", "lmdb")


def test_core_imports_no_io_frameworks() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
