"""Identities and key files.

Every identity (node, device, patient, provider) is one Ed25519 signing key;
its X25519 box key is derived from it (``to_curve25519``), so one 32-byte
seed is all a party has to keep.

A key file is a small TOML document written with mode 0600.  With a
passphrase, the seed is sealed: Argon2id (``nacl.pwhash``) stretches the
passphrase into a SecretBox key, and only the box is stored.
"""

from __future__ import annotations

import os
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


def save_identity(
    ident: Identity,
    path: Path,
    *,
    passphrase: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    doc: dict[str, Any] = {"kind": ident.kind, "public": ident.public.hex()}
    seed = bytes(ident.signing)
    if passphrase:
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        ops = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
        mem = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
        box = nacl.secret.SecretBox(_kdf(passphrase, salt, ops, mem))
        doc["sealed"] = {
            "kdf": "argon2id",
            "salt": salt.hex(),
            "opslimit": ops,
            "memlimit": mem,
            "box": box.encrypt(seed).hex(),
        }
    else:
        doc["seed"] = seed.hex()
    if extra:
        doc.update(extra)
    write_private(path, tomli_w.dumps(doc))


def load_identity(path: Path, *, passphrase: str | None = None) -> Identity:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"key file {path} not found; create one with `meshhealth init` "
            "or `meshhealth patient new`"
        ) from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"key file {path} is unreadable: {exc}") from exc
    try:
        if "sealed" in doc:
            if passphrase is None:
                passphrase = os.environ.get("MESHHEALTH_PASSPHRASE")
            if not passphrase:
                raise KeyFileError(
                    f"{path} is sealed: set MESHHEALTH_PASSPHRASE or pass --passphrase"
                )
            s = doc["sealed"]
            key = _kdf(passphrase, bytes.fromhex(s["salt"]), s["opslimit"], s["memlimit"])
            seed = nacl.secret.SecretBox(key).decrypt(bytes.fromhex(s["box"]))
        else:
            seed = bytes.fromhex(doc["seed"])
        ident = Identity(doc["kind"], nacl.signing.SigningKey(seed))
    except nacl.exceptions.CryptoError as exc:
        raise KeyFileError(f"wrong passphrase for {path}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is malformed: {exc}") from exc
    if ident.public.hex() != doc.get("public"):
        raise KeyFileError(f"key file {path}: public key does not match the seed")
    return ident


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
