"""What one block commit writes: prepared by the pure batcher, applied by the store."""

from __future__ import annotations

from dataclasses import dataclass

from meshhealth.chain.block import Block
from meshhealth.ingest.seqmarks import SeqMark


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
