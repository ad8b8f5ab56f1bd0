"""The genesis (network) file and the node configuration file, both TOML.

Every setting has a default a newcomer can run with; a bad value raises a
:class:`ConfigError` whose message names the file, the key and the fix.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from meshhealth.crypto.hashing import h
from meshhealth.errors import ConfigError
from meshhealth.wire.codec import pack


@dataclass(frozen=True)
class Authority:
    name: str
    key: bytes


@dataclass(frozen=True)
class Genesis:
    """Names the network and its authority nodes; its hash is the network id."""

    name: str
    created_ms: int
    authorities: tuple[Authority, ...]
    max_future_skew_ms: int = 30_000

    @property
    def network_id(self) -> bytes:
        auths = sorted([a.key, a.name] for a in self.authorities)
        return h(pack(["G1", self.name, self.created_ms, self.max_future_skew_ms, auths]))

    def is_authority(self, key: bytes) -> bool:
        return any(a.key == key for a in self.authorities)

    def dumps(self) -> str:
        return tomli_w.dumps(
            {
                "network": {
                    "name": self.name,
                    "created_ms": self.created_ms,
                    "max_future_skew_ms": self.max_future_skew_ms,
                },
                "authority": [{"name": a.name, "key": a.key.hex()} for a in self.authorities],
            }
        )

    @classmethod
    def load(cls, path: Path) -> Genesis:
        doc = _read_toml(path, "genesis file", "create one with `meshhealth network create`")
        return cls.from_doc(doc, str(path))

    @classmethod
    def load_text(cls, text: str) -> Genesis:
        return cls.from_doc(tomllib.loads(text), "stored genesis")

    @classmethod
    def from_doc(cls, doc: dict[str, Any], path: str) -> Genesis:
        try:
            net = doc["network"]
            auths = tuple(Authority(a["name"], bytes.fromhex(a["key"])) for a in doc["authority"])
            g = cls(
                net["name"],
                int(net["created_ms"]),
                auths,
                int(net.get("max_future_skew_ms", 30_000)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: malformed genesis file ({exc})") from exc
        if not g.authorities or any(len(a.key) != 32 for a in g.authorities):
            raise ConfigError(f"{path}: a network needs at least one 32-byte authority key")
        return g


def _read_toml(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} not found; {fix}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc


@dataclass(frozen=True)
class MqttConfig:
    broker: str = ""  # "mqtt://host:port"; empty runs the embedded broker
    embedded_port: int = 1883
    username: str = ""
    password: str = ""
    client_id: str = ""  # default: "mh-node-<short id>"
    readings_topic: str = "mh/v1/readings/+"
    receipts_topic: str = "mh/v1/receipts/{device}"
    shared_group: str = ""  # MQTT 5 shared subscription group
    # also send receipts for readings that reached us in other authorities' blocks, so a
    # device that waits for receipts from several authorities (agent ``confirmations``) gets
    # them; needs the devices' broker to be this node's broker too
    receipt_replicated: bool = False
    # TLS to the broker (an mqtts:// URL): the CA that issued the broker's certificate
    # (default: the system roots), and our client certificate and key, if the broker
    # wants one (deploy/certs.sh node NAME issues it)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class IngestConfig:
    block_interval_s: float = 1.0
    max_entries: int = 4_096
    max_block_bytes: int = 8 * 1024 * 1024
    # per device: readings above a gap in its seqs that we take in (a peer's block may
    # bring up to 4x this: keep it equal on every node of a network)
    max_seq_gap: int = 8192
    verify_workers: int = 2
    chunk_size: int = 256
    max_backlog: int = 200_000
    max_backlog_bytes: int = 64 * 1024 * 1024  # raw MQTT payloads waiting for the verifiers


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8700
    # POST /v1/tx, in encoded bytes that land on chain (token buckets: rate, burst)
    tx_source_bytes_per_s: float = 16_384.0  # per source address
    tx_source_burst_bytes: int = 1_048_576
    tx_patient_bytes_per_s: float = 4_096.0  # per signing patient key
    tx_patient_burst_bytes: int = 262_144
    # all unregistered patient keys together, per hour; each registered patient, per hour
    stranger_bytes_per_hour: int = 2_097_152
    registered_bytes_per_hour: int = 8_388_608
    # all the patients one authority registered, together, per hour (a bad authority
    # registering throwaway keys gets no more than this out of honest nodes)
    registrar_bytes_per_hour: int = 67_108_864
    # each patient's erasures and the rechains after a revocation, removal or erasure,
    # per hour: outside the budgets above, so strangers cannot spend them away
    cut_bytes_per_patient_hour: int = 131_072
    # ...and all unregistered patients' such cuts together, per hour
    stranger_cut_bytes_per_hour: int = 2_097_152
    # what the access state may hold per patient (this node refuses more)
    max_grants_per_patient: int = 1_024
    max_held_bytes_per_patient: int = 8_388_608
    # ...and for all unregistered patients together (past it, strangers are refused)
    max_stranger_held_bytes: int = 67_108_864
    # signed reads: requests per second and burst, per source address and per reader key
    read_source_per_s: float = 50.0
    read_source_burst: int = 500
    read_key_per_s: float = 20.0
    read_key_burst: int = 200
    # the nonce cache of signed requests: total bytes, and nonces per key / per source
    nonce_cache_bytes: int = 16_777_216
    nonces_per_key: int = 4_096
    nonces_per_source: int = 8_192
    # refused (and empty) reads: one log per (reader, patient, reason) per period, plus
    # one summary with the count; at most this many such keys per patient and in total
    refusal_period_s: float = 3_600.0
    refusal_logs_per_patient: int = 16
    refusal_logs_total: int = 1_024
    # reads that served readings of an unregistered patient: logged one by one up to these
    # counts per hour (per reader key, and in all), then summarised like refusals
    unregistered_read_logs_per_key_hour: int = 256
    unregistered_read_logs_per_hour: int = 4_096
    limit_table_keys: int = 16_384  # buckets kept per table (least recently used dropped)


@dataclass(frozen=True)
class GossipConfig:
    peers: list[str] = field(default_factory=list)  # other nodes' API URLs
    fanout: int = 4
    tick_s: float = 0.2
    observers: bool = False  # accept non-authority peers as read-only observers
    # the URL other nodes should dial us at (default: http://api.host:api.port)
    advertise_url: str = ""
    peer_exchange: bool = True  # learn other authorities' URLs from peers, and dial them
    # on start, wait up to this long to learn our own chain's head from peers before sealing
    startup_sync_s: float = 10.0
    # a peer claiming our own chain is ahead of our replica must send our own signed header
    # at that height within this long, or its claim is ignored and it is penalised
    claim_timeout_s: float = 10.0
    # memory a peer can make us hold (see GossipLimits in meshhealth.net.gossip_shell):
    # blocks waiting for their parent or links, per sending peer and in total (MiB) ...
    buffer_peer_mb: float = 32.0
    buffer_total_mb: float = 128.0
    # ... in blocks per sending peer (4,096 in all), and how long a chain's waiting blocks
    # may wait for its head to move before they are dropped (seconds)
    buffer_peer_blocks: int = 1024
    buffer_gap_s: float = 60.0
    # ... and frames queued to send (pull replies, pushes, digests), per peer and in total
    send_peer_mb: float = 32.0
    send_total_mb: float = 128.0
    # a peer that has not taken a frame from us for this long is disconnected
    slow_peer_s: float = 60.0
    # another authority's chain may add at most this many body bytes per hour of its
    # blocks' header times (a bad authority's flood of pruned entries); catch-up of
    # past hours is not throttled
    chain_bytes_per_hour: int = 2 * 1024**3


@dataclass(frozen=True)
class TlsConfig:
    """HTTPS/WSS for the API and gossip listener, and the CA peers are checked against."""

    cert_file: str = ""  # this node's certificate (PEM); set, the listener serves TLS
    key_file: str = ""  # its private key
    # the site CA: peers' server certificates (we dial https:// peers) and their client
    # certificates on /v1/gossip are checked against it (default: the system roots, and
    # no client certificates)
    ca_file: str = ""


@dataclass(frozen=True)
class StorageConfig:
    map_size_mb: int = 64


@dataclass(frozen=True)
class NodeConfig:
    base: Path = Path(".")
    key_file: str = "node.key"
    genesis_file: str = "genesis.toml"
    data_dir: str = "data"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.base / p

    @property
    def key_path(self) -> Path:
        return self.path(self.key_file)

    @property
    def genesis_path(self) -> Path:
        return self.path(self.genesis_file)

    @property
    def data_path(self) -> Path:
        return self.path(self.data_dir)

    def optional_path(self, name: str) -> Path | None:
        return self.path(name) if name else None

    @property
    def api_scheme(self) -> str:
        return "https" if self.tls.cert_file else "http"

    def dumps(self) -> str:
        def section(obj: Any) -> dict[str, Any]:
            return {f.name: getattr(obj, f.name) for f in fields(obj)}

        return tomli_w.dumps(
            {
                "node": {
                    "key_file": self.key_file,
                    "genesis_file": self.genesis_file,
                    "data_dir": self.data_dir,
                },
                "mqtt": section(self.mqtt),
                "ingest": section(self.ingest),
                "api": section(self.api),
                "storage": section(self.storage),
                "gossip": section(self.gossip),
                "tls": section(self.tls),
            }
        )

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        doc = _read_toml(path, "node config", "create one with `meshhealth init`")
        return cls.from_doc(doc, base=Path(path).resolve().parent, source=str(path))

    @classmethod
    def from_doc(cls, doc: dict[str, Any], *, base: Path, source: str = "config") -> NodeConfig:
        known = {"node", "mqtt", "ingest", "api", "storage", "gossip", "tls"}
        for k in doc:
            if k not in known:
                raise ConfigError(f"{source}: unknown section [{k}] (known: {sorted(known)})")

        def build(kind: type[Any], name: str) -> Any:
            sec = doc.get(name, {})
            allowed = {f.name: f for f in fields(kind)}
            for k, v in sec.items():
                if k not in allowed:
                    raise ConfigError(
                        f"{source}: unknown key {name}.{k} (known: {sorted(allowed)})"
                    )
                default = getattr(kind(), k)
                if isinstance(default, float) and isinstance(v, int):
                    v = float(v)
                if type(v) is not type(default):
                    raise ConfigError(f"{source}: {name}.{k} must be a {type(default).__name__}")
            return kind(**sec)

        node = doc.get("node", {})
        cfg = cls(
            base=base,
            key_file=node.get("key_file", "node.key"),
            genesis_file=node.get("genesis_file", "genesis.toml"),
            data_dir=node.get("data_dir", "data"),
            mqtt=build(MqttConfig, "mqtt"),
            ingest=build(IngestConfig, "ingest"),
            api=build(ApiConfig, "api"),
            storage=build(StorageConfig, "storage"),
            gossip=build(GossipConfig, "gossip"),
            tls=build(TlsConfig, "tls"),
        )
        ing = cfg.ingest
        if not 0.01 <= ing.block_interval_s <= 3600:
            raise ConfigError(f"{source}: ingest.block_interval_s must be in [0.01, 3600]")
        if not 1 <= ing.max_entries <= 65_535:
            raise ConfigError(f"{source}: ingest.max_entries must be in [1, 65535]")
        if not 128 * 1024 <= ing.max_block_bytes <= 8 * 1024 * 1024:  # a 64 KiB Grant fits
            raise ConfigError(f"{source}: ingest.max_block_bytes must be in [128 KiB, 8 MiB]")
        if not 1024 * 1024 <= ing.max_backlog_bytes <= 4 * 1024**3:
            raise ConfigError(f"{source}: ingest.max_backlog_bytes must be in [1 MiB, 4 GiB]")
        if not 16 <= ing.max_seq_gap <= 8192:
            raise ConfigError(f"{source}: ingest.max_seq_gap must be in [16, 8192]")
        if not 0 <= ing.verify_workers <= 64:
            raise ConfigError(f"{source}: ingest.verify_workers must be in [0, 64]")
        _check_api(cfg, source)
        g = cfg.gossip
        if not 1 <= g.fanout <= 64:
            raise ConfigError(f"{source}: gossip.fanout must be in [1, 64]")
        if not 0.01 <= g.tick_s <= 60:
            raise ConfigError(f"{source}: gossip.tick_s must be in [0.01, 60]")
        if not 0 <= g.startup_sync_s <= 3600:
            raise ConfigError(f"{source}: gossip.startup_sync_s must be in [0, 3600]")
        if not 0.1 <= g.claim_timeout_s <= 600:
            raise ConfigError(f"{source}: gossip.claim_timeout_s must be in [0.1, 600]")
        if not 1 <= g.slow_peer_s <= 3600:
            raise ConfigError(f"{source}: gossip.slow_peer_s must be in [1, 3600]")
        if type(g.chain_bytes_per_hour) is not int or not (
            1 << 24 <= g.chain_bytes_per_hour <= 1 << 50
        ):
            raise ConfigError(f"{source}: gossip.chain_bytes_per_hour must be in [2^24, 2^50]")
        if not 1 <= g.buffer_peer_blocks <= 4096:
            raise ConfigError(f"{source}: gossip.buffer_peer_blocks must be in [1, 4096]")
        if not 1 <= g.buffer_gap_s <= 3600:
            raise ConfigError(f"{source}: gossip.buffer_gap_s must be in [1, 3600]")
        # a maximal block (8 MiB + 64 KiB) must fit in one peer's send queue; a block
        # too big for the buffer is not held but pulled again once its parent is in
        for key, peer, total, least in (
            ("buffer", g.buffer_peer_mb, g.buffer_total_mb, 1),
            ("send", g.send_peer_mb, g.send_total_mb, 9),
        ):
            if not least <= peer <= total <= 65_536:
                raise ConfigError(
                    f"{source}: gossip.{key}_peer_mb and gossip.{key}_total_mb must satisfy "
                    f"{least} <= {key}_peer_mb <= {key}_total_mb <= 65536"
                )
        for url in [*g.peers, *([g.advertise_url] if g.advertise_url else [])]:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{source}: gossip URL {url!r} must start with http(s)://")
        _check_tls(cfg, source)
        return cfg


def _check_api(cfg: NodeConfig, source: str) -> None:
    """Every limit positive; byte buckets hold at least one maximal transaction."""
    from meshhealth.wire.types import MAX_CONTROL

    a = cfg.api
    for f in fields(a):
        v = getattr(a, f.name)
        if f.name not in ("host", "port") and not v > 0:
            raise ConfigError(f"{source}: api.{f.name} must be positive")
    for name in (
        "tx_source_burst_bytes",
        "tx_patient_burst_bytes",
        "stranger_bytes_per_hour",
        "registered_bytes_per_hour",
        "registrar_bytes_per_hour",
        "cut_bytes_per_patient_hour",
        "stranger_cut_bytes_per_hour",
        "max_held_bytes_per_patient",
        "max_stranger_held_bytes",
    ):
        if getattr(a, name) < MAX_CONTROL + 8:
            raise ConfigError(
                f"{source}: api.{name} must be at least {MAX_CONTROL + 8} (one transaction)"
            )


def _check_tls(cfg: NodeConfig, source: str) -> None:
    """Certificates come with their keys, and TLS settings with a URL that uses TLS."""
    t, m = cfg.tls, cfg.mqtt
    if bool(t.cert_file) != bool(t.key_file):
        raise ConfigError(
            f"{source}: set both tls.cert_file and tls.key_file (the node certificate and its "
            "key; deploy/certs.sh node NAME HOST issues them) or neither"
        )
    if t.cert_file and cfg.gossip.advertise_url.startswith("http://"):
        raise ConfigError(
            f"{source}: gossip.advertise_url must be https:// when tls.cert_file is set "
            "(peers dial it), or leave it empty"
        )
    if bool(m.cert_file) != bool(m.key_file):
        raise ConfigError(
            f"{source}: set both mqtt.cert_file and mqtt.key_file (the client certificate the "
            "broker checks, and its key) or neither"
        )
    if (m.ca_file or m.cert_file) and not m.broker.startswith(("mqtts://", "ssl://")):
        raise ConfigError(
            f"{source}: mqtt.ca_file/cert_file need a TLS broker: set mqtt.broker to "
            "mqtts://host:8883"
        )
