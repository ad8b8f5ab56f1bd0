"""TLS contexts for the node's HTTPS listener, its peers and its MQTT client.

One CA (``deploy/certs.sh``) issues every certificate of a site.  A node's
certificate (CN ``mh-node-<name>``, serverAuth and clientAuth) serves its
API and gossip over HTTPS/WSS, and is also the client certificate it shows
to its peers and to the broker.

* **Server** (:func:`server_context`): the node's certificate; with a CA,
  a client certificate is *asked for* but optional, and verified against
  the CA when one is shown (a certificate of another CA fails the TLS
  handshake).  Plain API clients (patients, providers, browsers) need
  none; ``/v1/gossip`` over TLS demands one (:func:`peer_is_node`), so
  both ends of a gossip link are checked against the CA, and the signed
  gossip handshake still decides who the peer is.
* **Client** (:func:`client_context`): verifies the server against the CA
  (or the system roots when none is given), hostname included, and shows
  our certificate when we have one.

Every failure to load a file is a :class:`ConfigError` naming the file and
the fix.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshhealth.errors import ConfigError

if TYPE_CHECKING:
    from meshhealth.config import NodeConfig

NODE_CN_PREFIX = "mh-node-"
CA_ENV = "MESHHEALTH_CA"  # a CA file for CLI clients that dial https:// node URLs
_FIX = "issue it with deploy/certs.sh"


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"{what}: {path} not found; {_FIX}")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{what}: {cert} / {key} cannot be loaded ({exc}); is the key the certificate's? {_FIX}"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: {ca} not found; copy the site's ca.crt there") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{what}: {ca} is not a PEM CA certificate ({exc})") from exc


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """The HTTPS listener: our certificate; client certificates optional, checked against ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, "tls.cert_file/tls.key_file")
    if ca is not None:
        _load_ca(ctx, ca, "tls.ca_file")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    what: str = "tls",
) -> ssl.SSLContext:
    """Verify servers against ``ca`` (system roots if None); show ``cert`` if given.

    ``what`` names the settings in errors: ``tls`` -> tls.ca_file, tls.cert_file ...
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, ca, f"{what}.ca_file" if what.isidentifier() else what)
    if cert is not None:
        if key is None:
            raise ConfigError(f"{what}: the client certificate {cert} needs its key file too")
        labels = f"{what}.cert_file/{what}.key_file" if what.isidentifier() else what
        _load_chain(ctx, cert, key, labels)
    return ctx


@dataclass(frozen=True)
class NodeTls:
    """A node's three TLS contexts; None where it speaks plain TCP or uses the defaults."""

    server: ssl.SSLContext | None  # the API and gossip listener (None: plain HTTP)
    peers: ssl.SSLContext | None  # dialing https:// peers (None: the system roots)
    mqtt: ssl.SSLContext | None  # an mqtts:// broker (None: the system roots, no client cert)


def node_tls(cfg: NodeConfig) -> NodeTls:
    t, m = cfg.tls, cfg.mqtt
    ca = cfg.optional_path(t.ca_file)
    cert, key = cfg.optional_path(t.cert_file), cfg.optional_path(t.key_file)
    server = None if cert is None or key is None else server_context(cert, key, ca)
    peers = None
    if ca is not None or cert is not None:
        peers = client_context(ca, cert, key, what="tls")
    mqtt = None
    if m.ca_file or m.cert_file:
        mqtt = client_context(
            cfg.optional_path(m.ca_file),
            cfg.optional_path(m.cert_file),
            cfg.optional_path(m.key_file),
            what="mqtt",
        )
    return NodeTls(server, peers, mqtt)


def cli_context(ca: str | None = None) -> ssl.SSLContext | None:
    """For command-line clients: a context trusting ``ca`` or ``$MESHHEALTH_CA``, else None
    (aiohttp then verifies https:// URLs against the system roots, or ``$SSL_CERT_FILE``)."""
    path = ca or os.environ.get(CA_ENV, "")
    return client_context(Path(path), what=f"CA file (--ca or ${CA_ENV})") if path else None


def peer_common_name(transport: Any) -> str | None:
    """The CN of the certificate the TLS peer showed and we verified, if any."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def peer_is_node(transport: Any) -> bool:
    """Whether a gossip peer may go on to the handshake.

    On a TLS listener that checks client certificates (``tls.ca_file`` set),
    only a peer that showed a node certificate of our CA may; on plain HTTP,
    or TLS without a CA, anyone may (the signed handshake still decides).
    """
    ctx = None if transport is None else transport.get_extra_info("sslcontext")
    if ctx is None or ctx.verify_mode == ssl.CERT_NONE:
        return True
    cn = peer_common_name(transport)
    return cn is not None and cn.startswith(NODE_CN_PREFIX)
