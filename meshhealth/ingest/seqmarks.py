"""Per-device sequence marks: exactly-once without requiring in-order arrival.

A device numbers its readings 1, 2, 3, ... and keeps each in its outbox until
a receipt covers it.  Readings can reach a node out of order (a node
restarts and the broker delivers its queue before the device re-sends the
readings the node lost), so a plain high-water mark would drop good data.
A mark is therefore the highest *contiguous* committed seq plus the
committed seqs above it (bounded, like TCP's selective acks).  A receipt
carries only the contiguous part: the device may then re-send a few
readings that were already stored, and they are dropped as duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshhealth.wire.codec import pack, unpack

MAX_ABOVE = 8192  # committed seqs above a gap, per device


@dataclass
class SeqMark:
    contiguous: int = 0
    above: set[int] = field(default_factory=set)

    def has(self, seq: int) -> bool:
        return seq <= self.contiguous or seq in self.above

    def room_for(self, seq: int) -> bool:
        """False if accepting ``seq`` would grow the gap set past its bound."""
        return seq == self.contiguous + 1 or len(self.above) < MAX_ABOVE

    def add(self, seq: int) -> None:
        if seq <= self.contiguous:
            return
        self.above.add(seq)
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.discard(self.contiguous)

    def encode(self) -> bytes:
        return pack([self.contiguous, sorted(self.above)])

    @classmethod
    def decode(cls, data: bytes) -> SeqMark:
        contiguous, above = unpack(data, max_len=1 << 20)
        return cls(contiguous, set(above))

    def copy(self) -> SeqMark:
        return SeqMark(self.contiguous, set(self.above))
