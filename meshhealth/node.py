"""The composition root of a running node: one TaskGroup owns every task.

Start-up rebuilds all in-memory state from LMDB (chain head, sequence
marks, enrolments read back from the blocks), so a node killed at any
instant resumes exactly where its last committed block left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from collections import Counter
from typing import Any

from aiohttp import web

from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.errors import ConfigError, NetworkError
from meshhealth.ingest.batcher import Batcher, BatchLimits
from meshhealth.ingest.mqtt import MqttIngest
from meshhealth.ingest.pipeline import Pipeline, now_ms
from meshhealth.net.admission import ApiLimits
from meshhealth.net.api import make_app
from meshhealth.net.catchup import report_catchup
from meshhealth.net.dashboard import History, sample_history
from meshhealth.net.limits import NONCE_BYTES, RefusalLog
from meshhealth.net.signed_request import ReplayGuard, SignedRequest
from meshhealth.net.tls import node_tls
from meshhealth.store.lattice_view import confirmed_heights, replay_control
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import AccessLogV2

log = logging.getLogger(__name__)


def open_store(cfg: NodeConfig, genesis: Genesis) -> Store:
    store = Store(cfg.data_path, map_size_mb=cfg.storage.map_size_mb)
    stored = store.meta("genesis")
    if stored is None:
        store.set_meta("genesis", genesis.dumps().encode())
    elif Genesis.load_text(stored.decode()).network_id != genesis.network_id:
        store.close()
        raise ConfigError(f"{cfg.data_path} holds another network's data; point data_dir elsewhere")
    return store


class Node:
    def __init__(self, cfg: NodeConfig, *, identity: Identity | None = None) -> None:
        self.cfg = cfg
        self.identity = identity or load_identity(cfg.key_path)
        self.genesis = Genesis.load(cfg.genesis_path)
        if not self.genesis.is_authority(self.identity.public):
            raise ConfigError(
                f"node {self.identity.short} is not an authority of network "
                f"{self.genesis.name!r}; add its key to {cfg.genesis_path}"
            )
        self.network = self.genesis.network_id
        self.tls = node_tls(cfg)  # TLS contexts (a bad certificate is a ConfigError here)
        self.authorities = frozenset(a.key for a in self.genesis.authorities)
        self.store = open_store(cfg, self.genesis)
        access, faulty = replay_control(self.store, registrars=self.authorities)
        for patient, upto in access.erased.items():  # finish erasures a crash cut short
            self.store.prune_patient(patient, upto)
        if self.store.compact_due():  # and the compaction that blanks their freed pages
            self.store.compact()
        head = self.store.head(self.identity.public)
        ing = cfg.ingest
        self.batcher = Batcher(
            key=self.identity.signing,
            network=self.network,
            limits=BatchLimits(
                int(ing.block_interval_s * 1000),
                ing.max_entries,
                ing.max_block_bytes,
                self.genesis.max_future_skew_ms,
                ing.max_seq_gap,
                cfg.gossip.chain_bytes_per_hour,
            ),
            access=access,
            marks={d: m.copy() for d, m in self.store.seqmarks().items()},
            height=-1 if head is None else head[0],
            prev=b"" if head is None else head[1],
            faulty=faulty,
            authorities=self.authorities,
        )
        m = cfg.mqtt
        self.mqtt = MqttIngest(
            m.client_id or f"mh-node-{self.identity.short}",
            f"$share/{m.shared_group}/{m.readings_topic}" if m.shared_group else m.readings_topic,
            self._on_payload,
            username=m.username,
            password=m.password,
            tls=self.tls.mqtt,
        )
        self.pipeline = Pipeline(
            self.batcher,
            self.store,
            workers=ing.verify_workers,
            chunk_size=ing.chunk_size,
            max_backlog=ing.max_backlog,
            max_backlog_bytes=ing.max_backlog_bytes,
            receipts_topic=m.receipts_topic,
            publish=self.mqtt.publish,
        )
        self.pipeline.receipt_replicated = m.receipt_replicated
        from meshhealth.gossip.protocol import GossipParams
        from meshhealth.net.gossip_shell import GossipLimits, GossipShell

        gc = cfg.gossip
        mib = 1024 * 1024
        limits = GossipLimits(
            buffer_peer_bytes=int(gc.buffer_peer_mb * mib),
            buffer_total_bytes=int(gc.buffer_total_mb * mib),
            send_peer_bytes=int(gc.send_peer_mb * mib),
            send_total_bytes=int(gc.send_total_mb * mib),
            slow_peer_s=gc.slow_peer_s,
            claim_timeout_s=gc.claim_timeout_s,
            buffer_peer_blocks=gc.buffer_peer_blocks,
            buffer_gap_s=gc.buffer_gap_s,
        )
        self.gossip = GossipShell(
            self,
            gc.peers,
            GossipParams(fanout=gc.fanout, tick_s=gc.tick_s),
            observers=gc.observers,
            advertise_url=gc.advertise_url or f"{cfg.api_scheme}://{cfg.api.host}:{cfg.api.port}",
            peer_exchange=gc.peer_exchange,
            client_ssl=self.tls.peers,
            limits=limits,
        )
        self.api_requests: Counter[tuple[str, int]] = Counter()  # (method, status) -> count
        self.history = History()  # the dashboard's recent ingest rates
        api = cfg.api
        self.guard = ReplayGuard(
            self.identity.public,
            max_nonces=max(1, api.nonce_cache_bytes // NONCE_BYTES),
            per_key=api.nonces_per_key,
            per_source=api.nonces_per_source,
        )
        self.limits = ApiLimits(api)
        # (stream, from, to, outcome, reason, grant, request) of the first counted refusal
        self.refusals: RefusalLog[tuple[str, int, int, str, str, bytes, SignedRequest]] = (
            RefusalLog(
                int(api.refusal_period_s * 1000),
                api.refusal_logs_per_patient,
                api.refusal_logs_total,
            )
        )
        self.auth_failures = 0
        self.access_logs = 0
        self.started = time.time()
        self.api_url = ""
        self.broker_url = m.broker

    def _on_payload(self, topic: str, payload: bytes) -> None:
        self.pipeline.on_payload(topic, payload)

    def log_access(
        self,
        req: SignedRequest,
        patient: bytes,
        stream: str,
        from_ms: int,
        to_ms: int,
        outcome: str,
        reason: str,
        grant: bytes,
        readings: int,
        count: int = 1,
    ) -> None:
        """Sign an access log carrying the reader's signed request and put it in our next
        block (the patient's audit trail)."""
        now = now_ms()
        entry = AccessLogV2.create(
            self.identity.signing,
            network=self.network,
            reader=req.key,
            patient=patient,
            stream=stream,
            from_ms=from_ms,
            to_ms=to_ms,
            ts_ms=now,
            outcome=outcome,
            reason=reason.encode(),
            grant=grant,
            readings=readings,
            count=count,
            method=req.method,
            path=req.path,
            body_hash=req.body_hash,
            req_ts_ms=req.t_ms,
            req_nonce=req.nonce,
            req_sig=req.sig,
        )
        self.batcher.admit_log(entry, now)
        self.pipeline.check_full()
        self.access_logs += 1

    def log_refusal(
        self,
        req: SignedRequest,
        patient: bytes,
        stream: str,
        from_ms: int,
        to_ms: int,
        outcome: str,
        reason: str,
        grant: bytes,
        readings: int = 0,
        *,
        served: bool = False,
    ) -> None:
        """A refused (or empty, or over-budget) read: logged if it is the first of its
        reader, patient and reason this period, else counted into the period's summary
        (:class:`RefusalLog`).  ``served``: the read served data, and is never dropped."""
        now = now_ms()
        self.flush_refusals(now)
        evidence = (stream, from_ms, to_ms, outcome, reason, grant, req)
        # a stranger is refused no_grant (or not_patient, on the audit trail); a registered
        # patient and its grantees get other answers, and are logged outside the caps (an
        # unregistered patient's grantees may be a stranger's own throwaway keys)
        stranger = reason in ("no_grant", "not_patient")
        known = not stranger and patient in self.batcher.access.registered
        kind = f"{outcome}:{reason}"
        if self.refusals.note(
            req.key,
            patient,
            kind,
            evidence,
            now,
            capped=not known,
            amount=readings,
            pool="strangers" if stranger else "readers",
            served=served,
        ):
            self.log_access(req, patient, stream, from_ms, to_ms, outcome, reason, grant, readings)

    def log_read(
        self,
        req: SignedRequest,
        patient: bytes,
        stream: str,
        from_ms: int,
        to_ms: int,
        grant: bytes,
        readings: int,
    ) -> None:
        """A read that served readings: logged, each one.  Of an unregistered patient
        (whose grantees may be a stranger's throwaway keys), only within the per-reader and
        the node's hourly counts of such logs; past them it is summarised like a refusal."""
        if patient not in self.batcher.access.registered and not self.limits.read_log(
            req.key, time.monotonic()
        ):
            self.log_refusal(
                req, patient, stream, from_ms, to_ms, "read", "", grant, readings, served=True
            )
            return
        self.log_access(req, patient, stream, from_ms, to_ms, "read", "", grant, readings)

    def flush_refusals(self, now: int) -> None:
        """Log the summaries of refusal periods that are over."""
        for (_, patient, _), count, ev, readings in self.refusals.due(now):
            stream, lo, hi, outcome, reason, grant, req = ev
            self.log_access(req, patient, stream, lo, hi, outcome, reason, grant, readings, count)

    async def _flush_refusals_loop(self) -> None:
        period_s = self.cfg.api.refusal_period_s
        while True:
            await asyncio.sleep(min(5.0, max(0.05, period_s / 4)))
            self.flush_refusals(now_ms())

    def status(self) -> dict[str, Any]:
        return {
            "node": self.identity.public.hex(),
            "network": self.network.hex(),
            "network_name": self.genesis.name,
            "uptime_s": round(time.time() - self.started, 1),
            "broker": self.broker_url,
            "mqtt_connected": self.mqtt.connected.is_set(),
            "ingest": self.pipeline.statistics(),
            "store": self.store.statistics(),
            "enrolled_devices": len(self.batcher.access.known_devices),
            "reads": {
                "access_logs": self.access_logs,
                "auth_failures": self.auth_failures,
                "rate_limited": sum(self.limits.limited.values()),
                "refusals_unlogged": self.refusals.unlogged,
                "nonces": len(self.guard.nonces),
            },
            "chains": self.chains(),
            "faulty": {n.hex(): h for n, h in self.batcher.faulty.items()},
            "gossip": self.gossip.statistics(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "pid": os.getpid(),
        }

    def chains(self) -> dict[str, dict[str, Any]]:
        """Every chain in the replica: head, hash, highest confirmed height, faulty or not."""
        faulty = self.batcher.faulty
        confirmed = confirmed_heights(self.store, self.authorities, faulty)
        return {
            n.hex(): {
                "height": h,
                "hash": hh.hex(),
                "confirmed": confirmed.get(n, -1),
                "faulty": n in faulty,
            }
            for n, (h, hh) in self.store.heads().items()
        }

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.store.close)
            if not self.broker_url:
                from meshhealth.ingest.broker import EmbeddedBroker  # amqtt is heavy: load on use

                broker = EmbeddedBroker(port=self.cfg.mqtt.embedded_port)
                try:
                    await stack.enter_async_context(broker)
                except OSError as exc:
                    raise NetworkError(
                        f"embedded broker: port {broker.port} is in use ({exc}); "
                        "set mqtt.embedded_port or mqtt.broker"
                    ) from exc
                self.broker_url = broker.url
            runner = web.AppRunner(make_app(self), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(
                runner, self.cfg.api.host, self.cfg.api.port, ssl_context=self.tls.server
            )
            try:
                await site.start()
            except OSError as exc:
                raise NetworkError(
                    f"API port {self.cfg.api.host}:{self.cfg.api.port} is in use "
                    f"({exc}); set api.port"
                ) from exc
            self.api_url = f"{self.cfg.api_scheme}://{self.cfg.api.host}:{self.cfg.api.port}"
            async with asyncio.TaskGroup() as tg:
                pipe = tg.create_task(self.pipeline.run())
                gossip = tg.create_task(self.gossip.run())
                sampler = tg.create_task(sample_history(self))
                catchup = tg.create_task(report_catchup(self))
                refusals = tg.create_task(self._flush_refusals_loop())
                if ready is not None:
                    ready.set()  # the API answers; ingest starts once our own head is known
                # SIGTERM ends the start-up sync too: a node still fetching its own chain
                # (or told a lie about it) stops within its grace time, sealing nothing
                sync = tg.create_task(self.gossip.sync_own_chain(self.cfg.gossip.startup_sync_s))
                stopping = tg.create_task(stop.wait())
                await asyncio.wait({sync, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not sync.done():
                    sync.cancel()
                    log.info("node %s: stopped during start-up sync", self.identity.short)
                elif not stop.is_set():
                    if not sync.result():
                        log.warning(
                            "node %s: no peer told us our own chain's head within %.0f s; "
                            "sealing from our local head %d",
                            self.identity.short,
                            self.cfg.gossip.startup_sync_s,
                            self.batcher.height,
                        )
                    await self.mqtt.start(self.broker_url)
                    stack.push_async_callback(self.mqtt.stop)
                    log.info(
                        "node %s up: api %s, broker %s",
                        self.identity.short,
                        self.api_url,
                        self.broker_url,
                    )
                    await stopping
                self.gossip.close()
                pipe.cancel()
                gossip.cancel()
                sampler.cancel()
                catchup.cancel()
                refusals.cancel()
            await self.pipeline.flush()
