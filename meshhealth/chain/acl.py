"""Access-control state: which device may publish which stream for whom, and who
may read what.

The state is a pure function of the *set* of control transactions seen
(add-only, keyed by content), so replicas that saw the same transactions in
any order agree — a CRDT, with no consensus round:

* an enrolment adds (device, patient, stream) -> key chain;
* a grant is *active* at time t iff it is present, no revocation of it by
  the same patient is present, and t is inside its window — a revocation
  may arrive before the grant it revokes, and still wins;
* an erasure covers everything of its patient up to its time; several
  erasures cover up to the latest;
* a registration (``P1``) marks a patient key as registered, if an authority
  of the network (``registrars``) signed it;
* a rechain adds its chain to each device it names; a key chain of a
  (patient, stream) is *retired* from the time of the first rechain of that
  stream to another chain that is later than the rechain that created it
  (enrolments create chains at time 0);
* a device takes in readings of a patient from the earliest *floor* of its
  enrolments for that patient: an enrolment's time (E1), or the start of the
  import window it names (E2) — the minimum, so the order does not matter;
* a removal (D1) ends a device's writing for its patient from its time on;
  several removals end it at the earliest.  Once one is known, ingest takes in
  none of that device's readings for that patient, whatever their time (a
  stolen key would backdate them into [enrolment, removal)).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from meshhealth.crypto.hashing import h
from meshhealth.errors import Rejected
from meshhealth.wire import (
    Control,
    EnrollDevice,
    Erase,
    Grant,
    Reading,
    Rechain,
    RegisterPatient,
    RemoveDevice,
    Revoke,
)

# a device's clock may run behind its patient's: readings this much older than an
# enrolment (E1) still count as after it
ENROLL_GRACE_MS = 60_000
# a block sealed this long after a device's removal (D1) was sealed by a producer that
# should have known of it: whatever their times, its readings of that device are pruned
# (kept as leaf hashes, so the block stays valid) and served to no one (issue 11)
REMOVAL_GRACE_MS = 60_000


def removed_reading(removed: int | None, r: Reading, block_ts_ms: int) -> bool:
    """Whether ``r``, in a block sealed at ``block_ts_ms``, is a removed device's: timed
    at or after the removal, or in a block sealed ``REMOVAL_GRACE_MS`` after it (a
    stolen key backdating its readings into [enrolment, removal))."""
    if removed is None:
        return False
    return r.t_last_ms >= removed or block_ts_ms >= removed + REMOVAL_GRACE_MS


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
    enrolments: dict[bytes, EnrollDevice] = field(default_factory=dict)  # tx hash -> tx
    grants: dict[bytes, Grant] = field(default_factory=dict)  # tx hash -> grant
    revoked: set[tuple[bytes, bytes]] = field(default_factory=set)  # (patient, grant hash)
    erased: dict[bytes, int] = field(default_factory=dict)  # patient -> latest erasure ts
    rechains: dict[bytes, Rechain] = field(default_factory=dict)  # tx hash -> tx
    removals: dict[bytes, RemoveDevice] = field(default_factory=dict)  # tx hash -> tx
    # (device, patient) -> earliest removal time; -> earliest enrolment floor
    removed: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    floors: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    # (patient, stream) -> {(rechain ts, the chain it starts)}
    _moves: dict[tuple[bytes, str], set[tuple[int, bytes]]] = field(default_factory=dict)
    # the authorities whose registrations count (a P1 of anyone else is ignored)
    registrars: frozenset[bytes] = frozenset()
    registered: set[bytes] = field(default_factory=set)  # patient keys
    registrar_of: dict[bytes, bytes] = field(default_factory=dict)  # patient -> lowest key
    # patient -> every authority that registered it (the API charges the one with budget)
    registered_by: dict[bytes, set[bytes]] = field(default_factory=dict)
    # patient -> the latest ts_ms of its revocations, device removals and erasures (a
    # rechain after one is what the API lets through whatever strangers spent)
    last_cut: dict[bytes, int] = field(default_factory=dict)
    # indexes (tx ids, in arrival order), so listings and reads cost what they return,
    # not every transaction held: patient -> its enrolments, rechains and removals;
    # grantee -> its grants; a sealed key's recipient (device or grant id) -> rechains
    _by_patient: dict[bytes, list[bytes]] = field(default_factory=dict)
    _by_grantee: dict[bytes, list[bytes]] = field(default_factory=dict)
    _rechains_to: dict[bytes, list[bytes]] = field(default_factory=dict)
    _enrolments_of: dict[bytes, list[bytes]] = field(default_factory=dict)  # device ->
    # per patient: bytes of the transactions held in memory here, and how many grants
    held_bytes: Counter[bytes] = field(default_factory=Counter)
    held_grants: Counter[bytes] = field(default_factory=Counter)
    held_total: int = 0  # all patients' held bytes
    held_registered: int = 0  # of which registered patients'

    def apply(self, tx: Control) -> bool:
        """Add a (verified) transaction; False if it was already known (or is a
        registration by a key that is not one of ``registrars``)."""
        raw = tx.encode()
        tid = h(raw)
        if tid in self.seen:
            return False
        if isinstance(tx, RegisterPatient):
            if tx.authority not in self.registrars:
                return False
            self.seen.add(tid)
            # the same on every replica whatever the order: the lowest registering key
            self.registrar_of[tx.patient] = min(
                tx.authority, self.registrar_of.get(tx.patient, tx.authority)
            )
            self.registered_by.setdefault(tx.patient, set()).add(tx.authority)
            if tx.patient not in self.registered:
                self.registered.add(tx.patient)
                self.held_registered += self.held_bytes[tx.patient]
            return True
        self.seen.add(tid)
        # every patient transaction stays in memory here (in a set or a dict): count it
        self.held_bytes[tx.patient] += len(raw)
        self.held_total += len(raw)
        if tx.patient in self.registered:
            self.held_registered += len(raw)
        if isinstance(tx, Revoke | Erase | RemoveDevice):
            self.last_cut[tx.patient] = max(tx.ts_ms, self.last_cut.get(tx.patient, -1))
        self._index(tid, tx)
        if isinstance(tx, EnrollDevice):
            self.known_devices.add(tx.device)
            self.enrolments[tid] = tx
            dp = (tx.device, tx.patient)
            self.floors[dp] = min(tx.floor_ms, self.floors.get(dp, tx.floor_ms))
            for s in tx.streams:
                chains = self.streams.setdefault((tx.device, tx.patient, s.stream), {})
                chains[s.chain_id] = ChainInfo(s.chain_id, s.start_epoch, s.epoch_ms)
        elif isinstance(tx, Grant):
            self.grants[tid] = tx
            self.held_grants[tx.patient] += 1
        elif isinstance(tx, Revoke):
            self.revoked.add((tx.patient, tx.grant))
        elif isinstance(tx, Erase):
            self.erased[tx.patient] = max(tx.ts_ms, self.erased.get(tx.patient, 0))
        elif isinstance(tx, RemoveDevice):
            self.removals[tid] = tx
            dp = (tx.device, tx.patient)
            self.removed[dp] = min(tx.ts_ms, self.removed.get(dp, tx.ts_ms))
        elif isinstance(tx, Rechain):
            self.rechains[tid] = tx
            self._moves.setdefault((tx.patient, tx.stream), set()).add((tx.ts_ms, tx.chain_id))
            info = ChainInfo(tx.chain_id, tx.start_epoch, tx.epoch_ms)
            for k in tx.devices:
                self.known_devices.add(k.to)
                self.streams.setdefault((k.to, tx.patient, tx.stream), {})[tx.chain_id] = info
        return True

    @property
    def held_by_strangers(self) -> int:
        """Bytes of transactions held here for patients no authority registered."""
        return self.held_total - self.held_registered

    def retired_at(self, patient: bytes, stream: str, chain_id: bytes) -> int | None:
        """From when a key chain must no longer encrypt new readings (None: in use)."""
        moves = self._moves.get((patient, stream))
        if not moves:
            return None
        born = max((ts for ts, c in moves if c == chain_id), default=-1)
        later = [ts for ts, c in moves if c != chain_id and ts > born]
        return min(later) if later else None

    def _index(self, tid: bytes, tx: Control) -> None:
        if isinstance(tx, EnrollDevice | Rechain | RemoveDevice | Grant):
            self._by_patient.setdefault(tx.patient, []).append(tid)
        if isinstance(tx, Grant):
            self._by_grantee.setdefault(tx.grantee, []).append(tid)
        elif isinstance(tx, EnrollDevice):
            self._enrolments_of.setdefault(tx.device, []).append(tid)
        elif isinstance(tx, Rechain):
            for to in {k.to for k in (*tx.devices, *tx.grants)}:
                self._rechains_to.setdefault(to, []).append(tid)

    def patient_txs(self, patient: bytes) -> list[Control]:
        """``patient``'s enrolments, grants, rechains and removals held here, in arrival
        order (an id no longer held is skipped)."""
        out: list[Control] = []
        held = (self.enrolments, self.grants, self.rechains, self.removals)
        for tid in self._by_patient.get(patient, ()):
            out += [d[tid] for d in held if tid in d][:1]
        return out

    def grants_to(self, grantee: bytes) -> dict[bytes, Grant]:
        """The grants naming ``grantee``, by id."""
        return {t: self.grants[t] for t in self._by_grantee.get(grantee, ()) if t in self.grants}

    def rechains_to(self, to: bytes) -> dict[bytes, Rechain]:
        """The rechains sealing a key to ``to`` (a device key, or a grant id), by id."""
        return {t: self.rechains[t] for t in self._rechains_to.get(to, ()) if t in self.rechains}

    def enrolments_of(self, device: bytes) -> dict[bytes, EnrollDevice]:
        """The enrolments of ``device``, by id."""
        got = self._enrolments_of.get(device, ())
        return {t: self.enrolments[t] for t in got if t in self.enrolments}

    def last_rechain(self, patient: bytes, stream: str) -> int:
        """The ts_ms of ``patient``'s latest rechain of ``stream`` (-1: none)."""
        return max((ts for ts, _ in self._moves.get((patient, stream), ())), default=-1)

    def is_revoked(self, grant_id: bytes) -> bool:
        g = self.grants.get(grant_id)
        return g is not None and (g.patient, grant_id) in self.revoked

    def grants_of(self, patient: bytes) -> dict[bytes, Grant]:
        return {t: self.grants[t] for t in self._by_patient.get(patient, ()) if t in self.grants}

    def may_read(self, reader: bytes, patient: bytes, stream: str, t_ms: int) -> bytes | None:
        """Why ``reader`` may read ``patient``'s ``stream`` at ``t_ms``: ``b"self"`` for the
        patient, the id of an active grant for a grantee; None if nothing allows it."""
        if self.erased.get(patient, -1) >= t_ms:
            return None
        if reader == patient:
            return b"self"
        for gid, g in sorted(self.grants_to(reader).items()):  # by id: on every replica
            if (
                g.patient == patient
                and (patient, gid) not in self.revoked
                and g.covers(t_ms)
                and any(s.stream == stream for s in g.streams)
            ):
                return gid
        return None

    def fingerprint(self) -> bytes:
        """A digest of the whole state: equal on replicas that hold the same transactions."""
        parts = [
            *sorted(
                b"s" + d + p + st.encode() + c
                for (d, p, st), cs in self.streams.items()
                for c in cs
            ),
            *sorted(b"g" + gid for gid in self.grants),
            *sorted(b"r" + p + g for p, g in self.revoked),
            *sorted(b"x" + p + t.to_bytes(8, "big") for p, t in self.erased.items()),
            *sorted(b"k" + k for k in self.rechains),
            *sorted(b"d" + d + p + t.to_bytes(8, "big") for (d, p), t in self.removed.items()),
            *sorted(b"f" + d + p + t.to_bytes(8, "big") for (d, p), t in self.floors.items()),
            *sorted(b"p" + p for p in self.registered),
        ]
        return h(b"\0".join(parts))

    def removed_at(self, device: bytes, patient: bytes) -> int | None:
        """From when ``device`` no longer writes for ``patient`` (None: not removed)."""
        return self.removed.get((device, patient))

    def check_reading(self, r: Reading, *, ingest: bool = False) -> None:
        """Raise :class:`Rejected` unless ``r`` fits an enrolment and its key chain.

        ``ingest``: also refuse what a node must not *take in* from a device, but may
        find in another node's block, which was sealed before that node saw the
        transaction making it so (a block's validity must not depend on arrival
        order): a reading of an erased patient from before the erasure, one on a
        key chain the patient has since replaced (a revoked grantee may hold it), one
        of a device the patient removed, whatever its time (a stolen key backdates
        its readings into [enrolment, removal)), and one from before the device's
        enrolment floor (a backdated reading).  Of these, a replica prunes a removed
        device's readings from others' blocks (:func:`removed_reading`, see
        :mod:`meshhealth.ingest.replica`); the rest stay valid there.
        """
        if ingest:
            if (r.device, r.patient) in self.removed:
                raise Rejected("removed_device", f"{r.device.hex()[:8]} was removed")
            floor = self.floors.get((r.device, r.patient))
            if floor is not None and r.t_ms < floor - ENROLL_GRACE_MS:
                raise Rejected("before_enrollment", f"reading at {r.t_ms}, enrolled from {floor}")
        if ingest and self.erased.get(r.patient, -1) >= r.t_ms:
            raise Rejected("erased", "the patient erased their data up to this time")
        if ingest:
            retired = self.retired_at(r.patient, r.stream, r.chain_id)
            if retired is not None and r.t_ms >= retired:
                raise Rejected("retired_key_chain", "the patient moved this stream to a new chain")
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
