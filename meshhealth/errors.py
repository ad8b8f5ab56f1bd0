"""One error hierarchy for the whole package.

Remote misbehaviour (a bad message, a forged signature, a block that does not
verify) and local trouble (bad configuration, a full disk) are different
families, so that a caller can penalise a peer for the first and page an
operator for the second.  Library errors are translated once, at the
boundary where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations


class MeshHealthError(Exception):
    """Base of every error MeshHealth raises on purpose."""


# --- remote input ---------------------------------------------------------


class RemoteError(MeshHealthError):
    """Something another party sent us is unacceptable."""


class MalformedMessage(RemoteError):
    """Bytes that do not decode to a well-formed, canonical wire value."""


class InvalidSignature(RemoteError):
    """A signature that does not verify under the claimed key."""


class InvalidBlock(RemoteError):
    """A block (or chain) that fails verification."""

    def __init__(self, message: str, *, node: bytes | None = None, height: int | None = None):
        super().__init__(message)
        self.node = node
        self.height = height


class Rejected(RemoteError):
    """A well-formed, correctly signed entry that policy refuses.

    ``reason`` is a short machine-readable label (``unknown_device``,
    ``duplicate``, ``future_timestamp`` ...) used for the reject counters.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RateLimited(RemoteError):
    """A client spent its share (requests, bytes or nonces): the API answers 429 with
    ``Retry-After``; ``reason`` is counted (``rate_limited``, ``stranger_budget`` ...)."""

    def __init__(self, reason: str, detail: str, retry_after_s: float):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.retry_after_s = retry_after_s


class HandshakeError(RemoteError):
    """A gossip peer is not who it claims, is in another network, or is not allowed."""


class AccessDenied(RemoteError):
    """The caller is not allowed to do or read this."""


# --- local trouble --------------------------------------------------------


class LocalError(MeshHealthError):
    """A problem on our side: configuration, storage, our own network."""


class ConfigError(LocalError):
    """Bad or missing configuration; the message names the fix."""


class KeyFileError(ConfigError):
    """A key file that is missing, unreadable or sealed with another passphrase."""


class StorageError(LocalError):
    """The local store failed."""


class NetworkError(LocalError):
    """We could not reach a broker, peer or node."""
