"""The gossip messages on the wire: canonical msgpack, bounded before decoding.

A :class:`Push` or :class:`Blocks` travels with the blocks' bytes (encoded
header, encoded body), which the receiving shell validates before the core
ever hears of them.  Every other message is control only.  The bounds are
checked first, and anything off the grammar raises ``MalformedMessage``.
"""

from __future__ import annotations

from typing import Any

from meshhealth.errors import MalformedMessage
from meshhealth.gossip.messages import (
    Blocks,
    FullHeads,
    FullHeadsRequest,
    Heads,
    Message,
    PeerList,
    Pull,
    Push,
)
from meshhealth.wire.codec import MAX_U64, array, b_exact, b_max, pack, record, u_int, unpack
from meshhealth.wire.types import MAX_HEADER

MAX_GOSSIP = 16 * 1024 * 1024
MAX_BODY = 8 * 1024 * 1024 + 64 * 1024
MAX_RECENT = 256
MAX_HEADS = 65_536
MAX_BATCH = 256
MAX_PEERS = 256
MAX_URL = 256
# the largest message's objects: a FullHeads of MAX_HEADS [chain, height] records
MAX_ITEMS = 3 * MAX_HEADS + 8
MAX_ARRAYS = MAX_HEADS + 4

RawBlock = tuple[bytes, bytes]  # (encoded header, encoded body)
_KEY = b_exact(32)
_HEAD = record((("chain", _KEY), ("height", u_int())), lambda c, h: (c, h))
_PEER = record((("node", _KEY), ("url", b_max(MAX_URL))), lambda n, u: (n, u))
_RAW = record((("header", b_max(MAX_HEADER)), ("body", b_max(MAX_BODY))), lambda a, b: (a, b))


def encode(msg: Message, blocks: list[RawBlock] | None = None) -> bytes:
    blocks = blocks or []
    body: list[Any]
    if isinstance(msg, Push):
        if len(blocks) != 1:
            raise ValueError("a push carries exactly one block")
        body = ["GP", msg.chain, msg.height, msg.hops, list(blocks[0])]
    elif isinstance(msg, Heads):
        body = ["GH", [list(x) for x in msg.recent], msg.digest, int(msg.reply)]
    elif isinstance(msg, FullHeadsRequest):
        body = ["GQ"]
    elif isinstance(msg, FullHeads):
        body = ["GF", [list(x) for x in msg.heads]]
    elif isinstance(msg, Pull):
        body = ["GL", msg.chain, msg.from_height, msg.to_height]
    elif isinstance(msg, Blocks):
        if len(blocks) != msg.to_height - msg.from_height + 1:
            raise ValueError("a Blocks reply carries every block of its range")
        body = [
            "GB",
            msg.chain,
            msg.from_height,
            msg.to_height,
            msg.hops,
            [list(b) for b in blocks],
        ]
    elif isinstance(msg, PeerList):
        body = ["GX", [[n, u.encode()] for n, u in msg.peers]]
    else:
        raise TypeError(type(msg).__name__)
    return pack(body)


def decode(data: bytes) -> tuple[Message, list[RawBlock]]:
    raw = unpack(data, max_len=MAX_GOSSIP, max_items=MAX_ITEMS, max_arrays=MAX_ARRAYS)
    if type(raw) is not list or not raw or type(raw[0]) is not str:
        raise MalformedMessage("not a gossip message")
    tag, args = raw[0], raw[1:]
    try:
        msg, blocks = _decode(tag, args)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"bad {tag[:4]!r} message: {exc}") from exc
    if encode(msg, blocks) != bytes(data):
        raise MalformedMessage("non-canonical gossip message")
    return msg, blocks


def _n(args: list[Any], n: int) -> list[Any]:
    if len(args) != n:
        raise MalformedMessage(f"expected {n} fields")
    return args


def _decode(tag: str, args: list[Any]) -> tuple[Message, list[RawBlock]]:
    height = u_int(0, MAX_U64)
    if tag == "GP":
        chain, h, hops, blk = _n(args, 4)
        return Push(_KEY(chain), height(h), u_int(0, 1024)(hops)), [_RAW(blk)]
    if tag == "GH":
        recent, digest, reply = _n(args, 3)
        return Heads(
            array(_HEAD, MAX_RECENT)(recent), b_exact(16)(digest), bool(u_int(0, 1)(reply))
        ), []
    if tag == "GQ":
        _n(args, 0)
        return FullHeadsRequest(), []
    if tag == "GF":
        (heads,) = _n(args, 1)
        return FullHeads(array(_HEAD, MAX_HEADS)(heads)), []
    if tag == "GL":
        chain, a, b = _n(args, 3)
        a, b = height(a), height(b)
        if not a <= b < a + MAX_BATCH:
            raise MalformedMessage("pull range out of bounds")
        return Pull(_KEY(chain), a, b), []
    if tag == "GB":
        chain, a, b, hops, blocks = _n(args, 5)
        a, b = height(a), height(b)
        raws = list(array(_RAW, MAX_BATCH)(blocks))
        if b < a or len(raws) != b - a + 1:
            raise MalformedMessage("blocks do not match their range")
        return Blocks(_KEY(chain), a, b, u_int(0, 1024)(hops)), raws
    if tag == "GX":
        (peers,) = _n(args, 1)
        out = []
        for node, url in array(_PEER, MAX_PEERS)(peers):
            text = url.decode("ascii")  # UnicodeDecodeError is a ValueError
            if not text.startswith(("http://", "https://")):
                raise MalformedMessage("a peer URL is http(s)://")
            out.append((node, text))
        return PeerList(tuple(out)), []
    raise MalformedMessage(f"unknown gossip message {tag[:4]!r}")
