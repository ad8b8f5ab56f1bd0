"""The embedded MQTT broker (amqtt) used when no broker is configured.

It exists so that ``meshhealth demo`` and a first ``node run`` work on a
machine with nothing else installed.  It is several times slower than
Mosquitto (ARCHITECTURE §8) and keeps nothing on disk; production and the
tests use Mosquitto.  Durability never depends on the broker: devices keep
every reading until a node's receipt covers it.
"""

from __future__ import annotations

import logging
from types import TracebackType

from amqtt.broker import Broker


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 10_000}
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(config)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        await self._broker.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._broker.shutdown()
