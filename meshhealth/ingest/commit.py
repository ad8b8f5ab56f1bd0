"""What one block commit writes: prepared by the pure batcher, applied by the store."""

from __future__ import annotations

from dataclasses import dataclass

from meshhealth.chain.block import Block
from meshhealth.ingest.seqmarks import SeqMark

# the readings index keys a reading by its hour and its block's height, 32 bits each
HOUR_MS = 3_600_000
MAX_INDEX_HOUR = 2**32 - 1
MAX_HEIGHT = 2**32 - 1


def index_hour_ok(t_ms: int) -> bool:
    """Whether a reading starting at ``t_ms`` fits the readings index (year ~490,000)."""
    return t_ms >= 0 and t_ms // HOUR_MS <= MAX_INDEX_HOUR


@dataclass(frozen=True, slots=True)
class IndexedReading:
    """What the batcher tells the store about one reading it put in a block."""

    index: int
    patient: bytes
    stream: str
    t_ms: int
    counted: bool = True  # False: a copy of a reading another chain already brought us


@dataclass(frozen=True, slots=True)
class Commit:
    """Everything one block commit writes, prepared by the (pure) batcher."""

    block: Block
    readings: tuple[IndexedReading, ...]
    seqmarks: dict[bytes, SeqMark]
    txs: tuple[tuple[bytes, int], ...]  # (tx hash, entry index)
    audit: tuple[tuple[bytes, int, bytes, int], ...] = ()  # (patient, ts_ms, request, index)
    prune: frozenset[int] = frozenset()  # entries of erased patients: stored as leaf hashes
