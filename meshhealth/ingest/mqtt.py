"""The node's MQTT client (gmqtt): a persistent QoS 1 session, nothing more.

gmqtt is here for speed: measured on these 2-core machines it consumes
2.5-3x more QoS 1 messages per second than aiomqtt (ARCHITECTURE §8 and
``meshhealth bench ingest``).  The callback only hands raw payloads to the
pipeline; every check happens later.  gmqtt acknowledges a message when the
callback returns, before the commit: durability comes from the devices'
outboxes and our receipts, never from broker acks.

Over ``mqtts://`` it checks the broker against ``mqtt.ca_file`` and shows the
node's client certificate (``mqtt.cert_file``), whose CN the broker's ACL
knows (``deploy/mosquitto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv311

from meshhealth.errors import ConfigError, NetworkError

log = logging.getLogger(__name__)

OnPayload = Callable[[str, bytes], None]


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    return parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls


class MqttIngest:
    """Subscribe ``topic`` with a persistent session; forward every payload."""

    def __init__(
        self,
        client_id: str,
        topic: str,
        on_payload: OnPayload,
        *,
        username: str = "",
        password: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.topic = topic
        self.tls = tls  # for mqtts:// (None: verify against the system roots)
        self.on_payload = on_payload
        self.connected = asyncio.Event()
        self.connects = 0
        self._stopping = False  # set by stop(): a disconnect is then ours, not a loss
        self._client = Client(client_id, clean_session=False)
        if username:
            self._client.set_auth_credentials(username, password or None)
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def _on_connect(self, client: Any, flags: Any, rc: Any, properties: Any) -> None:
        self.connects += 1
        client.subscribe(self.topic, qos=1)
        self.connected.set()
        log.info("mqtt connected (%d), subscribed %s", self.connects, self.topic)

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        self.connected.clear()
        if self._stopping:  # our own disconnect (gmqtt calls this for it too): nothing lost
            log.info("mqtt disconnected")
        else:
            log.warning("mqtt connection lost; gmqtt reconnects on its own")

    def _on_message(
        self, client: Any, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        self.on_payload(topic, payload)
        return 0  # PUBACK: success

    async def start(self, url: str, *, timeout: float = 10.0) -> None:
        host, port, use_tls = parse_broker_url(url)
        if self.tls is not None and not use_tls:
            raise ConfigError(f"broker URL {url!r}: TLS settings need an mqtts:// URL")
        ssl_arg: ssl.SSLContext | bool = (self.tls or True) if use_tls else False
        try:
            await asyncio.wait_for(
                self._client.connect(host, port, ssl=ssl_arg, version=MQTTv311, keepalive=30),
                timeout,
            )
        except ssl.SSLError as exc:
            raise NetworkError(
                f"TLS to the MQTT broker at {url} failed ({exc}); check mqtt.ca_file (the CA of "
                "the broker's certificate) and mqtt.cert_file/key_file (ours, from the same CA)"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise NetworkError(
                f"cannot reach the MQTT broker at {url} ({exc or 'timeout'}); start it, or leave "
                "mqtt.broker empty to run the embedded one"
            ) from exc

    def publish(self, topic: str, payload: bytes) -> None:
        if self.connected.is_set():
            self._client.publish(topic, payload, qos=1)

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            await asyncio.wait_for(self._client.disconnect(), 5)
