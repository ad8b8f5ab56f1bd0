"""Identities and key files.

Every identity (node, device, patient, provider) is one Ed25519 signing key;
its X25519 box key is derived from it (``to_curve25519``), so one 32-byte
seed is all a party has to keep.

A key file is a small TOML document written with mode 0600.  With a
passphrase, everything secret in it is sealed: Argon2id (``nacl.pwhash``)
stretches the passphrase into a SecretBox key, and the box holds the seed and
every other private field (a patient's key chains) as one TOML document; only
the kind and the public key stay in clear.  The passphrase never comes from
argv (``ps`` shows it): ``--passphrase-file``, ``$MESHHEALTH_PASSPHRASE`` or a
prompt.
"""

from __future__ import annotations

import getpass
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
import tomli_w

from meshhealth.crypto.hashing import short
from meshhealth.errors import KeyFileError

KINDS = ("node", "device", "patient", "provider")


@dataclass(frozen=True)
class Identity:
    kind: str
    signing: nacl.signing.SigningKey

    @classmethod
    def generate(cls, kind: str) -> Identity:
        if kind not in KINDS:
            raise ValueError(f"unknown identity kind {kind!r}")
        return cls(kind, nacl.signing.SigningKey.generate())

    @property
    def public(self) -> bytes:
        return bytes(self.signing.verify_key)

    @property
    def short(self) -> str:
        return short(self.public)

    @property
    def box_private(self) -> nacl.public.PrivateKey:
        return self.signing.to_curve25519_private_key()

    @property
    def box_public(self) -> nacl.public.PublicKey:
        return self.signing.verify_key.to_curve25519_public_key()


def box_public_of(ed25519_public: bytes) -> nacl.public.PublicKey:
    """The X25519 public key belonging to an Ed25519 public key."""
    return nacl.signing.VerifyKey(ed25519_public).to_curve25519_public_key()


def write_private(path: Path, text: str) -> None:
    """Write a secret file with mode 0600, refusing to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; remove it or pick another path") from exc
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _kdf(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, opslimit=ops, memlimit=mem
    )


PASSPHRASE_ENV = "MESHHEALTH_PASSPHRASE"
MAX_SEALED_BYTES = 1 << 24  # a key file's sealed payload (its key chains grow with rechains)
_CLEAR = ("kind", "public", "sealed")  # the fields a sealed key file keeps in clear


@dataclass(frozen=True)
class KeyFile:
    """A key file opened: the identity, every other private field (a patient's key
    chains), and the passphrase it was opened with (None: it was not sealed)."""

    identity: Identity
    extra: dict[str, Any]
    passphrase: str | None


def save_identity(
    ident: Identity,
    path: Path,
    *,
    passphrase: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a key file (mode 0600, never over an existing one).  With a passphrase,
    everything secret is sealed: the seed *and* ``extra`` (a patient's key chains) go
    into one SecretBox under an Argon2id key; only the kind and public key stay clear."""
    doc: dict[str, Any] = {"kind": ident.kind, "public": ident.public.hex()}
    private: dict[str, Any] = {"seed": bytes(ident.signing).hex(), **(extra or {})}
    if passphrase:
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        ops = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
        mem = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
        box = nacl.secret.SecretBox(_kdf(passphrase, salt, ops, mem))
        doc["sealed"] = {
            "kdf": "argon2id",
            "payload": "toml",  # the box holds the private document, not just the seed
            "salt": salt.hex(),
            "opslimit": ops,
            "memlimit": mem,
            "box": box.encrypt(tomli_w.dumps(private).encode()).hex(),
        }
    else:
        doc.update(private)
    write_private(path, tomli_w.dumps(doc))


def ask_passphrase(path: Path) -> str:
    """The passphrase of a sealed key file when none was given: $MESHHEALTH_PASSPHRASE,
    else a prompt if stdin is a terminal (never from argv: ``ps`` shows argv)."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if sys.stdin.isatty():
        got = getpass.getpass(f"passphrase for {path}: ")
        if got:
            return got
    raise KeyFileError(
        f"{path} is sealed: give --passphrase-file FILE, set {PASSPHRASE_ENV}, "
        "or run on a terminal to be asked"
    )


def read_key_file(path: Path, *, passphrase: str | None = None) -> KeyFile:
    """Open a key file: clear, sealed seed with clear extras (the old format: it still
    loads, and is sealed whole when rewritten with a passphrase), or sealed whole."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"key file {path} not found; create one with `meshhealth init` "
            "or `meshhealth patient new`"
        ) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"key file {path} is unreadable: {exc}") from exc
    try:
        extra = {k: v for k, v in doc.items() if k not in (*_CLEAR, "seed")}
        if "sealed" in doc:
            passphrase = passphrase or ask_passphrase(path)
            s = doc["sealed"]
            if s.get("kdf") != "argon2id":
                raise ValueError(f"unknown kdf {s.get('kdf')!r}")
            box = bytes.fromhex(s["box"])
            if len(box) > MAX_SEALED_BYTES:
                raise ValueError("sealed payload too large")
            key = _kdf(passphrase, bytes.fromhex(s["salt"]), s["opslimit"], s["memlimit"])
            plain = nacl.secret.SecretBox(key).decrypt(box)
            if s.get("payload") == "toml":
                private = tomllib.loads(plain.decode())
                seed = bytes.fromhex(private.pop("seed"))
                extra |= private
            else:
                seed = plain
        else:
            passphrase = None
            seed = bytes.fromhex(doc["seed"])
        ident = Identity(doc["kind"], nacl.signing.SigningKey(seed))
    except nacl.exceptions.CryptoError as exc:
        raise KeyFileError(f"wrong passphrase for {path}") from exc
    except (
        KeyError,
        ValueError,
        TypeError,
        UnicodeDecodeError,
        tomllib.TOMLDecodeError,
    ) as exc:
        raise KeyFileError(f"key file {path} is malformed: {exc}") from exc
    if ident.public.hex() != doc.get("public"):
        raise KeyFileError(f"key file {path}: public key does not match the seed")
    return KeyFile(ident, extra, passphrase)


def load_identity(path: Path, *, passphrase: str | None = None) -> Identity:
    return read_key_file(path, passphrase=passphrase).identity


def read_passphrase_file(path: str) -> str:
    """A passphrase from a file (its first line; a trailing newline is not part of it)."""
    try:
        text = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"passphrase file {path} is unreadable: {exc}") from exc
    if not text or not text[0]:
        raise KeyFileError(f"passphrase file {path} is empty")
    return text[0]


def parse_public(text: str) -> bytes:
    """A public key given as 64 hex characters (or a key file path)."""
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    path = Path(text)
    if path.exists():
        doc = tomllib.loads(path.read_text())
        return bytes.fromhex(doc["public"])
    raise KeyFileError(f"{text!r} is neither a 64-hex public key nor a key file")
