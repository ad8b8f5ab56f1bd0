"""Where the CLI takes a key file's passphrase from: never argv (``ps`` shows argv to
every user), but ``--passphrase-file FILE``, ``$MESHHEALTH_PASSPHRASE`` or a prompt
when stdin is a terminal.  Commands that create a key file seal it with ``--seal`` or
``--passphrase-file``; commands that open one ask only if it is sealed."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from meshhealth.crypto.keys import PASSPHRASE_ENV, read_passphrase_file
from meshhealth.errors import KeyFileError


class Refused(argparse.Action):
    """``--passphrase X`` is gone (any user sees argv in ``ps``): say what to use instead.
    It stays registered so that argparse does not take it for ``--passphrase-file``."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        parser.error(
            "--passphrase is gone: argv is visible to every user in ps; use "
            f"--passphrase-file FILE, ${PASSPHRASE_ENV} or the prompt on a terminal"
        )


def add_args(s: Any, *, create: bool = False) -> None:
    """``--passphrase-file`` (and, where a key file is created, ``--seal``)."""
    s.add_argument("--passphrase", nargs="?", action=Refused, help=argparse.SUPPRESS)
    s.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the key file's passphrase from FILE (first line); else "
        f"${PASSPHRASE_ENV}, else a prompt on a terminal",
    )
    if create:
        s.add_argument(
            "--seal",
            action="store_true",
            help=f"seal the new key file with a passphrase (from --passphrase-file, "
            f"${PASSPHRASE_ENV} or a prompt; Argon2id)",
        )
    s.set_defaults(passphrase=None, passphrase_create=create)


def resolve(a: argparse.Namespace) -> None:
    """Set ``a.passphrase`` for the command: from the file if one is named; for a new key
    file asked to be sealed, from the environment or a prompt (typed twice).  Opening a
    sealed file without one falls back to the same (crypto.keys.ask_passphrase)."""
    if not hasattr(a, "passphrase_file"):
        return
    if a.passphrase_file:
        a.passphrase = read_passphrase_file(a.passphrase_file)
    elif a.passphrase_create and a.seal:
        a.passphrase = new_passphrase()


def new_passphrase() -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise KeyFileError(
            f"--seal needs a passphrase: give --passphrase-file FILE, set {PASSPHRASE_ENV}, "
            "or run on a terminal to be asked"
        )
    first = getpass.getpass("new passphrase: ")
    if not first:
        raise KeyFileError("an empty passphrase seals nothing")
    if getpass.getpass("the same passphrase again: ") != first:
        raise KeyFileError("the passphrases differ")
    return first
