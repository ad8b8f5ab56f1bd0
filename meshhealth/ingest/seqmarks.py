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

from meshhealth.errors import MalformedMessage, StorageError
from meshhealth.wire.codec import MAX_U64, pack, unpack

MAX_ABOVE = 8192  # committed seqs above a gap, per device, that local ingest takes in
# the hard bound on a stored mark: a peer's block that would push a mark past it is
# invalid (replica admission).  Above MAX_ABOVE, so that honest nodes that took in a
# device's readings concurrently (a shared subscription) never refuse each other's blocks.
MAX_ABOVE_STORED = 4 * MAX_ABOVE
MAX_RECORD = 1 << 20  # the decode bound; MAX_ABOVE_STORED seqs of 9 bytes stay far below


@dataclass
class SeqMark:
    contiguous: int = 0
    above: set[int] = field(default_factory=set)

    def has(self, seq: int) -> bool:
        return seq <= self.contiguous or seq in self.above

    def room_for(self, seq: int, *, pending: int = 0, bound: int | None = None) -> bool:
        """False if accepting ``seq`` would grow the gap set past ``bound`` (default
        :data:`MAX_ABOVE`), with ``pending`` more seqs of the device not yet added."""
        limit = MAX_ABOVE if bound is None else bound
        return seq == self.contiguous + 1 or len(self.above) + pending < limit

    def add(self, seq: int) -> None:
        if seq <= self.contiguous:
            return
        self.above.add(seq)
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.discard(self.contiguous)

    def encode(self) -> bytes:
        if len(self.above) > MAX_ABOVE_STORED:  # admission keeps every mark below it
            raise StorageError(f"a seq mark of {len(self.above)} gapped seqs exceeds its bound")
        return pack([self.contiguous, sorted(self.above)])

    @classmethod
    def decode(cls, data: bytes) -> SeqMark:
        try:
            contiguous, above = unpack(
                data, max_len=MAX_RECORD, max_items=MAX_ABOVE_STORED + 3, max_arrays=2
            )
            ok = type(contiguous) is int and type(above) is list
            if not ok or not all(type(s) is int and 0 <= s <= MAX_U64 for s in above):
                raise StorageError("a stored seq mark is not [int, [int...]]")
        except (MalformedMessage, ValueError, TypeError) as exc:
            raise StorageError(f"undecodable stored seq mark: {exc}") from exc
        return cls(contiguous, set(above))

    def copy(self) -> SeqMark:
        return SeqMark(self.contiguous, set(self.above))
