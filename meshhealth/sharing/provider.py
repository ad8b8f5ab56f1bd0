"""The reader's side of a fetch: ask any node, trust none of them.

:class:`NodeClient` signs each request for the node it goes to and fails
over, in the order given, past nodes that are down, erroring or refusing
(a node that has not yet received a grant refuses what another allows).
:class:`Fetcher` pages through a node's answer and checks everything
before it believes any of it:

* each block header: a genesis authority's signature, our network;
* each block's entries: one Merkle multiproof against the header's root;
* the enrolments the node sent: the patient's signatures; every reading
  must come from a device the patient enrolled for that stream and key
  chain;
* each reading: its device's Ed25519 signature, patient and stream;

then decrypts the samples with the reader's own keys.  Signatures and
decryption run in worker processes (they are ~all the cost), a page at a
time while the next page downloads.  Anything that fails a check raises
:class:`VerificationError`: a lying node is caught, not believed.

Whose keys: :func:`grants_to` opens every grant made to the reader (each
checked against its patient's signature), :func:`access_of` turns one
patient's into an :class:`Access` (keys, and the subject an export names),
:func:`own_access` is the patient's own.  :func:`audit_trail` fetches and
checks the patient's audit trail.  ``provider fetch``, ``patient audit`` and
the local viewers (``meshhealth/viewer``) all go through these.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
import nacl.exceptions

from meshhealth.chain import merkle
from meshhealth.chain.acl import AccessState, removed_reading
from meshhealth.config import Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.errors import (
    AccessDenied,
    MalformedMessage,
    MeshHealthError,
    NetworkError,
    RemoteError,
)
from meshhealth.ingest.verify import check_one
from meshhealth.net.client import get_first
from meshhealth.net.signed_request import sign_request
from meshhealth.sharing.export import Pseudonyms, Row
from meshhealth.sharing.grants import GrantKeys
from meshhealth.sharing.keychain import ChainCursor, KeyChain, decode_samples, decrypt
from meshhealth.wire import (
    BlockHeader,
    EnrollDevice,
    Grant,
    Reading,
    Rechain,
    RemoveDevice,
    decode_control,
    decode_entry,
)
from meshhealth.wire.codec import unpack
from meshhealth.wire.types import ACCESS_LOGS, MAX_SPAN_MS, AnyAccessLog

MAX_ANSWER = 64 * 1024 * 1024
PARALLEL_FROM = 2_000  # fewer readings than this are checked in-process
Keys = dict[tuple[bytes, int], bytes]  # (chain id, epoch) -> message key M(epoch)
KeysFor = Callable[[Iterable[tuple[bytes, int]]], Keys]
Sample = tuple[int, tuple[float, ...]]


class VerificationError(RemoteError):
    """A node's answer failed a check: a forged, altered or misplaced entry or header."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class NodeClient:
    """Signed GETs to the first node, in order, that answers them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        urls: list[str],
        me: Identity,
        *,
        ids: dict[str, bytes] | None = None,
    ):
        """``ids``: a cache of each URL's node key to share between clients (a long-running
        viewer makes a client per request, and a node's key never changes)."""
        if not urls:
            raise NetworkError("no node URL given")
        self.session, self.urls, self.me = session, [u.rstrip("/") for u in urls], me
        self._ids: dict[str, bytes] = {} if ids is None else ids
        self.bytes_in = 0
        self.tried: list[str] = []  # "url: what went wrong", for error messages

    async def node_id(self, url: str) -> bytes:
        if url not in self._ids:
            async with self.session.get(f"{url}/v1/status") as r:
                r.raise_for_status()
                self._ids[url] = bytes.fromhex((await r.json())["node"])
        return self._ids[url]

    async def get_from(self, url: str, path: str) -> tuple[int, bytes]:
        """One signed GET of ``path`` (with its query) to one node: (status, body)."""
        headers = sign_request(
            self.me.signing, "GET", path, b"", audience=await self.node_id(url), t_ms=now_ms()
        )
        async with self.session.get(f"{url}{path}", headers=headers) as r:
            parts, size = [], 0
            async for chunk in r.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise NetworkError(f"{url}: answer over {MAX_ANSWER} bytes")
                parts.append(chunk)
            self.bytes_in += size
            return r.status, b"".join(parts)

    async def each_node(self, path: str) -> Any:
        """Yield (url, body) from each node that answers ``path`` with 200, in order;
        the caller stops at the first it is happy with.  Raises :class:`Refused` (an
        :class:`AccessDenied`) if every node that answered refused, :class:`NetworkError`
        if none answered."""
        denied = ""
        for url in self.urls:
            try:
                status, body = await self.get_from(url, path)
            except (aiohttp.ClientError, TimeoutError, NetworkError, KeyError, ValueError) as exc:
                self.tried.append(f"{url}: {exc or type(exc).__name__}")
                continue
            if status == 200:
                yield url, body
                continue
            reason = _reason(body)
            self.tried.append(f"{url}: {status} {reason}")
            if status in (401, 403):
                denied = reason
        if denied:
            raise Refused(denied, f"refused: {denied} ({'; '.join(self.tried)})")
        raise NetworkError(f"no node answered ({'; '.join(self.tried)})")

    async def first(self, path: str) -> tuple[str, bytes]:
        """(url, body) of the first node that answers ``path`` with 200."""
        async for url, body in self.each_node(path):
            return url, body
        raise NetworkError("no node answered")  # each_node raises first; kept for the checker


async def signed_get(
    session: aiohttp.ClientSession, urls: list[str], me: Identity, path: str
) -> bytes:
    """The body of the first node that answers ``GET path`` signed by ``me`` with 200 (the
    grant and enrolment listings answer only the party they name)."""
    return (await NodeClient(session, urls, me).first(path))[1]


class Refused(AccessDenied):
    """Every node that answered refused the request; ``reason`` is the node's label
    (``no_grant``, ``revoked``, ``expired``, ``outside_grant``, ``erased``, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _reason(body: bytes) -> str:
    """What a node said when it refused (its JSON error), for the error message."""
    try:
        doc = json.loads(body)
        return str(doc.get("reason") or doc.get("error"))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


# --- checks that run in worker processes ------------------------------------


@dataclass(frozen=True)
class Scope:
    """What every reading of one fetch must satisfy; handed to the worker processes."""

    patient: bytes
    stream: str
    from_ms: int
    to_ms: int
    network: bytes
    authorities: frozenset[bytes]
    key_txs: tuple[bytes, ...]  # the patient's enrolments and rechains, checked already
    keys: Keys


_access: dict[tuple[bytes, ...], AccessState] = {}  # per worker: key_txs -> their state


def _access_of(key_txs: tuple[bytes, ...]) -> AccessState:
    if key_txs not in _access:
        _access.clear()
        state = AccessState()
        for raw in key_txs:
            state.apply(decode_control(raw))
        _access[key_txs] = state
    return _access[key_txs]


def check_part(
    scope: Scope, raw_header: bytes, picked: list[Any], proof: list[bytes], whole: bool
) -> tuple[bytes, int, list[Opened], int, list[tuple[bytes, int]]]:
    """Check one block's header and (``whole``: for all the entries the node sent from it)
    its Merkle proof, and every reading in ``picked``: device signature, patient, stream,
    time, enrolment; then decrypt.  Returns (node, height, opened, how many we hold no key
    for, (device, seq) of those that did not decrypt under the key we hold).  Raises
    :class:`VerificationError` on the first thing that fails; a reading that does not
    decrypt is no lie of the node (the device signed it), so it is skipped and reported."""
    hdr = BlockHeader.decode(raw_header)
    if hdr.node not in scope.authorities or hdr.network != scope.network:
        raise VerificationError("a block header of a node outside our network")
    hdr.verify()
    where = f"{hdr.node.hex()[:8]}#{hdr.height}"
    if whole:
        leaves = {int(i): merkle.leaf_hash(e) for i, e in picked}
        if len(leaves) != len(picked) or not merkle.verify_multiproof(
            leaves, hdr.count, proof, hdr.root
        ):
            raise VerificationError(f"entries said to be in {where} are not in it")
        return hdr.node, hdr.height, [], 0, []
    access = _access_of(scope.key_txs)
    out: list[Opened] = []
    bad: list[tuple[bytes, int]] = []  # (device, seq) of readings that did not decrypt
    missing = 0
    for _, raw in picked:
        res = check_one(raw)
        if res[0] is not None:
            raise VerificationError(f"a reading in {where}: {res[0]}")
        r = Reading(*res[1:])
        if r.patient != scope.patient or r.stream != scope.stream:
            raise VerificationError(f"{where}: a reading of another patient or stream")
        if not scope.from_ms - MAX_SPAN_MS <= r.t_ms <= scope.to_ms:
            raise VerificationError(f"{where}: a reading outside the range asked for")
        try:
            access.check_reading(r)
        except RemoteError as exc:
            raise VerificationError(f"{where}: a reading of a device not enrolled: {exc}") from exc
        if removed_reading(access.removed_at(r.device, r.patient), r, hdr.ts_ms):
            # the patient removed the device before this reading's time, or well before
            # the block was sealed (a stolen key backdating); a node sealed it before it
            # saw the removal: not the patient's data, skip it
            bad.append((r.device, r.seq))
            continue
        key = scope.keys.get((r.chain_id, r.epoch))
        if key is None:
            missing += 1
            continue
        try:
            plain = decrypt(key, r.nonce, r.ciphertext, r.associated_data())
            unit, samples = decode_samples(plain, r.t_ms)
        except (nacl.exceptions.CryptoError, MalformedMessage):
            # signed by an enrolled device, yet it does not open under the patient's key
            # (a stolen device key writing garbage, a device bug): skip it, say so
            bad.append((r.device, r.seq))
            continue
        out.append(Opened(r.device, r.seq, r.t_ms, r.stream, unit, samples, hdr.node, hdr.height))
    return hdr.node, hdr.height, out, missing, bad


class Opened(NamedTuple):
    """One verified, decrypted reading (a tuple: cheap to send back from a worker)."""

    device: bytes
    seq: int
    t_ms: int
    stream: str
    unit: str
    samples: list[Sample]
    node: bytes  # the chain (authority) whose block holds it
    height: int


@dataclass(repr=False)
class FetchResult:
    readings: list[Opened] = field(default_factory=list)
    node_url: str = ""
    blocks: int = 0
    pages: int = 0
    bytes_transferred: int = 0
    undecryptable: int = 0  # verified, but the reader holds no key for them
    # verified and signed by an enrolled device, but they do not decrypt (or the patient
    # removed the device before their time): skipped
    skipped: list[tuple[bytes, int]] = field(default_factory=list)  # (device, seq)

    @property
    def samples(self) -> int:
        return sum(len(o.samples) for o in self.readings)

    def __repr__(self) -> str:  # the readings can be a day of samples: summarise them
        return (
            f"FetchResult({len(self.readings)} readings, {self.samples} samples from "
            f"{self.node_url}, {self.blocks} blocks, {self.bytes_transferred} bytes)"
        )

    def rows(
        self,
        subject: str,
        from_ms: int,
        to_ms: int,
        device: Callable[[bytes], str] = bytes.hex,
    ) -> list[Row]:
        """The samples inside [from_ms, to_ms] as export rows, in time order (a reading that
        starts before the range can carry samples from before it: those are left out);
        ``device`` names each device (:meth:`Access.device`: a pseudonym, if it must)."""
        return [
            Row(subject, o.stream, t, o.unit, v, device(o.device))
            for o in self.readings
            for t, v in o.samples
            if from_ms <= t <= to_ms
        ]


Job = tuple[bytes, list[Any], list[bytes], bool]


class FetchTooLarge(MeshHealthError):
    """A fetch went past the reader's byte budget (``Fetcher(max_bytes=...)``): not the
    node's fault, so no other node is tried."""


class Fetcher:
    """Fetch, verify and open one patient's stream over a time range."""

    def __init__(
        self,
        client: NodeClient,
        genesis: Genesis,
        *,
        keys_for: KeysFor,
        pool: Executor | None = None,
        chunk: int = 2048,
        max_bytes: int | None = None,
    ):
        self.client, self.genesis = client, genesis
        self.authorities = frozenset(a.key for a in genesis.authorities)
        self.keys_for, self.pool, self.chunk = keys_for, pool, chunk
        self.max_bytes = max_bytes  # answer bytes one fetch may take in (the viewers' bound)

    async def fetch(self, patient: bytes, stream: str, from_ms: int, to_ms: int) -> FetchResult:
        base = f"/v1/patients/{patient.hex()}/readings?stream={stream}&from={from_ms}&to={to_ms}"
        first = self.client.each_node(base)
        async for url, body in first:
            try:
                return await self._pages(url, base, body, patient, stream, from_ms, to_ms)
            except (aiohttp.ClientError, TimeoutError, NetworkError) as exc:
                self.client.tried.append(f"{url}: failed mid-fetch: {exc}")  # next node
        raise NetworkError(f"no node completed the fetch ({'; '.join(self.client.tried)})")

    def _scope(
        self, key_txs: list[bytes], patient: bytes, stream: str, from_ms: int, to_ms: int
    ) -> Scope:
        """Check the patient's signature on each enrolment and rechain the node sent, and
        collect the message keys of every chain they name, over the range asked for."""
        epochs: set[tuple[bytes, int]] = set()
        for raw in key_txs:
            tx = decode_control(raw)
            if not isinstance(tx, EnrollDevice | Rechain | RemoveDevice) or tx.patient != patient:
                raise VerificationError("the node sent an enrolment of someone else")
            tx.verify()
            if isinstance(tx, RemoveDevice):
                continue
            chains = [tx] if isinstance(tx, Rechain) else tx.streams
            for c in chains:
                if c.stream == stream:
                    lo = max(c.start_epoch, (from_ms - MAX_SPAN_MS) // c.epoch_ms)
                    epochs.update((c.chain_id, e) for e in range(lo, to_ms // c.epoch_ms + 1))
        return Scope(
            patient,
            stream,
            from_ms,
            to_ms,
            self.genesis.network_id,
            self.authorities,
            tuple(key_txs),
            self.keys_for(epochs),
        )

    def _jobs(self, blocks: list[Any]) -> list[Job]:
        """Per block: its proof, then its readings in slices the workers share."""
        jobs: list[Job] = []
        for raw_header, picked, proof in blocks:
            jobs.append((raw_header, picked, proof, True))
            for i in range(0, len(picked), self.chunk):
                jobs.append((raw_header, picked[i : i + self.chunk], [], False))
        return jobs

    async def _pages(
        self,
        url: str,
        base: str,
        body: bytes,
        patient: bytes,
        stream: str,
        from_ms: int,
        to_ms: int,
    ) -> FetchResult:
        res = FetchResult(node_url=url)
        start_bytes = self.client.bytes_in - len(body)
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[tuple[bytes, int, list[Opened], int, list[Any]]]] = []
        scope: Scope | None = None
        while True:
            nxt, key_txs, blocks = _unpack_answer(body)
            res.pages += 1
            if scope is None or tuple(key_txs) != scope.key_txs:
                scope = self._scope(key_txs, patient, stream, from_ms, to_ms)
            res.blocks += len(blocks)
            parallel = self.pool is not None and sum(len(b[1]) for b in blocks) >= PARALLEL_FROM
            for job in self._jobs(blocks):
                if parallel:
                    pending.append(loop.run_in_executor(self.pool, check_part, scope, *job))
                else:
                    fut = loop.create_future()
                    fut.set_result(check_part(scope, *job))
                    pending.append(fut)
            if nxt is None:
                break
            if self.max_bytes is not None and self.client.bytes_in - start_bytes > self.max_bytes:
                raise FetchTooLarge(f"the answer passed {self.max_bytes:,} bytes")
            status, body = await self.client.get_from(url, f"{base}&after={int(nxt)}")
            if status != 200:
                raise NetworkError(f"{url}: page {res.pages + 1}: {status} {_reason(body)}")
        seen: set[tuple[bytes, int]] = set()
        skipped: set[tuple[bytes, int]] = set()
        for fut in pending:
            _, _, opened, missing, bad = await fut
            res.undecryptable += missing
            for b in bad:
                if b not in skipped:  # a reading two chains carry: report it once
                    skipped.add(b)
                    res.skipped.append(b)
            for o in opened:
                if (o.device, o.seq) not in seen:  # a reading two chains carry: keep one
                    seen.add((o.device, o.seq))
                    res.readings.append(o)
        res.readings.sort(key=lambda o: (o.t_ms, o.device))
        res.bytes_transferred = self.client.bytes_in - start_bytes
        return res


def _unpack_answer(body: bytes) -> tuple[int | None, list[bytes], list[Any]]:
    try:
        tag, nxt, enrolments, blocks = unpack(body, max_len=MAX_ANSWER)
        if tag != "RS1" or not isinstance(blocks, list) or not isinstance(enrolments, list):
            raise ValueError(tag)
        return nxt, enrolments, blocks
    except (ValueError, TypeError) as exc:
        raise VerificationError(f"not a readings answer: {exc}") from exc


def make_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """Worker processes for signature checks and decryption, started now."""
    from meshhealth.workers import forkserver_pool  # they die with us, even by kill -9

    n = workers or os.cpu_count() or 1
    pool = forkserver_pool(n, ["meshhealth.sharing.provider"])
    list(pool.map(abs, range(n)))  # start every worker now, not on the first fetch
    return pool


# --- whose keys: the patient's own chains, or the grants made to the reader ----


def chain_keys(chains: Iterable[KeyChain]) -> KeysFor:
    """The patient reading their own data: every message key comes from their seeds."""
    by_id = {c.chain_id: c for c in chains}

    def keys_for(wanted: Iterable[tuple[bytes, int]]) -> Keys:
        out: Keys = {}
        cursors: dict[bytes, ChainCursor] = {}  # one forward walk per chain, not one per epoch
        for chain_id, epoch in sorted(wanted):
            c = by_id.get(chain_id)
            if c is None or epoch < c.start_epoch:
                continue
            if chain_id not in cursors:
                cursors[chain_id] = c.cursor(epoch)
            out[(chain_id, epoch)] = cursors[chain_id].message_key(epoch)
        return out

    return keys_for


def grant_keys(grants: Iterable[GrantKeys]) -> KeysFor:
    """A grantee: the keys its grants from this patient reach, and no others."""
    held = list(grants)

    def keys_for(wanted: Iterable[tuple[bytes, int]]) -> Keys:
        out: Keys = {}
        for chain_id, epoch in sorted(wanted):
            for g in held:
                key = g.message_key(chain_id, epoch)
                if key is not None:
                    out[(chain_id, epoch)] = key
                    break
        return out

    return keys_for


async def grants_to(
    session: aiohttp.ClientSession, urls: list[str], me: Identity
) -> list[tuple[GrantKeys, bool]]:
    """The keys of every grant any patient made to ``me`` (following the rechains that
    carried an open grant to new key chains), and whether it is revoked; from the first
    node that lists them, each transaction checked against its patient's signature."""
    doc = json.loads(await signed_get(session, urls, me, f"/v1/grantees/{me.public.hex()}/grants"))
    out = []
    for g in doc["grants"]:
        tx = decode_control(bytes.fromhex(g["tx"]))
        if not isinstance(tx, Grant) or tx.grantee != me.public:
            raise VerificationError("a node listed a grant that is not ours")
        tx.verify()
        keys = GrantKeys.open(tx, me)
        for hx in g.get("rechains", []):
            rc = decode_control(bytes.fromhex(hx))
            if not isinstance(rc, Rechain) or rc.patient != tx.patient:
                raise VerificationError("a node listed a rechain that is not the patient's")
            keys.follow(rc.verify(), me)
        out.append((keys, bool(g["revoked"])))
    return out


async def my_grants(
    session: aiohttp.ClientSession, urls: list[str], me: Identity, patient: bytes
) -> list[tuple[GrantKeys, bool]]:
    """:func:`grants_to`, of one patient only."""
    return [(k, r) for k, r in await grants_to(session, urls, me) if k.grant.patient == patient]


@dataclass(frozen=True)
class Access:
    """What a reader opens one patient's data with, and what its exports call the patient."""

    keys_for: KeysFor
    subject: str  # the patient's key (hex) or, under a research grant, a pseudonym
    grants: list[tuple[GrantKeys, bool]]  # (keys, revoked); empty for the patient
    names: Pseudonyms | None = None  # under a research grant: what the export calls things

    def device(self, key: bytes) -> str:
        """What an export calls a device: its key, or under a research grant its pseudonym."""
        return key.hex() if self.names is None else self.names.device(key)


def access_of(patient: bytes, mine: list[tuple[GrantKeys, bool]]) -> Access:
    """A grantee's access from its grants of ``patient`` (:class:`Refused` ``no_grant`` if
    there are none): a pseudonymous grant that is not revoked names a pseudonym."""
    if not mine:
        raise Refused("no_grant", f"patient {patient.hex()[:8]} has granted us nothing")
    pseudonymous = [k for k, revoked in mine if k.grant.pseudonymous and not revoked]
    if not pseudonymous:
        return Access(grant_keys(k for k, _ in mine), patient.hex(), mine)
    names = Pseudonyms(pseudonymous[-1].pseudonym_key)
    return Access(grant_keys(k for k, _ in mine), names.patient(patient), mine, names)


def own_access(patient: bytes, chains: Iterable[KeyChain]) -> Access:
    """The patient reading their own data: every key comes from their key chains."""
    return Access(chain_keys(chains), patient.hex(), [])


async def audit_trail(
    client: NodeClient, *, from_ms: int | None = None, to_ms: int | None = None
) -> tuple[str, list[AnyAccessLog]]:
    """The client's own audit trail (it must be the patient) from the first node that
    serves it: (that node's URL, every access log in time order, each checked to be about
    this patient and signed by the node it names).  Whether each log's signed request
    verifies is for the caller to show (:func:`meshhealth.sharing.audit.request_status`):
    one forged log must not hide the rest of the trail."""
    me = client.me.public
    path = f"/v1/patients/{me.hex()}/audit"
    query = [f"{k}={v}" for k, v in (("from", from_ms), ("to", to_ms)) if v is not None]
    if query:
        path += "?" + "&".join(query)
    url, body = await client.first(path)
    try:
        tag, items = unpack(body, max_len=MAX_ANSWER)
        if tag != "AU1" or not isinstance(items, list):
            raise ValueError(tag)
        logs = []
        for raw, node, _height, _index in items:
            log = decode_entry(raw)
            if not isinstance(log, ACCESS_LOGS) or log.patient != me or log.node != node:
                raise VerificationError("the audit trail holds an entry that is not ours")
            logs.append(log.verify())
    except (ValueError, TypeError) as exc:
        raise VerificationError(f"not an audit answer: {exc}") from exc
    logs.sort(key=lambda entry: entry.ts_ms)
    return url, logs


async def network_genesis(session: aiohttp.ClientSession, urls: list[str]) -> Genesis:
    """The network's genesis as the first node that answers serves it (trust on first use:
    pass ``--genesis`` to pin it instead)."""
    return Genesis.load_text((await get_first(session, urls, "/v1/network")).decode())
