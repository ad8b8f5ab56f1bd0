"""Who may make this node write, and how much: the API's limits, from ``[api]`` (pure).

``POST /v1/tx`` is charged in the *encoded bytes that land on chain* (the
canonical transaction plus its block-entry framing):

* per source address (IPv6 by /64), before anything is decoded;
* per signing patient key, after its signature is checked (so nobody can
  spend someone else's share with forged transactions);
* then against a budget per hour: each *registered* patient (an authority's
  ``P1`` names them) has their own, and all the patients one authority
  registered share that authority's (so a bad authority registering
  throwaway keys gets no more out of honest nodes); every unregistered key
  shares one strangers' budget, so all strangers together add at most that
  many bytes per hour (plus one hour's burst) to this node's chain, and none
  of it comes out of a registered patient's budget;
* the access state may hold at most ``max_grants_per_patient`` grants and
  ``max_held_bytes_per_patient`` bytes of a patient's transactions (it keeps
  them in memory), and ``max_stranger_held_bytes`` of all unregistered
  patients' together: what strangers can make every replica hold is bounded
  for good, not only per hour.

A signed read is charged one request per source before its signature is
checked, and one per reader key after.  Everything is charged only once
the whole request has passed, so a refused request costs its sender, and
nobody else, only what it already spent.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Callable

from meshhealth.chain.acl import AccessState
from meshhealth.config import ApiConfig
from meshhealth.errors import RateLimited, Rejected
from meshhealth.net.limits import TokenBuckets, hourly
from meshhealth.wire import (
    Control,
    EnrollDevice,
    Erase,
    Grant,
    Rechain,
    RegisterPatient,
    RemoveDevice,
    Revoke,
)
from meshhealth.wire.types import MAX_TX

STRANGERS = b"strangers"
# erasures per patient per hour let through on its own allowance (more go on the budgets)
CUT_ERASES_PER_HOUR = 4


def entry_bytes(raw: bytes) -> int:
    """What an entry of ``len(raw)`` bytes adds to a block body (msgpack bin framing)."""
    n = len(raw)
    return n + (2 if n < 256 else 3 if n < 65_536 else 5)


def source_of(remote: str | None) -> str:
    """The key a client's address is limited under: an IPv4 address, an IPv6 /64."""
    if not remote:
        return "?"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if ip.version == 6 and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


def _retry(what: str, wait_s: float, reason: str = "rate_limited") -> RateLimited:
    return RateLimited(reason, f"{what}; retry in {math.ceil(wait_s)} s", wait_s)


def _cuts_off(tx: Control, access: AccessState) -> bool:
    """A revocation of a grant of this patient held here and not yet revoked, or a removal
    of a device enrolled for this patient and not yet removed: what a patient must always
    be able to do (one per grant or device, and those are within the budgets)."""
    if isinstance(tx, RemoveDevice):
        dp = (tx.device, tx.patient)
        return dp in access.floors and dp not in access.removed
    if not isinstance(tx, Revoke):
        return False
    g = access.grants.get(tx.grant)
    return g is not None and g.patient == tx.patient and not access.is_revoked(tx.grant)


def _follows_cut(tx: Control, access: AccessState) -> bool:
    """An erasure of a patient that holds something here, later than its last one; or the
    first rechain of one of the patient's streams since its latest revocation, removal or
    erasure (what makes the cut stick): let through on the patient's own small allowance,
    whatever strangers spent."""
    if isinstance(tx, Erase):
        return access.held_bytes[tx.patient] > 0 and tx.ts_ms > access.erased.get(tx.patient, -1)
    if not isinstance(tx, Rechain):
        return False
    cut = access.last_cut.get(tx.patient)
    return (
        cut is not None
        and tx.ts_ms >= cut
        and access.last_rechain(tx.patient, tx.stream) < cut
        and any((k.to, tx.patient, tx.stream) in access.streams for k in tx.devices)
    )


class ApiLimits:
    """The node's buckets and budgets; every method takes ``now`` in seconds."""

    def __init__(self, cfg: ApiConfig) -> None:
        n = cfg.limit_table_keys
        self.cfg = cfg
        self.tx_source: TokenBuckets[str] = TokenBuckets(
            cfg.tx_source_bytes_per_s, cfg.tx_source_burst_bytes, max_keys=n
        )
        self.tx_patient: TokenBuckets[bytes] = TokenBuckets(
            cfg.tx_patient_bytes_per_s, cfg.tx_patient_burst_bytes, max_keys=n
        )
        self.strangers: TokenBuckets[bytes] = hourly(cfg.stranger_bytes_per_hour, max_keys=1)
        # one per registered patient: the table never drops one (registrations are few)
        self.registered: TokenBuckets[bytes] = hourly(
            cfg.registered_bytes_per_hour, max_keys=1 << 30
        )
        # per registering authority: few keys (the genesis), never dropped
        self.registrars: TokenBuckets[bytes] = hourly(cfg.registrar_bytes_per_hour)
        self.cuts: TokenBuckets[bytes] = hourly(cfg.cut_bytes_per_patient_hour, max_keys=n)
        # ...and what all unregistered patients' cuts take together: each throwaway key
        # has an allowance of its own, so without this pool their sum would grow with
        # the number of throwaway keys holding a transaction here
        self.stranger_cuts: TokenBuckets[bytes] = hourly(
            cfg.stranger_cut_bytes_per_hour, max_keys=1
        )
        self.cut_erases: TokenBuckets[bytes] = hourly(CUT_ERASES_PER_HOUR, max_keys=n)
        # what this node admitted for unregistered patients (the local stranger quota):
        # at most max_stranger_held_bytes in all, so at most that / 100 B patients
        self.stranger_held: dict[bytes, int] = {}
        self.stranger_held_total = 0
        self._purged_at = -1  # how many patients were registered at the last purge
        self.read_source: TokenBuckets[str] = TokenBuckets(
            cfg.read_source_per_s, cfg.read_source_burst, max_keys=n
        )
        self.read_key: TokenBuckets[bytes] = TokenBuckets(
            cfg.read_key_per_s, cfg.read_key_burst, max_keys=n
        )
        # logged reads of unregistered patients: per reader key and in all, per hour
        self.read_logs_key: TokenBuckets[bytes] = hourly(
            cfg.unregistered_read_logs_per_key_hour, max_keys=n
        )
        self.read_logs_all: TokenBuckets[bytes] = hourly(cfg.unregistered_read_logs_per_hour)
        self.limited: Counter[str] = Counter()  # 429s by reason (the API counts them)

    def _refuse(self, exc: RateLimited) -> RateLimited:
        return exc

    # --- POST /v1/tx ---------------------------------------------------------

    def tx_source_charge(self, source: str, size: int, now: float) -> None:
        """Charge a source for a submission of ``size`` bytes, before decoding it."""
        wait = self.tx_source.try_take(source, size + 5, now)
        if wait:
            raise self._refuse(_retry("too many transaction bytes from this address", wait))

    def tx_admission(
        self, tx: Control, raw: bytes, access: AccessState, now: float
    ) -> Callable[[], None]:
        """Check a verified transaction against its signer's share and the budgets (raises
        :class:`RateLimited` or :class:`Rejected`); returns what charges them, to call once
        the transaction is admitted."""
        cost = entry_bytes(raw)
        if isinstance(tx, RegisterPatient):
            return lambda: None  # an authority's: the API checked its signer
        patient = tx.patient
        wait = self.tx_patient.wait_s(patient, cost, now)
        if wait:
            raise self._refuse(_retry("too many transaction bytes from this patient key", wait))
        registered = patient in access.registered
        budget, key = (self.registered, patient) if registered else (self.strangers, STRANGERS)
        if _cuts_off(tx, access):  # whatever strangers spent
            return lambda: self.tx_patient.take(patient, cost, now)
        if (
            _follows_cut(tx, access)
            and not self.cuts.wait_s(patient, cost, now)
            and not (isinstance(tx, Erase) and self.cut_erases.wait_s(patient, 1, now))
            and (registered or not self.stranger_cuts.wait_s(STRANGERS, cost, now))
        ):
            if access.held_bytes[patient] + len(raw) > self.cfg.max_held_bytes_per_patient:
                raise Rejected(
                    "held_quota",
                    f"a patient's transactions hold at most "
                    f"{self.cfg.max_held_bytes_per_patient} bytes",
                )

            def charge_cut() -> None:
                self.tx_patient.take(patient, cost, now)
                self.cuts.take(patient, cost, now)
                if not registered:
                    self.stranger_cuts.take(STRANGERS, cost, now)
                if isinstance(tx, Erase):
                    self.cut_erases.take(patient, 1, now)

            return charge_cut
        registrar = self._registrar(access, patient, cost, now) if registered else b""
        wait = budget.wait_s(key, cost, now)
        if registrar:
            wait = max(wait, self.registrars.wait_s(registrar, cost, now))
        if wait:
            reason = "patient_budget" if registered else "stranger_budget"
            what = (
                "this patient's hourly budget is spent"
                if registered
                else "the hourly budget of unregistered patient keys is spent (ask an "
                "authority to register this key)"
            )
            raise self._refuse(_retry(what, wait, reason))
        cfg = self.cfg
        if isinstance(tx, Grant) and access.held_grants[patient] >= cfg.max_grants_per_patient:
            raise Rejected("grant_quota", f"a patient holds at most {cfg.max_grants_per_patient}")
        if isinstance(tx, EnrollDevice | Grant | Rechain):  # what grows without end
            if access.held_bytes[patient] + len(raw) > cfg.max_held_bytes_per_patient:
                raise Rejected(
                    "held_quota",
                    f"a patient's transactions hold at most {cfg.max_held_bytes_per_patient} bytes",
                )
            if not registered and self._strangers_held(access) + len(raw) > (
                cfg.max_stranger_held_bytes
            ):
                raise Rejected(
                    "stranger_quota",
                    "unregistered patients hold all the memory they may here (ask an "
                    "authority to register this key)",
                )

        grows = not registered and isinstance(tx, EnrollDevice | Grant | Rechain)

        def charge() -> None:
            self.tx_patient.take(patient, cost, now)
            budget.take(key, cost, now)
            if grows:
                self.stranger_held[patient] = self.stranger_held.get(patient, 0) + len(raw)
                self.stranger_held_total += len(raw)
            if registrar:
                self.registrars.take(registrar, cost, now)

        return charge

    def _strangers_held(self, access: AccessState) -> int:
        """Bytes of unregistered patients' transactions that THIS node admitted through its
        API and still counts as strangers' (other chains' are held, but a bad authority's
        own blocks must not use up our admission quota).  Patients registered since are
        dropped from the count when it would refuse."""
        near = self.stranger_held_total >= self.cfg.max_stranger_held_bytes - MAX_TX
        if near and len(access.registered) != self._purged_at:  # once per new registration
            self._purged_at = len(access.registered)
            for p in [p for p in self.stranger_held if p in access.registered]:
                self.stranger_held_total -= self.stranger_held.pop(p)
        return self.stranger_held_total

    def _registrar(self, access: AccessState, patient: bytes, cost: int, now: float) -> bytes:
        """Whose registrar budget a registered patient's write is charged to: of the
        authorities that registered it, one whose budget has room (the one that waits
        least, ties to the lowest key).  So an authority that registers an honest patient
        again cannot lock it out by keeping its own budget empty: the patient is refused
        only when every authority that registered it is spent, and the bytes of all
        registered patients stay within the sum of the registrars' budgets (charging
        none instead would let two colluding authorities register patients that no
        registrar budget bounds)."""
        by = access.registered_by.get(patient)
        if not by:
            return access.registrar_of.get(patient, b"")
        return min(by, key=lambda r: (self.registrars.wait_s(r, cost, now), r))

    # --- signed reads --------------------------------------------------------

    def read_source_charge(self, source: str, now: float) -> None:
        wait = self.read_source.try_take(source, 1, now)
        if wait:
            raise self._refuse(_retry("too many signed reads from this address", wait))

    def read_key_charge(self, key: bytes, now: float) -> None:
        wait = self.read_key.try_take(key, 1, now)
        if wait:
            raise self._refuse(_retry("too many signed reads by this key", wait))

    def read_log(self, key: bytes, now: float) -> bool:
        """Whether a read of an unregistered patient by ``key`` may be logged on its own
        (takes one from the reader's and the node's hourly counts), or is to be summarised."""
        if self.read_logs_key.wait_s(key, 1, now) or self.read_logs_all.wait_s(b"", 1, now):
            return False
        self.read_logs_key.take(key, 1, now)
        self.read_logs_all.take(b"", 1, now)
        return True
