"""Access-control state: which device may publish which stream for whom.

The state is a pure function of the *set* of control transactions seen
(add-only, keyed by content), so replicas that saw the same transactions in
any order agree.  For now the only transaction is :class:`EnrollDevice`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshhealth.crypto.hashing import h
from meshhealth.errors import Rejected
from meshhealth.wire import EnrollDevice, Reading


@dataclass(frozen=True, slots=True)
class ChainInfo:
    chain_id: bytes
    start_epoch: int
    epoch_ms: int


@dataclass
class AccessState:
    # (device, patient, stream) -> chain id -> chain info
    streams: dict[tuple[bytes, bytes, str], dict[bytes, ChainInfo]] = field(default_factory=dict)
    seen: set[bytes] = field(default_factory=set)  # tx hashes
    known_devices: set[bytes] = field(default_factory=set)

    def apply(self, tx: EnrollDevice) -> bool:
        """Add a (verified) transaction; False if it was already known."""
        tid = h(tx.encode())
        if tid in self.seen:
            return False
        self.seen.add(tid)
        self.known_devices.add(tx.device)
        for s in tx.streams:
            chains = self.streams.setdefault((tx.device, tx.patient, s.stream), {})
            chains[s.chain_id] = ChainInfo(s.chain_id, s.start_epoch, s.epoch_ms)
        return True

    def check_reading(self, r: Reading) -> None:
        """Raise :class:`Rejected` unless ``r`` fits an enrolment and its key chain."""
        chains = self.streams.get((r.device, r.patient, r.stream))
        if chains is None:
            if r.device not in self.known_devices:
                raise Rejected("unknown_device", r.device.hex()[:8])
            raise Rejected("not_enrolled", f"{r.device.hex()[:8]} for stream {r.stream}")
        info = chains.get(r.chain_id)
        if info is None:
            raise Rejected("unknown_key_chain", r.chain_id.hex())
        if r.epoch < info.start_epoch:
            raise Rejected("wrong_epoch", f"epoch {r.epoch} precedes the key chain")
        if r.t_ms // info.epoch_ms != r.epoch or r.t_last_ms // info.epoch_ms != r.epoch:
            raise Rejected("wrong_epoch", f"epoch {r.epoch} does not match the sample times")
