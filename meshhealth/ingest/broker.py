"""The embedded MQTT broker (amqtt) used when no broker is configured.

It exists so that ``meshhealth demo`` and a first ``node run`` work on a
machine with nothing else installed.  It is several times slower than
Mosquitto (ARCHITECTURE §8) and keeps nothing on disk; production and the
tests use Mosquitto.  Durability never depends on the broker: devices keep
every reading until a node's receipt covers it.
"""

from __future__ import annotations

import errno
import logging
import os
from types import TracebackType

from amqtt.broker import Broker
from amqtt.errors import BrokerError

from meshhealth.errors import NetworkError


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
        """Start listening; a port in use (or any other start-up failure) is one
        :class:`NetworkError` naming the fix, not amqtt's logged traceback."""
        quiet = logging.getLogger("amqtt.broker")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # it logs the failure with a traceback, then raises
        try:
            await self._broker.start()
        except (BrokerError, OSError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.EADDRINUSE, errno.EACCES):
                raise NetworkError(
                    f"embedded MQTT port {self.host}:{self.port} is "
                    f"{'in use' if cause.errno == errno.EADDRINUSE else 'not ours to bind'} "
                    f"({os.strerror(cause.errno)}: a local Mosquitto?); set mqtt.embedded_port "
                    "to a free port, or mqtt.broker to use the broker already there"
                ) from exc
            raise NetworkError(
                f"the embedded MQTT broker on {self.host}:{self.port} did not start "
                f"({cause or exc}); set mqtt.broker to use another broker"
            ) from exc
        finally:
            quiet.setLevel(level)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._broker.shutdown()
