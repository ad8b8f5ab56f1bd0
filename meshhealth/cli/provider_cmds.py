"""``meshhealth provider keygen | fetch | serve`` and ``meshhealth patient audit``.

``provider fetch`` asks the ``--node``s in order for a patient's stream,
verifies every reading against a signed block header, decrypts it with the
keys of the grants the patient made to the provider (or, with a patient's
key file, with the patient's own seeds) and writes a table, CSV or an HL7
FHIR R4 Bundle of Observations plus the Consent(s) that allowed the read.
``provider serve`` does the same behind a local web page (``meshhealth/viewer``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from meshhealth.cli import passphrase
from meshhealth.cli.patient_cmds import (
    _iso,
    add_reader_args,
    add_serve_args,
    all_chains,
    limits_of,
    open_key_file,
    parse_time,
)
from meshhealth.config import Genesis
from meshhealth.crypto.keys import Identity, parse_public, save_identity
from meshhealth.net.client import client_session
from meshhealth.sharing import export
from meshhealth.sharing.audit import request_status
from meshhealth.sharing.provider import (
    Fetcher,
    NodeClient,
    Refused,
    access_of,
    audit_trail,
    make_pool,
    my_grants,
    network_genesis,
    own_access,
)

TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)


def cmd_keygen(a: argparse.Namespace) -> int:
    ident = Identity.generate("provider")
    save_identity(ident, Path(a.out), passphrase=a.passphrase)
    print(f"provider {ident.public.hex()} -> {a.out}")
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
    else:
        with open(path, "w", newline="") as f:
            yield f


async def fetch(a: argparse.Namespace) -> int:
    me = open_key_file(a.key, a.passphrase).identity
    patient = parse_public(a.patient)
    start, end = parse_time(a.start), parse_time(a.end)
    async with client_session(TIMEOUT) as session:
        genesis = (
            Genesis.load(Path(a.genesis)) if a.genesis else await network_genesis(session, a.node)
        )
        if me.public == patient:
            access = own_access(patient, all_chains(a.key, a.passphrase))
        else:
            try:
                access = access_of(patient, await my_grants(session, a.node, me, patient))
            except Refused as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 3
        consents = [
            export.consent(
                k.grant, k.id, revoked=revoked, subject=access.subject, names=access.names
            )
            for k, revoked in access.grants
        ]
        pool = make_pool(a.workers) if a.workers != 0 else None
        try:
            fetcher = Fetcher(
                NodeClient(session, a.node, me), genesis, keys_for=access.keys_for, pool=pool
            )
            res = await fetcher.fetch(patient, a.stream, start, end)
        finally:
            if pool is not None:
                pool.shutdown()
    rows = res.rows(access.subject, start, end, access.device)
    with _output(a.out) as out:
        if a.format == "csv":
            export.write_csv(rows, out)
        elif a.format == "fhir":
            bundle = export.observations_bundle(rows)
            bundle.setdefault("entry", []).extend(
                {"fullUrl": f"{c['identifier'][0]['system']}:{c['id']}", "resource": c}
                for c in consents
            )
            json.dump(bundle, out, indent=1)
            out.write("\n")
        else:
            export.write_table(rows, out)
            if res.skipped:
                out.write(f"# warning: {_skipped(res.skipped)}\n")
    print(
        f"{len(rows)} samples in {len(res.readings)} verified readings from {res.node_url} "
        f"({res.blocks} blocks, {res.bytes_transferred:,} bytes"
        + (f"; {res.undecryptable} readings we hold no key for" if res.undecryptable else "")
        + (f"; {len(res.skipped)} skipped" if res.skipped else "")
        + ")",
        file=sys.stderr,
    )
    if res.skipped:  # CSV and FHIR stay well-formed: the warning goes beside them
        print(f"warning: {_skipped(res.skipped)}", file=sys.stderr)
    return 0


def _skipped(bad: list[tuple[bytes, int]]) -> str:
    devices = sorted({d.hex()[:8] for d, _ in bad})
    return (
        f"{len(bad)} reading(s) signed by an enrolled device did not decrypt (or came from it "
        "after the patient removed it) and were skipped "
        f"(device {', '.join(devices)}; a stolen or faulty device key? see "
        "`patient remove-device`)"
    )


async def audit(a: argparse.Namespace) -> int:
    """The patient's audit trail: every read of their data, and every refusal, as logged on
    chain by the node that answered (each log's node signature is checked here, and the
    reader's signed request in it: ``forged`` marks a log whose request does not verify)."""
    me = open_key_file(a.key, a.passphrase).identity
    async with client_session(TIMEOUT) as session:
        _, logs = await audit_trail(NodeClient(session, a.node, me))
    if a.format == "fhir":
        json.dump(export.audit_bundle(logs), sys.stdout, indent=1)
        print()
    elif a.format == "json":
        json.dump([export.access_log_doc(x) for x in logs], sys.stdout, indent=1)
        print()
    else:
        print(
            f"{'when':<20} {'reader':<10} {'stream':<7} {'window':<43} {'outcome':<8} n   "
            "node      request"
        )
        for x in logs:
            outcome = x.outcome if x.outcome == "read" else f"DENIED ({x.reason.decode()})"
            count = getattr(x, "count", 1)
            if count > 1:
                outcome += f" x{count}"
            window = f"{_iso(x.from_ms)[:19]}..{_iso(x.to_ms)[:19]}"
            status = request_status(x)
            print(
                f"{_iso(x.ts_ms)[:19]:<20} {x.reader.hex()[:8]:<10} {x.stream:<7} "
                f"{window:<43} {outcome:<8} {x.readings:<3} {x.node.hex()[:8]:<9} "
                + (status.upper() if status == "forged" else status)
            )
    return 0


async def serve(a: argparse.Namespace) -> int:
    """The local viewer: fetch, verify and decrypt here; plot in the browser."""
    from meshhealth.viewer import provider_view
    from meshhealth.viewer.server import Reader
    from meshhealth.viewer.server import serve as listen

    me = open_key_file(a.key, a.passphrase).identity
    genesis = Path(a.genesis) if a.genesis else None
    reader = Reader(me, a.node, genesis=genesis, workers=a.workers, limits=limits_of(a))
    return await listen(provider_view.app(reader), a.host, a.port, "viewer")


def add_parsers(sub: Any, pat: Any, sync: Any) -> None:
    prov = sub.add_parser("provider", help="fetch, verify and export shared data").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = prov.add_parser("keygen", help="create a provider (or researcher) key")
    s.add_argument("--out", required=True)
    passphrase.add_args(s, create=True)
    s.set_defaults(fn=cmd_keygen)
    s = prov.add_parser("fetch", help="a patient's stream: verify, decrypt, export")
    s.add_argument("--key", required=True, help="the provider's key file (or the patient's)")
    s.add_argument("--patient", required=True, help="the patient's public key (64 hex)")
    s.add_argument("--stream", required=True, help="hr, spo2, temp, bp, rr, steps, ...")
    s.add_argument("--from", dest="start", required=True, help="Unix ms or ISO 8601")
    s.add_argument("--to", dest="end", required=True, help="Unix ms or ISO 8601")
    s.add_argument("--format", choices=("table", "csv", "fhir"), default="table")
    s.add_argument("--out", help="write here instead of stdout")
    add_reader_args(s)
    s.set_defaults(fn=sync(fetch))
    s = prov.add_parser(
        "serve", help="a local web page plotting the streams patients granted, verified here"
    )
    s.add_argument("--key", required=True, help="the provider's key file")
    add_serve_args(s)
    s.set_defaults(fn=sync(serve))
    s = pat.add_parser("audit", help="who read what of my data, when, from which node")
    s.add_argument("--key", required=True)
    s.add_argument("--node", action="append", required=True)
    s.add_argument("--format", choices=("table", "json", "fhir"), default="table")
    passphrase.add_args(s)
    s.set_defaults(fn=sync(audit))
