"""Talking to nodes' HTTP APIs as a client (patients, devices, tools)."""

from __future__ import annotations

import asyncio

import aiohttp

from meshhealth.errors import NetworkError
from meshhealth.net.tls import cli_context


def client_session(
    timeout: float | aiohttp.ClientTimeout, *, ca: str | None = None
) -> aiohttp.ClientSession:
    """A session for https:// node URLs too: checked against ``ca``, else ``$MESHHEALTH_CA``
    (``meshhealth --ca FILE`` sets it), else the system roots (which ``$SSL_CERT_FILE``
    replaces).  Call it inside the event loop."""
    tls = cli_context(ca)
    connector = None if tls is None else aiohttp.TCPConnector(ssl=tls)
    if not isinstance(timeout, aiohttp.ClientTimeout):
        timeout = aiohttp.ClientTimeout(total=timeout)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


async def post_tx(
    session: aiohttp.ClientSession, node_urls: list[str], raw: bytes, *, max_wait_s: float = 30.0
) -> str:
    """Submit a control transaction, failing over across nodes; a node that answers 429
    is asked again after its ``Retry-After``, while the waits add up to ``max_wait_s``."""
    last = ""
    waited = 0.0
    for url in node_urls:
        while True:
            try:
                async with session.post(
                    f"{url}/v1/tx", data=raw, headers={"Content-Type": "application/msgpack"}
                ) as resp:
                    body = await resp.json()
                    if resp.status in (202, 409):
                        return str(body.get("tx", ""))
                    last = f"{url}: {resp.status} {body.get('error')}"
                    wait = _retry_after(resp) if resp.status == 429 else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                last, wait = f"{url}: {exc}", None
            if wait is None or waited + wait > max_wait_s:
                break
            await asyncio.sleep(wait)
            waited += wait
    raise NetworkError(f"no node accepted the transaction ({last})")


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "")))
    except ValueError:
        return None


async def get_first(session: aiohttp.ClientSession, node_urls: list[str], path: str) -> bytes:
    """The body of the first node, in order, that answers ``GET path`` with 200."""
    last = ""
    for url in node_urls:
        try:
            async with session.get(f"{url.rstrip('/')}{path}") as resp:
                if resp.status == 200:
                    return await resp.read()
                last = f"{url}: {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = f"{url}: {exc}"
    raise NetworkError(f"no node answered {path} ({last})")
