"""Simulated patients wearing simulated devices, end to end over MQTT.

For each patient the simulator plays the patient's part (an identity and a
key chain per stream, an enrolment transaction per device, POSTed to a
node) and each device's part (unseal its keys from that transaction, sample
the patient's physiology, encrypt, sign, outbox, publish).

Time: the simulated clock starts ``backfill_s`` in the past — the devices
then catch up as fast as they can, like a wearable syncing after a day
offline — and from the present on it follows the wall clock.  A reading
carries one ``interval_s`` window of one stream (default 10 s); with
``samples_per_reading=1`` every sample is its own reading.

Restarts: ``state_dir`` keeps the patients' keys, the devices' state and
the outbox.  A simulation started again on the same ``state_dir`` resumes
the same patients and devices where the clock stopped: it re-sends what the
outbox still holds and produces the time it was down as a backfill, so a
gateway service that is stopped or crashes loses nothing.  The clock moves
in the same LMDB transaction as the readings it produced, so no window is
produced twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from device_agents.agent import Agent
from device_agents.device import Device
from device_agents.keys import follow_rechains
from device_agents.outbox import Outbox
from device_agents.sensors import STREAMS, PatientPhysiology, samples
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.errors import ConfigError
from meshhealth.net.client import post_tx
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.keychain import KeyChain, epoch_of

log = logging.getLogger(__name__)

PLAN = "simulation.json"  # in state_dir: who the patients and devices are
CLOCK = b"\x00sim-clock"  # the outbox state key of the simulated clock (no device id)


@dataclass
class Patient:
    identity: Identity
    chains: dict[str, KeyChain]
    phys: PatientPhysiology
    devices: list[Device] = field(default_factory=list)
    seed: int = 0  # of its physiology


class Simulation:
    def __init__(
        self,
        *,
        broker_url: str,
        node_urls: list[str],
        network: bytes,
        authorities: set[bytes],
        state_dir: Path,
        patients: int = 3,
        devices_per_patient: int = 1,
        streams: tuple[str, ...] = tuple(STREAMS),
        interval_s: float = 10.0,
        samples_per_reading: int = 0,
        backfill_s: float = 0.0,
        gateway: bool = True,
        seed: int = 1,
        epoch_ms: int = 3_600_000,
        resend_after: float = 5.0,
        rekey_poll_s: float = 2.0,
        mqtt_tls: ssl.SSLContext | None = None,
        http_tls: ssl.SSLContext | None = None,
        confirmations: int = 1,
    ) -> None:
        self.confirmations = confirmations
        for s in streams:
            if s not in STREAMS:
                raise ValueError(f"unknown stream {s!r}; known: {', '.join(STREAMS)}")
        self.broker_url, self.node_urls = broker_url, node_urls
        self.network, self.authorities = network, authorities
        self.state_dir = state_dir
        self.streams, self.interval_ms = streams, int(interval_s * 1000)
        self.samples_per_reading = samples_per_reading
        self.gateway, self.resend_after = gateway, resend_after
        self.rekey_poll_s = rekey_poll_s
        self.mqtt_tls = mqtt_tls  # CA and client certificate for an mqtts:// broker
        self.http_tls = http_tls  # CA for https:// node URLs (None: the system roots)
        rng = random.Random(seed)
        now = time.time_ns() // 1_000_000
        self.start_ms = (now - int(backfill_s * 1000)) // self.interval_ms * self.interval_ms
        start_epoch = epoch_of(self.start_ms, epoch_ms)
        self.outbox = Outbox(state_dir / "outbox")
        resumed = self._resume()
        self.resumed = resumed is not None
        if resumed is not None:
            self.patients, self.start_ms = resumed
        else:
            seeds = [rng.randrange(1 << 30) for _ in range(patients)]
            self.patients = [
                Patient(
                    Identity.generate("patient"),
                    {s: KeyChain.new(s, start_epoch, epoch_ms) for s in streams},
                    PatientPhysiology(sd),
                    seed=sd,
                )
                for sd in seeds
            ]
            for p in self.patients:
                p.devices = [
                    Device(Identity.generate("device"), p.identity.public)
                    for _ in range(devices_per_patient)
                ]
        devices = [d for p in self.patients for d in p.devices]
        if gateway:
            # a client id of its own: two gateways on one broker must not evict each other
            self.agents = [self._agent(devices, f"mh-gw-{devices[0].identity.short}")]
        else:
            self.agents = [self._agent([d], f"mh-dev-{d.identity.short}") for d in devices]
        self.produced = 0
        self.rechained = 0  # device streams moved to a new key chain
        self.sim_ms = self.start_ms

    def _agent(self, devices: list[Device], cid: str) -> Agent:
        return Agent(
            self.outbox,
            devices,
            self.broker_url,
            network=self.network,
            authorities=self.authorities,
            client_id=cid,
            resend_after=self.resend_after,
            tls_context=self.mqtt_tls,
            confirmations=self.confirmations,
        )

    @property
    def devices(self) -> list[Device]:
        return [d for p in self.patients for d in p.devices]

    def save_patients(self) -> None:
        pdir = self.state_dir / "patients"
        pdir.mkdir(parents=True, exist_ok=True)
        for p in self.patients:
            path = pdir / f"{p.identity.short}.key"
            if not path.exists():
                save_identity(
                    p.identity, path, extra={"keychains": [c.to_doc() for c in p.chains.values()]}
                )

    def _http(self, timeout: float) -> aiohttp.ClientSession:
        tls = None if self.http_tls is None else aiohttp.TCPConnector(ssl=self.http_tls)
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=tls)

    def _resume(self) -> tuple[list[Patient], int] | None:
        """The patients, devices and clock of an earlier run on this state_dir, if any."""
        path = self.state_dir / PLAN
        if not path.exists():
            return None
        plan = json.loads(path.read_text())
        if plan["streams"] != list(self.streams) or plan["interval_ms"] != self.interval_ms:
            raise ConfigError(
                f"{self.state_dir} holds a simulation of streams {plan['streams']} every "
                f"{plan['interval_ms']} ms; use another state dir for {list(self.streams)}"
            )
        states = self.outbox.states()
        patients = []
        for pd in plan["patients"]:
            key = self.state_dir / "patients" / pd["key"]
            docs = tomllib.loads(key.read_text()).get("keychains", [])
            chains = {c.stream: c for c in map(KeyChain.from_doc, docs)}  # the last is current
            p = Patient(load_identity(key), chains, PatientPhysiology(pd["seed"]), seed=pd["seed"])
            p.devices = [Device.from_state(states[bytes.fromhex(d)]) for d in pd["devices"]]
            patients.append(p)
        clock = states.get(CLOCK, [plan["start_ms"]])[0]
        log.info("resumed %d patients from %s at %d", len(patients), self.state_dir, clock)
        return patients, int(clock)

    def _save_plan(self) -> None:
        plan = {
            "streams": list(self.streams),
            "interval_ms": self.interval_ms,
            "start_ms": self.start_ms,
            "patients": [
                {
                    "key": f"{p.identity.short}.key",
                    "seed": p.seed,
                    "devices": [d.id.hex() for d in p.devices],
                }
                for p in self.patients
            ],
        }
        tmp = self.state_dir / (PLAN + ".new")
        tmp.write_text(json.dumps(plan, indent=1))
        tmp.replace(self.state_dir / PLAN)

    async def enroll(self) -> None:
        """Enrol every device through the nodes (a resumed simulation already did)."""
        if self.resumed:
            return
        async with self._http(10) as session:
            for p in self.patients:
                for d in p.devices:
                    now = time.time_ns() // 1_000_000
                    tx = enrollment(
                        p.identity,
                        p.chains,
                        d.id,
                        epoch_of(self.start_ms, next(iter(p.chains.values())).epoch_ms),
                        now,
                        # the backfill is history from before now: an import window covers it
                        import_from_ms=min(self.start_ms, now),
                    )
                    await post_tx(session, self.node_urls, tx.encode())
                    d.accept_enrollment(tx)
                    self.outbox.save_state(d.id, d.state())
        self.save_patients()
        self._save_plan()  # last: a plan names only devices whose state is saved

    def window(self, t0: int, t1: int) -> list[tuple[Device, int, bytes]]:
        """Every device's readings for sample times in [t0, t1)."""
        out: list[tuple[Device, int, bytes]] = []
        per = self.samples_per_reading or 10**9
        for p in self.patients:
            for stream in self.streams:
                ss = samples(p.phys, stream, t0, t1)
                if not ss:
                    continue
                for d in p.devices:
                    for seq, raw in d.readings(stream, ss, max_samples=min(per, 200)):
                        out.append((d, seq, raw))
        self.produced += len(out)
        return out

    async def run(
        self,
        stop: asyncio.Event,
        *,
        duration_s: float,
        drain_timeout: float = 60.0,
        on_tick: Any = None,
    ) -> bool:
        """Produce until ``duration_s`` past now (or ``stop``); then wait for receipts.

        Returns True when every produced reading was receipted.  ``duration_s=math.inf``
        produces until ``stop`` (a gateway service).
        """
        live_ms = 2**62 if math.isinf(duration_s) else int(duration_s * 1000)
        end_ms = time.time_ns() // 1_000_000 + live_ms
        agents_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            for a in self.agents:
                tg.create_task(a.run(agents_stop))
            rekey = tg.create_task(self._follow_rechains(agents_stop))
            t = self.start_ms
            while t + self.interval_ms <= end_ms and not stop.is_set():
                now = time.time_ns() // 1_000_000
                if t + self.interval_ms > now:  # caught up: follow the wall clock
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), (t + self.interval_ms - now) / 1000)
                    continue
                await self._record(self.window(t, t + self.interval_ms), t + self.interval_ms)
                t += self.interval_ms
                self.sim_ms = t
                if on_tick is not None:
                    on_tick(self)
            drained = (
                await self.agents[0].wait_drained(drain_timeout) if not stop.is_set() else False
            )
            agents_stop.set()
            rekey.cancel()
        return drained

    async def _follow_rechains(self, stop: asyncio.Event) -> None:
        """Every ``rekey_poll_s``, let each device take up its patient's new key chains."""
        devices = [d for p in self.patients for d in p.devices]
        async with self._http(5) as session:
            while not stop.is_set():
                self.rechained += await follow_rechains(session, self.node_urls, devices)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.rekey_poll_s)

    async def _record(self, items: list[tuple[Device, int, bytes]], clock: int) -> None:
        """Hand a window's readings to the agents; the clock moves with the first batch."""
        tick = {CLOCK: [clock]}
        if self.gateway:
            await self.agents[0].record(items, extra=tick)
            return
        by_agent: dict[int, list[tuple[Device, int, bytes]]] = {}
        index = {d.id: i for i, a in enumerate(self.agents) for d in a.devices.values()}
        for it in items:
            by_agent.setdefault(index[it[0].id], []).append(it)
        if not by_agent:
            self.outbox.save_state(CLOCK, [clock])
        for i, its in by_agent.items():
            await self.agents[i].record(its, extra=tick)
            tick = {}

    def statistics(self) -> dict[str, Any]:
        agg: dict[str, int] = {}
        for a in self.agents:
            for k, v in a.stats.items():
                agg[k] = agg.get(k, 0) + v
        return dict(
            agg, produced=self.produced, outbox=self.outbox.count(), rechained=self.rechained
        )

    def close(self) -> None:
        self.outbox.close()
